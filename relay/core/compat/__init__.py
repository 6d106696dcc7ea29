"""Verifiers for the links that existing bridges mint (``compat:`` in the configuration).

Each module is pure: bytes and strings in, a :class:`~relay.core.compat.result.Checked`
out, never I/O. The web layer (:mod:`relay.web.compat`) turns a VALID result into
:class:`~relay.core.signing.LinkClaims` and serves it like a native link.
"""

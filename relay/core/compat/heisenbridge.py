"""heisenbridge media links: ``{url}_heisenbridge/media/{server}/{media_id}/{checksum}[/{name}]``.

The checksum, as heisenbridge 1.15.4 computes it (``BridgeAppService.mxc_checksum`` in
``heisenbridge/__main__.py``, PyPI ``heisenbridge==1.15.4``)::

    checksum_raw = hmac.new(self.media_key, f"mxc://{server}/{media_id}/".encode("utf-8"),
                            hashlib.sha256).digest()
    return base64.urlsafe_b64encode(checksum_raw[:8]).decode("utf-8").rstrip("=")

``media_key`` is the ``heisenbridge.media_key`` of the bridge's registration file, else
its stored ``media_key`` config, else its ``hs_token``
(all as UTF-8). Note the trailing ``/`` after the media id in the MAC input.

What heisenbridge gets wrong and the relay does not copy: it compares with ``!=``
(here :func:`~relay.core.compat.result.same_mac`), and the filename segment is not
covered by the checksum, so the relay ignores it (the event's own filename is served).
The links never expire; the relay's revocation and seen rules still apply. 64 bits of
MAC is below the relay's own 128-bit floor: it is what the bridge mints, and a guess
costs a request each (the README says so).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from relay.core.compat.result import Checked, Verdict, media_or_none, refuse, same_mac
from relay.core.mxc import MediaId

MAC_BYTES = 8
# 8 bytes in unpadded base64url are exactly 11 characters, the last one carrying 4 bits.
_CHECKSUM = re.compile(r"[A-Za-z0-9_-]{10}[AEIMQUYcgkosw048]")


def checksum(media_key: bytes, media: MediaId) -> str:
    """The checksum heisenbridge puts in its link for ``media``."""
    message = f"mxc://{media.server_name}/{media.media_id}/".encode()
    mac = hmac.new(media_key, message, hashlib.sha256).digest()[:MAC_BYTES]
    return base64.urlsafe_b64encode(mac).decode("ascii").rstrip("=")


def link_path(media_key: bytes, media: MediaId, filename: str | None = None) -> str:
    """The path heisenbridge mints (without its base URL), for tests and the README."""
    path = f"_heisenbridge/media/{media.server_name}/{media.media_id}/{checksum(media_key, media)}"
    return path if filename is None else f"{path}/{filename}"


def verify(media_key: bytes, server_name: str, media_id: str, given: str) -> Checked:
    """Check one link's path segments (already percent-decoded). Total: never raises."""
    media = media_or_none(server_name, media_id)
    if media is None:
        return refuse(Verdict.MALFORMED, "not a valid server name and media id")
    if not isinstance(given, str) or not _CHECKSUM.fullmatch(given):
        # Only the one canonical spelling of 8 bytes is accepted: no second valid link.
        return refuse(Verdict.MALFORMED, "checksum is not 11 base64url characters")
    if not same_mac(checksum(media_key, media).encode(), given.encode()):
        return refuse(Verdict.FORGED, "checksum does not match")
    return Checked(Verdict.VALID, media, None)

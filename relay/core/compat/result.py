"""What a compat verifier says about a link: the verdict, and the media it names."""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from relay.core.mxc import InvalidMxc, MediaId, parse_mxc
from relay.core.signing import Verdict

# Reused from the native links: MALFORMED and FORGED answer 403, EXPIRED 410.
__all__ = [
    "Checked",
    "Verdict",
    "b64url_decode",
    "b64url_encode",
    "media_or_none",
    "refuse",
    "same_mac",
]


@dataclass(frozen=True, slots=True)
class Checked:
    """A verdict; ``media`` and ``expires_at`` (unix seconds, None: no expiry) when signed.

    ``reason`` says why a link was refused, for the log (never shown to the client,
    which only learns "forged" or "expired").
    """

    verdict: Verdict
    media: MediaId | None = None
    expires_at: float | None = None
    reason: str = ""


def refuse(verdict: Verdict, reason: str) -> Checked:
    return Checked(verdict, reason=reason)


def media_or_none(server_name: str, media_id: str) -> MediaId | None:
    """The media id when both parts pass the strict mxc grammar, else None."""
    try:
        return parse_mxc(f"mxc://{server_name}/{media_id}")
    except InvalidMxc:
        return None


def same_mac(expected: bytes, given: bytes) -> bool:
    """Constant-time comparison (DESIGN.md: a check that is not constant-time is no check)."""
    return hmac.compare_digest(expected, given)


def b64url_encode(raw: bytes) -> str:
    """Unpadded base64url (Go's ``RawURLEncoding``, Node's ``'base64url'``)."""
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def b64url_decode(text: object, *, limit: int) -> bytes | None:
    """Unpadded base64url in its one canonical spelling only, at most ``limit`` characters.

    Python's decoder drops characters outside the alphabet and ignores trailing bits, so
    the result is encoded again and compared: no second spelling of a link is valid.
    """
    if not isinstance(text, str) or not text or len(text) > limit or len(text) % 4 == 1:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if b64url_encode(raw) == text else None

"""Signed-URL tokens: mint and verify links that name one media variant until a deadline.

A token is seven or eight ``.``-separated fields, all in ``[A-Za-z0-9_-]``, so the whole
token stays within ``[A-Za-z0-9_.-]`` and needs no escaping in a URL::

    1.<key id>.<expires_at>.<variant>.<server name>.<media id>.<mac>
    2.<key id>.<expires_at>.<variant>.<server name>.<media id>.<reference>.<mac>

- ``1`` or ``2`` is the format version. Version 2 binds the link to the media
  reference it was minted for (:func:`relay.core.records.reference_tag` of its event),
  so what it serves (decryption key, type, filename) is that reference's, whatever is
  posted later (issue: "the newest mention decides"); version 1 links, minted before,
  still verify and serve the newest reference.
- ``expires_at`` is unix seconds in decimal, without sign or leading zeros.
- ``variant`` is ``o`` (the original) or ``<c|s><width>x<height>[a]`` for a crop/scale
  thumbnail, ``a`` marking an animated one.
- the server name is written with two-character escapes (``.`` → ``_d``, ``:`` → ``_c``,
  ``[`` → ``_l``, ``]`` → ``_r``); ``_`` never occurs in a server name, so this is a
  bijection and every server name, IPv6 literals included, has exactly one spelling.
- ``mac`` is the first 18 bytes (144 bits) of HMAC-SHA256, base64url without padding.

The filename is not in the token: it travels in the URL path after the token, so that
browsers save the file under that name, but it is covered by the MAC, so it cannot be
changed either. The MAC input is a length-prefixed encoding of every field, so no two
different claims share one input. Verification compares the MAC's *text* with the
expected text, so lenient base64 decoding (ignored trailing bits) can never make a
second spelling of one token valid.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import quote

from relay.core.mxc import MediaId, is_canonical_server_name, is_valid_media_id
from relay.core.variant import THUMBNAIL_METHODS, Thumbnail, ThumbnailMethod, Variant

VERSION = "1"
# Links bound to one media reference.
REFERENCE_VERSION = "2"
MIN_SECRET_BYTES = 32
# 18 bytes is 144 bits (above the 128-bit floor) and exactly 24 base64 characters, no padding.
MAC_BYTES = 18
# Longer than any token this module can mint (255-char server names, 255-char media ids),
# short enough that garbage is refused before any work is done.
MAX_TOKEN_LENGTH = 1024
MAX_EXPIRES_AT = 999_999_999_999
MAX_THUMBNAIL_SIDE = 65535

_DOMAIN = b"matrix-media-relay signed link"
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_EXPIRES_AT = re.compile(r"0|[1-9][0-9]{0,11}")
_VARIANT = re.compile(r"([cs])([1-9][0-9]{0,4})x([1-9][0-9]{0,4})(a?)")
_SERVER = re.compile(r"(?:[A-Za-z0-9-]|_[dclr])+")
_MEDIA_ID = re.compile(r"[A-Za-z0-9_-]+")
_MAC = re.compile(r"[A-Za-z0-9_-]{24}")
_REFERENCE = re.compile(r"[A-Za-z0-9_-]{16}")
_FIELD_COUNT = 7

_SERVER_ESCAPES = {".": "_d", ":": "_c", "[": "_l", "]": "_r"}
_SERVER_UNESCAPES = {v: k for k, v in _SERVER_ESCAPES.items()}
_METHOD_LETTERS = {"crop": "c", "scale": "s"}
_LETTER_METHODS: dict[str, ThumbnailMethod] = {"c": "crop", "s": "scale"}
# A filename is one URL path segment; these would be empty or a dot-segment that
# browsers resolve away (WHATWG URL: "." and ".." also match their %2e spellings).
_UNSENDABLE_FILENAMES = frozenset({"", ".", ".."})


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One HMAC key and the id that names it in tokens (so keys can be rotated)."""

    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, str) or not _KEY_ID.fullmatch(self.key_id):
            raise ValueError("signing key id must be 1-16 characters of A-Z a-z 0-9 _ -")
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"signing key secret must be at least {MIN_SECRET_BYTES} bytes")


class KeyRing:
    """The keys in use: the first one signs, every one verifies (rotation without dead links)."""

    __slots__ = ("_by_id", "_keys")

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one signing key")
        by_id: dict[str, SigningKey] = {}
        for key in keys:
            if not isinstance(key, SigningKey):
                raise TypeError("a key ring holds SigningKey objects only")
            if key.key_id in by_id:
                raise ValueError(f"duplicate signing key id {key.key_id!r}")
            by_id[key.key_id] = key
        self._keys = tuple(keys)
        self._by_id = by_id

    @property
    def signing_key(self) -> SigningKey:
        """The key new tokens are signed with."""
        return self._keys[0]

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        """Every key that verifies, the signing key first."""
        return self._keys

    def get(self, key_id: str) -> SigningKey | None:
        """The key with this id, or ``None`` when it is not (or no longer) in the ring."""
        return self._by_id.get(key_id)

    def __repr__(self) -> str:
        return f"KeyRing({[key.key_id for key in self._keys]!r})"


@dataclass(frozen=True, slots=True)
class LinkClaims:
    """What a link grants: one variant of one media item, under one filename, until a time."""

    media: MediaId
    variant: Variant
    filename: str | None
    expires_at: int
    # The reference (event) the link was minted for: its tag, or None (any reference).
    reference: str | None = None


class Verdict(Enum):
    """The outcome of checking a token; FORGED also covers unknown keys and wrong filenames."""

    VALID = "valid"
    MALFORMED = "malformed"
    FORGED = "forged"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Verification:
    """A verdict, with the claims when the MAC was good (VALID or EXPIRED)."""

    verdict: Verdict
    claims: LinkClaims | None = None


def sign(ring: KeyRing, claims: LinkClaims) -> str:
    """Mint a token for ``claims`` with the ring's signing key.

    Raises :class:`ValueError` for claims that could not be verified later: an invalid
    server name or media id, thumbnail sides outside 1..65535, an unknown method, an
    expiry outside 0..999999999999, or a filename that cannot be one URL path segment
    (empty, ``.``, ``..``, or not encodable as UTF-8).
    """
    _check_claims(claims)
    key = ring.signing_key
    fields = [
        VERSION if claims.reference is None else REFERENCE_VERSION,
        key.key_id,
        str(claims.expires_at),
        _encode_variant(claims.variant),
        _encode_server(claims.media.server_name),
        claims.media.media_id,
    ]
    if claims.reference is not None:
        fields.append(claims.reference)
    message = _mac_input(key.key_id, claims, _filename_bytes(claims.filename))
    return ".".join([*fields, _mac_text(key, message)])


def verify(ring: KeyRing, token: str, filename: str | None, now: float) -> Verification:
    """Check ``token`` (and the ``filename`` that came with it in the path) at time ``now``.

    Total: never raises. The MAC is checked before the expiry, so an unsigned token
    learns nothing about whether its claims would have been current; a link is expired
    from its ``expires_at`` second on (``now >= expires_at``).
    """
    parsed = _parse(token)
    if parsed is None:
        return Verification(Verdict.MALFORMED)
    key_id, claims_without_name, mac = parsed
    key = ring.get(key_id)
    if key is None:
        return Verification(Verdict.FORGED)
    name_bytes = None
    if filename is not None:
        name_bytes = _filename_bytes(filename) if isinstance(filename, str) else None
        if name_bytes is None:
            # Not UTF-8 encodable (lone surrogates): it cannot be the name that was signed.
            return Verification(Verdict.FORGED)
    claims = LinkClaims(
        media=claims_without_name.media,
        variant=claims_without_name.variant,
        filename=filename,
        expires_at=claims_without_name.expires_at,
        reference=claims_without_name.reference,
    )
    expected = _mac_text(key, _mac_input(key_id, claims, name_bytes))
    if not hmac.compare_digest(expected, mac):
        return Verification(Verdict.FORGED)
    # Written as "not before" so that a NaN clock counts as expired, never as valid.
    if not now < claims.expires_at:
        return Verification(Verdict.EXPIRED, claims)
    return Verification(Verdict.VALID, claims)


def link_path(token: str, filename: str | None) -> str:
    """The path of a link below the public base URL: ``TOKEN`` or ``TOKEN/<filename>``.

    The filename is percent-encoded as a single path segment (``/`` included), UTF-8
    as RFC 3986 section 2.5 recommends.
    """
    if filename is None:
        return token
    if filename in _UNSENDABLE_FILENAMES:
        raise ValueError("filename cannot be empty, '.' or '..'")
    return f"{token}/{quote(filename, safe='')}"


def build_url(base_url: str, token: str, filename: str | None) -> str:
    """The full link: ``base_url`` (which may carry a path prefix) joined with :func:`link_path`."""
    return f"{base_url.rstrip('/')}/{link_path(token, filename)}"


def _check_claims(claims: LinkClaims) -> None:
    media = claims.media
    if not isinstance(media, MediaId):
        raise ValueError("claims.media must be a MediaId")
    # Canonical only (relay.core.mxc): one link, one cache key, one revocation per media.
    if not is_canonical_server_name(media.server_name) or not is_valid_media_id(media.media_id):
        raise ValueError(f"cannot sign invalid or non-canonical media id {media}")
    variant = claims.variant
    if variant is not None:
        if not isinstance(variant, Thumbnail):
            raise ValueError("claims.variant must be None or a Thumbnail")
        for side in (variant.width, variant.height):
            if type(side) is not int or not 1 <= side <= MAX_THUMBNAIL_SIDE:
                raise ValueError(f"thumbnail sides must be integers in 1..{MAX_THUMBNAIL_SIDE}")
        if variant.method not in THUMBNAIL_METHODS:
            raise ValueError(f"unknown thumbnail method {variant.method!r}")
        if type(variant.animated) is not bool:
            raise ValueError("thumbnail 'animated' must be a bool")
    if claims.reference is not None and (
        not isinstance(claims.reference, str) or not _REFERENCE.fullmatch(claims.reference)
    ):
        raise ValueError("reference must be a reference tag (16 base64url characters)")
    expires_at = claims.expires_at
    if type(expires_at) is not int or not 0 <= expires_at <= MAX_EXPIRES_AT:
        raise ValueError(f"expires_at must be an integer in 0..{MAX_EXPIRES_AT}")
    if claims.filename is not None:
        if not isinstance(claims.filename, str) or claims.filename in _UNSENDABLE_FILENAMES:
            raise ValueError("filename must be a non-empty string other than '.' and '..'")
        if _filename_bytes(claims.filename) is None:
            raise ValueError("filename must be encodable as UTF-8")


def _filename_bytes(filename: str | None) -> bytes | None:
    if filename is None:
        return None
    try:
        return filename.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _mac_input(key_id: str, claims: LinkClaims, filename: bytes | None) -> bytes:
    """Every signed field, each prefixed with its length, so the encoding is unambiguous."""
    version = VERSION if claims.reference is None else REFERENCE_VERSION
    parts: list[bytes] = [
        _DOMAIN,
        version.encode(),
        key_id.encode(),
        claims.media.server_name.encode(),
        claims.media.media_id.encode(),
    ]
    if claims.reference is not None:
        parts += [b"reference", claims.reference.encode()]
    variant = claims.variant
    if variant is None:
        parts.append(b"original")
    else:
        parts += [
            b"thumbnail",
            str(variant.width).encode(),
            str(variant.height).encode(),
            variant.method.encode(),
            b"animated" if variant.animated else b"still",
        ]
    parts += [b"no-filename"] if filename is None else [b"filename", filename]
    parts.append(str(claims.expires_at).encode())
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _mac_text(key: SigningKey, message: bytes) -> str:
    digest = hmac.new(key.secret, message, hashlib.sha256).digest()[:MAC_BYTES]
    return base64.urlsafe_b64encode(digest).decode("ascii")


def _encode_server(server_name: str) -> str:
    return "".join(_SERVER_ESCAPES.get(char, char) for char in server_name)


def _decode_server(text: str) -> str | None:
    if not _SERVER.fullmatch(text):
        return None
    return re.sub(r"_[dclr]", lambda m: _SERVER_UNESCAPES[m.group(0)], text)


def _encode_variant(variant: Variant) -> str:
    if variant is None:
        return "o"
    suffix = "a" if variant.animated else ""
    return f"{_METHOD_LETTERS[variant.method]}{variant.width}x{variant.height}{suffix}"


def _decode_variant(text: str) -> tuple[bool, Variant]:
    """``(ok, variant)``: a separate flag, since ``None`` is the valid original variant."""
    if text == "o":
        return True, None
    match = _VARIANT.fullmatch(text)
    if match is None:
        return False, None
    letter, width, height, animated = match.groups()
    width_int, height_int = int(width), int(height)
    if width_int > MAX_THUMBNAIL_SIDE or height_int > MAX_THUMBNAIL_SIDE:
        return False, None
    return True, Thumbnail(width_int, height_int, _LETTER_METHODS[letter], animated=animated == "a")


def _parse(token: object) -> tuple[str, LinkClaims, str] | None:
    """Split a token into key id, claims (filename unset) and MAC text; ``None`` if malformed."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        return None
    fields = token.split(".")
    reference: str | None = None
    if len(fields) == _FIELD_COUNT + 1 and fields[0] == REFERENCE_VERSION:
        reference = fields.pop(6)
        if not _REFERENCE.fullmatch(reference):
            return None
    elif len(fields) != _FIELD_COUNT or fields[0] != VERSION:
        return None
    _, key_id, expires_at, variant_text, server_text, media_id, mac = fields
    if not _KEY_ID.fullmatch(key_id) or not _MAC.fullmatch(mac):
        return None
    if not _EXPIRES_AT.fullmatch(expires_at):
        return None
    ok, variant = _decode_variant(variant_text)
    if not ok:
        return None
    server_name = _decode_server(server_text)
    if server_name is None or not is_canonical_server_name(server_name):
        return None
    if not _MEDIA_ID.fullmatch(media_id) or not is_valid_media_id(media_id):
        return None
    claims = LinkClaims(MediaId(server_name, media_id), variant, None, int(expires_at), reference)
    return key_id, claims, mac

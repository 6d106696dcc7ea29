"""matrix-appservice-bridge ``MediaProxy`` links: ``{publicUrl}v1/media/download/{token}``.

Token version 1, as ``MediaProxy.getMediaToken`` builds it
(matrix-org/matrix-appservice-bridge ``src/components/media-proxy.ts``; npm
``matrix-appservice-bridge`` 11.2.0)::

    offset 0   1 byte   version (1)
    offset 1   64 bytes HMAC-SHA-512(key, endDt ‖ mxc)
    offset 65  8 bytes  endDt: ms since the epoch as a big-endian float64, -1 for none
    offset 73  ...      the mxc without "mxc://" ("server/media_id"), UTF-8

whole token in base64url without padding (Node's ``'base64url'``). The key is the
bridge's JWK (``{"kty": "oct", "k": ..., "alg": "HS512"}``, the file behind
matrix-appservice-irc's ``mediaProxy.signingKeyPath``), imported by WebCrypto as
HMAC/SHA-512. ``endDt`` is ``Date.now() + ttl`` (ttl in ms); the proxy refuses a link
when ``endDt < Date.now()``.

What the relay does not copy: ``verifyMediaToken`` does not await ``subtle.verify``, so
every signature passes (a Promise is truthy); here the MAC is compared in constant time
before anything else is believed. Version 2 (matrix-appservice-bridge PR #527, which
binds the room and event ids) is unmerged and its byte layout is not published in
anything the relay could check against, so version 2 tokens are refused as malformed
(a version byte other than 1).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct

from relay.core.compat.result import (
    Checked,
    Verdict,
    b64url_decode,
    b64url_encode,
    media_or_none,
    refuse,
    same_mac,
)
from relay.core.mxc import MediaId

VERSION = 1
MAC_BYTES = 64
HEADER_BYTES = 1 + MAC_BYTES + 8
NO_EXPIRY = -1.0
# Longer than any token of a valid mxc (255 + 1 + 255 bytes after the 73-byte header).
MAX_TOKEN_LENGTH = 1024
MIN_KEY_BYTES = 16


class InvalidJwk(ValueError):
    """The key file is not an HMAC JWK the relay can use; the message says why."""


def load_jwk(text: str) -> bytes:
    """The secret of a JWK ``oct`` key (RFC 7517, RFC 7518 section 6.4), for HMAC-SHA-512."""
    try:
        jwk = json.loads(text)
    except ValueError:
        raise InvalidJwk("not JSON") from None
    if not isinstance(jwk, dict):
        raise InvalidJwk("not a JSON object")
    if jwk.get("kty") != "oct":
        raise InvalidJwk(f"kty must be 'oct' (a symmetric key), got {jwk.get('kty')!r}")
    alg = jwk.get("alg")
    if alg is not None and alg != "HS512":
        # WebCrypto's importKey refuses a JWK whose alg does not match SHA-512.
        raise InvalidJwk(f"alg must be 'HS512', got {alg!r}")
    k = jwk.get("k")
    if not isinstance(k, str) or not k:
        raise InvalidJwk("'k' (the key, base64url) is missing")
    secret = b64url_decode(k, limit=4096)
    if secret is None:
        raise InvalidJwk("'k' is not unpadded base64url")
    if len(secret) < MIN_KEY_BYTES:
        raise InvalidJwk(f"the key is {len(secret)} bytes; at least {MIN_KEY_BYTES} expected")
    return secret


def encode_token(key: bytes, media: MediaId, end_ms: float | None) -> str:
    """A version 1 token, byte for byte as ``getMediaToken`` makes it (for tests)."""
    dt = struct.pack(">d", NO_EXPIRY if end_ms is None else float(end_ms))
    mxc = f"{media.server_name}/{media.media_id}".encode()
    mac = hmac.new(key, dt + mxc, hashlib.sha512).digest()
    return b64url_encode(bytes([VERSION]) + mac + dt + mxc)


def verify(key: bytes, token: str, now: float) -> Checked:
    """Check a token at ``now`` (unix seconds). Total: never raises.

    The MAC is checked before the expiry or the mxc are looked at.
    """
    raw = b64url_decode(token, limit=MAX_TOKEN_LENGTH)
    if raw is None:
        return refuse(Verdict.MALFORMED, "token is not unpadded base64url")
    if len(raw) <= HEADER_BYTES:
        return refuse(Verdict.MALFORMED, "token too short")
    if raw[0] != VERSION:
        return refuse(Verdict.MALFORMED, f"token version {raw[0]} is not supported")
    mac, payload = raw[1 : 1 + MAC_BYTES], raw[1 + MAC_BYTES :]
    if not same_mac(hmac.new(key, payload, hashlib.sha512).digest(), mac):
        return refuse(Verdict.FORGED, "signature does not match")
    (end_ms,) = struct.unpack(">d", payload[:8])
    try:
        server_name, sep, media_id = payload[8:].decode("utf-8").partition("/")
    except UnicodeDecodeError:
        return refuse(Verdict.MALFORMED, "mxc is not UTF-8")
    media = media_or_none(server_name, media_id) if sep else None
    if media is None:
        return refuse(Verdict.MALFORMED, "signed mxc is not valid")
    if end_ms == NO_EXPIRY:
        return Checked(Verdict.VALID, media, None)
    if not math.isfinite(end_ms) or end_ms < 0:
        return refuse(Verdict.MALFORMED, "signed expiry is not a time")
    deadline = end_ms / 1000
    # MediaProxy: expired when endDt < now; written "not <=" so a NaN clock is expired.
    if not now * 1000 <= end_ms:
        return Checked(Verdict.EXPIRED, media, deadline, "expired")
    return Checked(Verdict.VALID, media, deadline)

"""mautrix-go bridgev2 ``public_media`` links, stateless mode.

``{public_address}/{path_prefix}/{server}/{media_id}/{checksum}[/{filename}]``, ported from
``bridgev2/matrix/publicmedia.go`` (mautrix/go, stored copy at commit
d5223cdc8fcebace5f1de8d9b02f4f4568fc663d, and the later revision that added
``path_prefix`` and the filename segment)::

    func (br *Connector) hashContentURI(uri id.ContentURI, expiry []byte) []byte {
        hasher := hmac.New(sha256.New, br.pubMediaSigKey)
        hasher.Write([]byte(uri.String()))
        hasher.Write(expiry)
        return hasher.Sum(expiry)[:br.Config.PublicMedia.HashLength+len(expiry)]
    }

so the checksum is ``expiry ‖ HMAC-SHA256(signing_key, "mxc://server/id" ‖ expiry)``
truncated to ``hash_length`` bytes of MAC, where ``expiry`` is the expiry second as an
8-byte big-endian integer when the bridge's ``public_media.expiry`` is above 0 and empty
otherwise; the key is the UTF-8 bytes of ``public_media.signing_key``; the text is
unpadded base64url (``base64.RawURLEncoding``). A link is expired after its second
(``time.Now().Unix() > expiresAt``).

What the relay does not copy: the handler first compares the link with a checksum made
for the *current* second, so a link minted in an earlier second is refused; here the
expiry in the link is read and checked, as ``verifyPublicMediaChecksum`` intended. The
filename segment is not covered by the checksum, so it is ignored (the event's own
filename is served). ``hash_length`` 0 would be no signature at all: the config refuses
it. Database mode (``use_database``: opaque ids looked up in the bridge's database) is
out of scope.
"""

from __future__ import annotations

import hashlib
import hmac
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

MAX_HASH_LENGTH = 32  # SHA-256's size; initPublicMedia refuses more
EXPIRY_BYTES = 8
DEFAULT_PATH_PREFIX = "/_mautrix/publicmedia"


def checksum(
    signing_key: bytes, media: MediaId, hash_length: int, expires_at: int | None = None
) -> str:
    """The checksum segment mautrix-go mints (``expires_at``: unix seconds, or no expiry)."""
    if not 1 <= hash_length <= MAX_HASH_LENGTH:
        raise ValueError(f"hash_length must be 1-{MAX_HASH_LENGTH}")
    expiry = b"" if expires_at is None else struct.pack(">Q", expires_at)
    return b64url_encode(expiry + _mac(signing_key, media, expiry)[:hash_length])


def verify(
    signing_key: bytes,
    hash_length: int,
    expiring: bool,
    server_name: str,
    media_id: str,
    given: str,
    now: float,
) -> Checked:
    """Check one link's path segments at time ``now``. Total: never raises.

    ``expiring``: the bridge sets ``public_media.expiry`` above 0, so its links start with
    their expiry second.
    """
    media = media_or_none(server_name, media_id)
    if media is None:
        return refuse(Verdict.MALFORMED, "not a valid server name and media id")
    if not 1 <= hash_length <= MAX_HASH_LENGTH:
        return refuse(Verdict.MALFORMED, "hash_length out of range")
    raw = b64url_decode(given, limit=64)
    if raw is None:
        return refuse(Verdict.MALFORMED, "checksum is not unpadded base64url")
    want = hash_length + (EXPIRY_BYTES if expiring else 0)
    if len(raw) != want:
        return refuse(Verdict.MALFORMED, f"checksum is {len(raw)} bytes, expected {want}")
    expiry, mac = (raw[:EXPIRY_BYTES], raw[EXPIRY_BYTES:]) if expiring else (b"", raw)
    if not same_mac(_mac(signing_key, media, expiry)[:hash_length], mac):
        return refuse(Verdict.FORGED, "checksum does not match")
    if not expiring:
        return Checked(Verdict.VALID, media, None)
    (expires_at,) = struct.unpack(">Q", expiry)
    # mautrix: expired when now > expiresAt, i.e. valid through that whole second. Written
    # as "not <=" so that a NaN clock counts as expired.
    if not now < expires_at + 1:
        return Checked(Verdict.EXPIRED, media, float(expires_at + 1), "expired")
    return Checked(Verdict.VALID, media, float(expires_at + 1))


def link_path(
    signing_key: bytes,
    media: MediaId,
    hash_length: int,
    *,
    path_prefix: str = DEFAULT_PATH_PREFIX,
    expires_at: int | None = None,
    filename: str | None = None,
) -> str:
    """The path mautrix-go mints after its public address (``strings.Join`` with ``/``)."""
    parts = [
        path_prefix.strip("/"),
        media.server_name,
        media.media_id,
        checksum(signing_key, media, hash_length, expires_at),
    ]
    if filename:
        parts.append(filename)
    return "/".join(parts)


def _mac(signing_key: bytes, media: MediaId, expiry: bytes) -> bytes:
    message = f"mxc://{media.server_name}/{media.media_id}".encode() + expiry
    return hmac.new(signing_key, message, hashlib.sha256).digest()

"""EncryptedFile key material (Client-Server API, "Sending encrypted attachments").

Parsing and validating the ``file`` object of an encrypted attachment, and the compact
form the relay stores. Pure; the key and IV never appear in a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from relay.core.mxc import InvalidMxc, MediaId, parse_mxc

KEY_BYTES = 32  # AES-256
IV_BYTES = 16  # 128-bit counter block
SHA256_BYTES = 32
_STD_B64 = re.compile(r"[A-Za-z0-9+/]*")
_URLSAFE_B64 = re.compile(r"[A-Za-z0-9_-]*")


def check_key_material(key: object, iv: object, sha256: object) -> None:
    """Raise ValueError unless these have the lengths EncryptedFile v2 requires."""
    for name, value, length in (
        ("key", key, KEY_BYTES),
        ("iv", iv, IV_BYTES),
        ("sha256", sha256, SHA256_BYTES),
    ):
        if not isinstance(value, bytes) or len(value) != length:
            raise ValueError(f"encrypted file {name} must be {length} bytes")


@dataclass(frozen=True, slots=True, repr=False)
class EncryptionInfo:
    """Validated key material of an EncryptedFile (v2): enough to decrypt and verify it.

    ``repr`` never shows the key or the IV: these objects end up in log lines.
    """

    key: bytes
    iv: bytes
    sha256: bytes

    def __post_init__(self) -> None:
        check_key_material(self.key, self.iv, self.sha256)

    def __repr__(self) -> str:
        return f"EncryptionInfo(key=<redacted>, iv=<redacted>, sha256={_b64(self.sha256)!r})"

    def to_json(self) -> str:
        """Compact JSON for database storage (the same encodings the event used)."""
        return json.dumps(
            {
                "k": _b64(self.key, urlsafe=True),
                "iv": _b64(self.iv),
                "sha256": _b64(self.sha256),
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: str) -> EncryptionInfo:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on anything else."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("stored EncryptionInfo is not a JSON object")
        key = _unb64(data.get("k"), urlsafe=True)
        iv = _unb64(data.get("iv"))
        sha256 = _unb64(data.get("sha256"))
        if key is None or iv is None or sha256 is None:
            raise ValueError("stored EncryptionInfo has a missing or undecodable field")
        return cls(key=key, iv=iv, sha256=sha256)


def parse_encrypted_file(value: object) -> tuple[MediaId, EncryptionInfo] | None:
    """Validate an EncryptedFile (Client-Server API, "Sending encrypted attachments")."""
    if not isinstance(value, Mapping) or value.get("v") != "v2":
        return None
    try:
        media = parse_mxc(value.get("url"))
    except InvalidMxc:
        return None
    jwk = value.get("key")
    hashes = value.get("hashes")
    if not isinstance(jwk, Mapping) or not isinstance(hashes, Mapping):
        return None
    key_ops = jwk.get("key_ops")
    # The spec requires key_ops ⊇ {encrypt, decrypt} and ext = true; recipients only
    # need "decrypt", so that is all we insist on (clients differ on the rest).
    if (
        jwk.get("kty") != "oct"
        or jwk.get("alg") != "A256CTR"
        or not isinstance(key_ops, list)
        or "decrypt" not in key_ops
    ):
        return None
    key = _unb64(jwk.get("k"), urlsafe=True)
    iv = _unb64(value.get("iv"))
    sha256 = _unb64(hashes.get("sha256"))
    if key is None or iv is None or sha256 is None:
        return None
    try:
        return media, EncryptionInfo(key=key, iv=iv, sha256=sha256)
    except ValueError:  # wrong lengths
        return None


# --- base64 (Matrix spec appendices, "Unpadded Base64" / "URL-safe Unpadded Base64") ---


def _b64(data: bytes, *, urlsafe: bool = False) -> str:
    encoded = base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)
    return encoded.decode("ascii").rstrip("=")


def _unb64(value: object, *, urlsafe: bool = False) -> bytes | None:
    """Decode (URL-safe) unpadded Base64; padding is tolerated, as the appendix asks."""
    if not isinstance(value, str):
        return None
    stripped = value.rstrip("=")
    alphabet = _URLSAFE_B64 if urlsafe else _STD_B64
    if len(value) - len(stripped) > 2 or not alphabet.fullmatch(stripped):
        return None
    if len(stripped) % 4 == 1:
        return None
    padded = stripped + "=" * (-len(stripped) % 4)
    try:
        if urlsafe:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None

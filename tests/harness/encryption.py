"""EncryptedFile JSON for tests (Client-Server API, "Sending encrypted attachments")."""

from __future__ import annotations

import base64
from typing import Any

from relay.media.attachments import EncryptionLike


def b64(data: bytes, *, urlsafe: bool = False) -> str:
    """Unpadded base64, as the spec writes keys, IVs and hashes."""
    encoded = base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)
    return encoded.decode().rstrip("=")


def encrypted_file_json(mxc: str, enc: EncryptionLike) -> dict[str, Any]:
    """The ``file`` object of an encrypted attachment event."""
    return {
        "url": mxc,
        "key": {
            "kty": "oct",
            "alg": "A256CTR",
            "ext": True,
            "k": b64(enc.key, urlsafe=True),
            "key_ops": ["encrypt", "decrypt"],
        },
        "iv": b64(enc.iv),
        "hashes": {"sha256": b64(enc.sha256)},
        "v": "v2",
    }

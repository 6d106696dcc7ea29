"""EncryptedFile JSON for tests (Client-Server API, "Sending encrypted attachments")."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from relay.core.attachment_keys import KEY_BYTES
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


class EncryptedAttachment:
    """Plain bytes holder satisfying EncryptionLike ."""

    def __init__(self, key: bytes, iv: bytes, sha256: bytes) -> None:
        self.key = key
        self.iv = iv
        self.sha256 = sha256


def encrypt_attachment(plaintext: bytes) -> tuple[bytes, EncryptedAttachment]:
    """Encrypt like a Matrix client does: random key, 64-bit random IV prefix, zero counter."""
    key = os.urandom(KEY_BYTES)
    iv = os.urandom(8) + b"\0" * 8
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    ciphertext = enc.update(plaintext) + enc.finalize()
    return ciphertext, EncryptedAttachment(key, iv, hashlib.sha256(ciphertext).digest())

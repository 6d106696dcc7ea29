"""Encrypted attachments (Client-Server API "Sending encrypted attachments", EncryptedFile v2).

The homeserver stores ciphertext; the event (``file``) carries the AES-256 key, the
128-bit CTR counter block and the SHA-256 of the ciphertext. The relay checks that
hash over the whole ciphertext *before* any plaintext is kept or served, so a tampered
upload is never shown to anyone.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from relay.core.attachment_keys import check_key_material
from relay.core.errors import Codes, MatrixError
from relay.upstream.errors import FetchError


class EncryptionLike(Protocol):
    """What the relay needs from an EncryptedFile: raw bytes, already base64-decoded."""

    @property
    def key(self) -> bytes: ...  # 32 bytes, AES-256 ("k" of the JWK)

    @property
    def iv(self) -> bytes: ...  # 16 bytes, the initial counter block

    @property
    def sha256(self) -> bytes: ...  # 32 bytes, SHA-256 of the ciphertext ("hashes.sha256")


class CiphertextHashMismatch(FetchError):
    """The downloaded ciphertext does not match the event's hash: never serve it."""

    status = 502

    def to_matrix_error(self) -> MatrixError:
        return MatrixError(502, Codes.UNKNOWN, "The media failed its integrity check")


def validate_encryption(enc: EncryptionLike) -> None:
    """Raise ValueError unless key, iv and sha256 have the lengths EncryptedFile v2 requires."""
    check_key_material(enc.key, enc.iv, enc.sha256)


def plaintext_variant(enc: EncryptionLike, variant: str = "original") -> str:
    """The cache variant for decrypted plaintext: ``enc-<digest>-<variant>``.

    The digest covers the ciphertext hash, key and iv, so plaintext never shares a
    key with the ciphertext (``original``) nor with a decryption under other keys.
    The key material itself is never written anywhere, only this one-way digest.
    """
    digest = hashlib.sha256(b"relay-enc-v1\0" + enc.sha256 + enc.key + enc.iv).hexdigest()
    return f"enc-{digest[:32]}-{variant}"


class AttachmentDecryptor:
    """Streaming AES-256-CTR decryption that also hashes the ciphertext it is given.

    Call :meth:`update` with each ciphertext chunk, then :meth:`verify` before using any
    of the plaintext it returned.
    """

    def __init__(self, enc: EncryptionLike) -> None:
        validate_encryption(enc)
        # CTR with the full 128-bit block as counter: the spec's 64-bit counter starts
        # at zero, so the two only differ past 2**64 blocks.
        self._ctx = Cipher(algorithms.AES(enc.key), modes.CTR(enc.iv)).decryptor()
        self._hash = hashlib.sha256()
        self._expected = enc.sha256

    def hash_only(self, ciphertext: bytes) -> None:
        """Feed ciphertext to the hash without decrypting it (first pass)."""
        self._hash.update(ciphertext)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Decrypt without hashing (second pass, after :meth:`verify`)."""
        return self._ctx.update(ciphertext)

    def update(self, ciphertext: bytes) -> bytes:
        """Hash and decrypt one chunk."""
        self._hash.update(ciphertext)
        return self._ctx.update(ciphertext)

    def matches(self) -> bool:
        """True when the ciphertext seen so far has the expected SHA-256 (constant time)."""
        return hmac.compare_digest(self._hash.digest(), self._expected)

    def verify(self) -> None:
        """Raise CiphertextHashMismatch unless the whole ciphertext hashed as expected."""
        if not self.matches():
            raise CiphertextHashMismatch("ciphertext SHA-256 does not match the event")

"""EncryptedFile v2 decryption, hash check and plaintext cache naming."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from relay.media.attachments import (
    AttachmentDecryptor,
    CiphertextHashMismatch,
    plaintext_variant,
    validate_encryption,
)
from tests.harness.encryption import EncryptedAttachment, encrypt_attachment

# Spec "Sending encrypted attachments" example shape: 32-byte key, 16-byte IV whose
# lower 64 bits (the counter) start at zero.
KEY = bytes(range(32))
IV = bytes(range(8)) + b"\0" * 8


def _encrypt(plaintext: bytes, key: bytes = KEY, iv: bytes = IV) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(plaintext) + enc.finalize()


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 65_536, 200_001])
@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_streaming_decrypt_matches(size: int, chunk: int) -> None:
    """Decrypting in any chunking gives the plaintext and the hash verifies."""
    plaintext = bytes(i % 251 for i in range(size))
    ciphertext = _encrypt(plaintext)
    attachment = EncryptedAttachment(KEY, IV, hashlib.sha256(ciphertext).digest())
    dec = AttachmentDecryptor(attachment)
    out = b"".join(dec.update(ciphertext[i : i + chunk]) for i in range(0, size, chunk))
    dec.verify()
    assert out == plaintext


def test_two_pass_decrypt_matches() -> None:
    """Hashing first and decrypting second (as the relay does) gives the plaintext."""
    ciphertext, attachment = encrypt_attachment(b"two passes" * 1000)
    dec = AttachmentDecryptor(attachment)
    for i in range(0, len(ciphertext), 333):
        dec.hash_only(ciphertext[i : i + 333])
    dec.verify()
    plain = b"".join(dec.decrypt(ciphertext[i : i + 999]) for i in range(0, len(ciphertext), 999))
    assert plain == b"two passes" * 1000


@pytest.mark.parametrize("where", [0, 100, -1])
def test_tampered_ciphertext_is_refused(where: int) -> None:
    """One flipped ciphertext byte fails verification."""
    ciphertext, attachment = encrypt_attachment(b"secret attachment" * 20)
    tampered = bytearray(ciphertext)
    tampered[where] ^= 0x01
    dec = AttachmentDecryptor(attachment)
    dec.update(bytes(tampered))
    assert dec.matches() is False
    with pytest.raises(CiphertextHashMismatch):
        dec.verify()


def test_truncated_ciphertext_is_refused() -> None:
    """A ciphertext missing its last byte fails verification."""
    ciphertext, attachment = encrypt_attachment(b"complete" * 10)
    dec = AttachmentDecryptor(attachment)
    dec.update(ciphertext[:-1])
    with pytest.raises(CiphertextHashMismatch):
        dec.verify()


def test_hash_mismatch_maps_to_502() -> None:
    """A failed integrity check is shown to clients as a 502, never as content."""
    err = CiphertextHashMismatch("x").to_matrix_error()
    assert (err.status, err.errcode) == (502, "M_UNKNOWN")


def test_encrypt_attachment_follows_spec_iv() -> None:
    """The helper uses a fresh key and an IV whose 64-bit counter half is zero."""
    c1, a1 = encrypt_attachment(b"same")
    c2, a2 = encrypt_attachment(b"same")
    assert a1.key != a2.key and c1 != c2
    assert a1.iv[8:] == b"\0" * 8
    assert a1.sha256 == hashlib.sha256(c1).digest()


@pytest.mark.parametrize(
    ("key", "iv", "sha"),
    [
        (b"k" * 31, IV, b"s" * 32),
        (b"k" * 33, IV, b"s" * 32),
        (KEY, b"i" * 15, b"s" * 32),
        (KEY, IV, b"s" * 31),
        (KEY, IV, "s" * 32),
    ],
)
def test_bad_lengths_are_refused(key: bytes, iv: bytes, sha: bytes) -> None:
    """Keys, IVs and hashes of the wrong length are refused before any download."""
    attachment = EncryptedAttachment(key, iv, sha)
    with pytest.raises(ValueError, match="must be"):
        validate_encryption(attachment)
    with pytest.raises(ValueError, match="must be"):
        AttachmentDecryptor(attachment)


def test_plaintext_variant_never_equals_ciphertext_variant() -> None:
    """The plaintext's cache variant differs from 'original' and between keys."""
    a = EncryptedAttachment(KEY, IV, b"s" * 32)
    b = EncryptedAttachment(bytes(32), IV, b"s" * 32)
    va, vb = plaintext_variant(a), plaintext_variant(b)
    assert va.startswith("enc-") and va.endswith("-original")
    assert va != "original"
    assert va != vb
    assert plaintext_variant(a) == va  # stable across calls (and restarts)
    assert KEY.hex() not in va

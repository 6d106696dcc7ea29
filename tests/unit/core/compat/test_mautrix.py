"""mautrix-go public_media checksums, ported from bridgev2/matrix/publicmedia.go.

Source: mautrix/go ``bridgev2/matrix/publicmedia.go`` at commit
d5223cdc8fcebace5f1de8d9b02f4f4568fc663d (``hashContentURI``, ``makePublicMediaChecksum``,
``verifyPublicMediaChecksum``). ``go_checksum`` below is that Go code transcribed line by
line, kept apart from the relay's port so the two can disagree.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest

from relay.core.compat import mautrix
from relay.core.compat.result import Verdict
from relay.core.mxc import MediaId

KEY = b"mautrix-public-media-signing-key"
MEDIA = MediaId("example.org", "AbCdEf_123-x")
NOW = 1_700_000_000.0


def go_checksum(key: bytes, mxc: str, hash_length: int, expires_at: int | None) -> str:
    """``base64.RawURLEncoding.EncodeToString(br.makePublicMediaChecksum(uri))`` in Python."""
    expiry = b"" if expires_at is None else struct.pack(">Q", expires_at)  # AppendUint64
    hasher = hmac.new(key, digestmod=hashlib.sha256)
    hasher.update(mxc.encode())  # uri.String()
    hasher.update(expiry)
    summed = expiry + hasher.digest()  # hasher.Sum(expiry) appends to expiry
    return base64.urlsafe_b64encode(summed[: hash_length + len(expiry)]).decode().rstrip("=")


@pytest.mark.parametrize("hash_length", [1, 16, 32])
@pytest.mark.parametrize("expires_at", [None, int(NOW) + 3600])
def test_checksum_is_mautrix_gos(hash_length: int, expires_at: int | None) -> None:
    """The port mints what mautrix-go mints and verifies it, with and without expiry."""
    expected = go_checksum(KEY, "mxc://example.org/AbCdEf_123-x", hash_length, expires_at)
    assert mautrix.checksum(KEY, MEDIA, hash_length, expires_at) == expected
    checked = mautrix.verify(
        KEY, hash_length, expires_at is not None, "example.org", "AbCdEf_123-x", expected, NOW
    )
    assert checked.verdict is Verdict.VALID
    assert checked.media == MEDIA
    assert checked.expires_at == (None if expires_at is None else expires_at + 1)


def test_fixed_vectors() -> None:
    """Values computed once from the transcribed Go code (16-byte MAC, with and without expiry)."""
    assert go_checksum(KEY, str(MEDIA), 16, None) == "uoKO-CiSqg3BKGdMO4ssNA"
    assert mautrix.checksum(KEY, MEDIA, 16) == "uoKO-CiSqg3BKGdMO4ssNA"
    assert go_checksum(KEY, str(MEDIA), 16, 1_700_003_600) == "AAAAAGVT_xBuhCg7fpDPTbPRfYHYbsQL"
    assert mautrix.checksum(KEY, MEDIA, 16, 1_700_003_600) == "AAAAAGVT_xBuhCg7fpDPTbPRfYHYbsQL"


def test_link_minted_in_an_earlier_second_is_accepted() -> None:
    """mautrix-go's handler refuses these (it compares with the current second); we don't."""
    minted_at = int(NOW) - 120
    link = mautrix.checksum(KEY, MEDIA, 16, minted_at + 3600)
    checked = mautrix.verify(KEY, 16, True, MEDIA.server_name, MEDIA.media_id, link, NOW)
    assert checked.verdict is Verdict.VALID


def test_expiry_second_is_still_valid_then_expired() -> None:
    """Valid through the expiry second (``now > expiresAt`` is expired), then 410."""
    link = mautrix.checksum(KEY, MEDIA, 16, int(NOW))
    at = mautrix.verify(KEY, 16, True, MEDIA.server_name, MEDIA.media_id, link, NOW + 0.999)
    after = mautrix.verify(KEY, 16, True, MEDIA.server_name, MEDIA.media_id, link, NOW + 1)
    nan = mautrix.verify(KEY, 16, True, MEDIA.server_name, MEDIA.media_id, link, float("nan"))
    assert at.verdict is Verdict.VALID
    assert after.verdict is Verdict.EXPIRED
    assert nan.verdict is Verdict.EXPIRED


GOOD = mautrix.checksum(KEY, MEDIA, 16, int(NOW) + 60)
GOOD_RAW = base64.urlsafe_b64decode(GOOD + "==")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    ("given", "expiring", "key", "verdict"),
    [
        (_b64(GOOD_RAW[:-1] + bytes([GOOD_RAW[-1] ^ 1])), True, KEY, Verdict.FORGED),
        # a later expiry with the old MAC: the expiry is signed
        (_b64(struct.pack(">Q", int(NOW) + 9999) + GOOD_RAW[8:]), True, KEY, Verdict.FORGED),
        (_b64(GOOD_RAW[:-1]), True, KEY, Verdict.MALFORMED),  # truncated
        (_b64(GOOD_RAW[:8]), True, KEY, Verdict.MALFORMED),  # expiry alone, no MAC
        (GOOD, True, b"another-key", Verdict.FORGED),
        (GOOD, False, KEY, Verdict.MALFORMED),  # expiry-less entry: wrong length
        (GOOD + "=", True, KEY, Verdict.MALFORMED),
        ("!" + GOOD[1:], True, KEY, Verdict.MALFORMED),
        (GOOD[:-1] + "+", True, KEY, Verdict.MALFORMED),
        ("", True, KEY, Verdict.MALFORMED),
        ("A" * 200, True, KEY, Verdict.MALFORMED),
    ],
)
def test_refused(given: str, expiring: bool, key: bytes, verdict: Verdict) -> None:
    """Forged, re-dated, truncated, wrong-key and non-canonical checksums are refused."""
    checked = mautrix.verify(key, 16, expiring, MEDIA.server_name, MEDIA.media_id, given, NOW)
    assert checked.verdict is verdict
    assert checked.reason


def test_expired_is_told_apart_from_forged() -> None:
    """An expired link with a good MAC is EXPIRED (410), not FORGED."""
    link = mautrix.checksum(KEY, MEDIA, 16, int(NOW) - 10)
    checked = mautrix.verify(KEY, 16, True, MEDIA.server_name, MEDIA.media_id, link, NOW)
    assert checked.verdict is Verdict.EXPIRED


@pytest.mark.parametrize("hash_length", [0, 33, -1])
def test_hash_length_out_of_range(hash_length: int) -> None:
    """hash_length 0 is no signature at all: neither minted nor accepted."""
    with pytest.raises(ValueError, match="hash_length"):
        mautrix.checksum(KEY, MEDIA, hash_length)
    checked = mautrix.verify(KEY, hash_length, False, MEDIA.server_name, MEDIA.media_id, "", NOW)
    assert checked.verdict is Verdict.MALFORMED


def test_bad_media_refused() -> None:
    """Path segments that are no mxc never reach the MAC (nor the homeserver)."""
    checked = mautrix.verify(KEY, 16, False, "example.org", "..", GOOD, NOW)
    assert checked.verdict is Verdict.MALFORMED


def test_link_path() -> None:
    """strings.Join of public address, trimmed path_prefix, server, id, checksum, filename."""
    path = mautrix.link_path(KEY, MEDIA, 16, filename="cat.png")
    checksum = mautrix.checksum(KEY, MEDIA, 16)
    assert path == f"_mautrix/publicmedia/example.org/AbCdEf_123-x/{checksum}/cat.png"

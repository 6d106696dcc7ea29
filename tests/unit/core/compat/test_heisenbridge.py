"""heisenbridge checksums: the bridge's own formula, forged/truncated/wrong-key links refused."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from relay.core.compat import heisenbridge
from relay.core.compat.result import Verdict
from relay.core.mxc import MediaId

KEY = b"heisenbridge-media-key-0123456789"
MEDIA = MediaId("example.org", "AbCdEf_123-x")


def reference_checksum(media_key: bytes, server: str, media_id: str) -> str:
    """``BridgeAppService.mxc_checksum`` of heisenbridge 1.15.4 (heisenbridge/__main__.py)."""
    checksum_raw = hmac.new(
        media_key, f"mxc://{server}/{media_id}/".encode(), hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(checksum_raw[:8]).decode("utf-8").rstrip("=")


@pytest.mark.parametrize(
    "media",
    [MEDIA, MediaId("localhost:8448", "x"), MediaId("[::1]:8008", "A" * 64)],
)
def test_checksum_is_heisenbridges(media: MediaId) -> None:
    """The relay's checksum is the one heisenbridge mints, and it verifies."""
    expected = reference_checksum(KEY, media.server_name, media.media_id)
    assert heisenbridge.checksum(KEY, media) == expected
    checked = heisenbridge.verify(KEY, media.server_name, media.media_id, expected)
    assert (checked.verdict, checked.media, checked.expires_at) == (Verdict.VALID, media, None)


def test_fixed_vector() -> None:
    """A value computed once with heisenbridge's formula, so a change of either shows."""
    assert reference_checksum(KEY, "example.org", "AbCdEf_123-x") == "oNi1eLQ9IoQ"
    assert heisenbridge.checksum(KEY, MEDIA) == "oNi1eLQ9IoQ"


def _flip(text: str, index: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    replacement = alphabet[(alphabet.index(text[index]) + 1) % 64]
    return text[:index] + replacement + text[index + 1 :]


GOOD = heisenbridge.checksum(KEY, MEDIA)


@pytest.mark.parametrize(
    ("server", "media_id", "given", "verdict"),
    [
        ("example.org", "AbCdEf_123-x", _flip(GOOD, 0), Verdict.FORGED),
        ("example.org", "AbCdEf_123-x", _flip(GOOD, 5), Verdict.FORGED),
        ("example.org", "AbCdEf_123-x", GOOD[:-1], Verdict.MALFORMED),  # truncated
        ("example.org", "AbCdEf_123-x", GOOD + "A", Verdict.MALFORMED),
        ("example.org", "AbCdEf_123-x", GOOD + "=", Verdict.MALFORMED),
        ("example.org", "AbCdEf_123-x", "", Verdict.MALFORMED),
        ("example.org", "AbCdEf_123-y", GOOD, Verdict.FORGED),  # other media
        ("example.com", "AbCdEf_123-x", GOOD, Verdict.FORGED),
        ("example.org", "../../v3/joined_rooms", GOOD, Verdict.MALFORMED),
        ("exa mple.org", "AbCdEf_123-x", GOOD, Verdict.MALFORMED),
        ("example.org", "", GOOD, Verdict.MALFORMED),
    ],
)
def test_refused(server: str, media_id: str, given: str, verdict: Verdict) -> None:
    """Forged, truncated, padded and other-media checksums are refused, with a reason."""
    checked = heisenbridge.verify(KEY, server, media_id, given)
    assert checked.verdict is verdict
    assert checked.media is None
    assert checked.reason


def test_wrong_key() -> None:
    """A link minted with another bridge's media_key is forged here."""
    other = heisenbridge.checksum(b"another-bridge-key", MEDIA)
    assert heisenbridge.verify(KEY, MEDIA.server_name, MEDIA.media_id, other).verdict is (
        Verdict.FORGED
    )


def test_non_canonical_last_character_refused() -> None:
    """The last character carries 4 bits: another spelling of the same bytes is refused."""
    last = GOOD[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = alphabet[alphabet.index(last) + 1]  # same top 4 bits, non-zero padding bits
    checked = heisenbridge.verify(KEY, MEDIA.server_name, MEDIA.media_id, GOOD[:-1] + sibling)
    assert checked.verdict is Verdict.MALFORMED


def test_link_path() -> None:
    """The path heisenbridge's DEFAULT_MEDIA_PATH yields, filename after the checksum."""
    assert heisenbridge.link_path(KEY, MEDIA, "cat.png") == (
        f"_heisenbridge/media/example.org/AbCdEf_123-x/{GOOD}/cat.png"
    )

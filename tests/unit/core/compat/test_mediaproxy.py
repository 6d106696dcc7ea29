"""MediaProxy tokens: real tokens minted by matrix-appservice-bridge 11.2.0, and forgeries.

The fixed tokens below were minted by ``MediaProxy.generateMediaUrl`` of the npm package
``matrix-appservice-bridge`` 11.2.0 (node 20) with the JWK below, imported as
matrix-appservice-irc loads ``signingKeyPath`` (WebCrypto ``importKey("jwk", …,
{name: "HMAC", hash: "SHA-512"})``); tests/integration/test_compat_links.py mints fresh
ones with the same library on every run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct

import pytest

from relay.core.compat import mediaproxy
from relay.core.compat.result import Verdict
from relay.core.mxc import MediaId

JWK = (
    '{"kty": "oct", "k": "kMfFsge8ORxo0ssDwZhA2rDLhzrOmL2oLFFjIAFHYWjB1kKja2Ld0iMvWUaUwLSo'
    'YQnHMcqBhZBzOBXsGVm1jg", "alg": "HS512", "key_ops": ["sign", "verify"], "ext": true}'
)
KEY = mediaproxy.load_jwk(JWK)
MEDIA = MediaId("example.org", "abcDEF_123")
NOW = 1_764_583_000.0  # 2025-12-01, before the far-future token's expiry
# ttl 0: no expiry (endDt -1)
NO_EXPIRY = (
    "AYbJbRohmLvN70640juMrqzoOaFZW-tZ199KsZ-sBuEiQ2aLb7brLhjdjPlXxoVi-XJLpFgrpACjWDxOImZ-"
    "xuK_8AAAAAAAAGV4YW1wbGUub3JnL2FiY0RFRl8xMjM"
)
# ttl ten years after 2026-12-01
FAR_FUTURE = (
    "AcSsGL3Plb0DuZ8qs9zjebcHu3k_j8Zelj21tP21QNNtBaYVMQNs2agKgobURcU2KXvojZp3C1bBFchOHLGO"
    "gMpCfrnfQE7wAGV4YW1wbGUub3JnL2FiY0RFRl8xMjM"
)
# ttl -1000 ms: expired when minted (2026-12-01)
EXPIRED = (
    "AdLG3tK96yzDZ4f_Dc_HMji0uD49JWMIlNb-o5eV7OvqPxieYaDl5dDeDKbeGIAdV_VTXszJ9cuDFwwL9LVS"
    "EG1CeiMQhKdAAGV4YW1wbGUub3JnL2FiY0RFRl8xMjM"
)


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_library_tokens_verify() -> None:
    """Tokens the npm library minted verify, with the expiry they carry."""
    checked = mediaproxy.verify(KEY, NO_EXPIRY, NOW)
    assert (checked.verdict, checked.media, checked.expires_at) == (Verdict.VALID, MEDIA, None)
    far = mediaproxy.verify(KEY, FAR_FUTURE, NOW)
    assert (far.verdict, far.media) == (Verdict.VALID, MEDIA)
    assert far.expires_at is not None and far.expires_at > NOW + 9 * 365 * 86400
    expired = mediaproxy.verify(KEY, EXPIRED, NOW + 366 * 86400)
    assert (expired.verdict, expired.media) == (Verdict.EXPIRED, MEDIA)


def test_layout_is_the_documented_one() -> None:
    """0x01, 64-byte HMAC-SHA-512 of (endDt, mxc), endDt as float64 BE ms, then the mxc."""
    raw = _raw(FAR_FUTURE)
    assert raw[0] == 1
    (end_ms,) = struct.unpack(">d", raw[65:73])
    assert raw[73:] == b"example.org/abcDEF_123"
    assert hmac.new(KEY, raw[65:], hashlib.sha512).digest() == raw[1:65]
    assert struct.unpack(">d", _raw(NO_EXPIRY)[65:73]) == (-1.0,)
    assert mediaproxy.encode_token(KEY, MEDIA, end_ms) == FAR_FUTURE
    assert mediaproxy.encode_token(KEY, MEDIA, None) == NO_EXPIRY


def test_expiry_boundary() -> None:
    """Expired when endDt < now (ms), as MediaProxy decides; NaN clock counts as expired."""
    token = mediaproxy.encode_token(KEY, MEDIA, NOW * 1000)
    assert mediaproxy.verify(KEY, token, NOW).verdict is Verdict.VALID
    assert mediaproxy.verify(KEY, token, NOW + 0.001).verdict is Verdict.EXPIRED
    assert mediaproxy.verify(KEY, token, float("nan")).verdict is Verdict.EXPIRED


GOOD = _raw(NO_EXPIRY)


@pytest.mark.parametrize(
    ("token", "verdict"),
    [
        (_b64(GOOD[:5] + bytes([GOOD[5] ^ 1]) + GOOD[6:]), Verdict.FORGED),  # the npm bug
        (_b64(GOOD[:-1] + b"d"), Verdict.FORGED),  # other media, same MAC
        (_b64(GOOD[:65] + struct.pack(">d", 9e15) + GOOD[73:]), Verdict.FORGED),  # re-dated
        (_b64(GOOD[:73]), Verdict.MALFORMED),  # no mxc
        (_b64(GOOD[:40]), Verdict.MALFORMED),  # truncated
        (_b64(b"\x02" + GOOD[1:]), Verdict.MALFORMED),  # version 2 (PR #527) not supported
        (_b64(b"\x00" + GOOD[1:]), Verdict.MALFORMED),
        (NO_EXPIRY + "=", Verdict.MALFORMED),
        (NO_EXPIRY[:-1] + "+", Verdict.MALFORMED),
        ("", Verdict.MALFORMED),
        ("A" * 2000, Verdict.MALFORMED),
    ],
)
def test_refused(token: str, verdict: Verdict) -> None:
    """Flipped signature bytes, re-dated, truncated and other-version tokens are refused."""
    checked = mediaproxy.verify(KEY, token, NOW)
    assert checked.verdict is verdict
    assert checked.reason


def test_wrong_key() -> None:
    """A token of another bridge's key is forged here."""
    other = mediaproxy.load_jwk(json.dumps({"kty": "oct", "k": _b64(b"x" * 64), "alg": "HS512"}))
    assert mediaproxy.verify(other, NO_EXPIRY, NOW).verdict is Verdict.FORGED


@pytest.mark.parametrize(
    ("mxc", "end"),
    [(b"example.org/../../v3/joined_rooms", -1.0), (b"example.org", -1.0), (b"\xff/x", -1.0)],
)
def test_signed_but_invalid_mxc_is_malformed(mxc: bytes, end: float) -> None:
    """Even a correctly signed token never sends an invalid mxc upstream."""
    dt = struct.pack(">d", end)
    token = _b64(b"\x01" + hmac.new(KEY, dt + mxc, hashlib.sha512).digest() + dt + mxc)
    assert mediaproxy.verify(KEY, token, NOW).verdict is Verdict.MALFORMED


@pytest.mark.parametrize("end", [float("nan"), float("inf"), -2.0])
def test_signed_but_nonsense_expiry_is_malformed(end: float) -> None:
    """An expiry that is no time is refused, never taken as 'no expiry'."""
    dt = struct.pack(">d", end)
    mxc = b"example.org/abcDEF_123"
    token = _b64(b"\x01" + hmac.new(KEY, dt + mxc, hashlib.sha512).digest() + dt + mxc)
    assert mediaproxy.verify(KEY, token, NOW).verdict is Verdict.MALFORMED


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"kty": "RSA", "k": "AAAA"}', "kty"),
        ('{"kty": "oct", "k": "AAAA", "alg": "HS256"}', "HS512"),
        ('{"kty": "oct"}', "missing"),
        ('{"kty": "oct", "k": "A==="}', "base64url"),
        ('{"kty": "oct", "k": "AAAA"}', "at least"),
    ],
)
def test_bad_jwk(text: str, reason: str) -> None:
    """A key file the relay cannot use says why."""
    with pytest.raises(mediaproxy.InvalidJwk, match=reason):
        mediaproxy.load_jwk(text)

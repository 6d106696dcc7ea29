"""mxc parsing: the server-name grammar, and one canonical spelling per server name."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.mxc import (
    InvalidMxc,
    MediaId,
    canonical_server_name,
    is_canonical_server_name,
    parse_mxc,
)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("example.org", "example.org"),
        ("Example.ORG", "example.org"),
        ("EXAMPLE.org:8448", "example.org:8448"),
        ("example.org:0443", "example.org:443"),
        ("example.org:443", "example.org:443"),  # not merged with "example.org"
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("1.2.3.4", "1.2.3.4"),
        ("1.2.3.4:80", "1.2.3.4:80"),
        ("[::1]", "[::1]"),
        ("[0:0:0:0:0:0:0:1]:8448", "[::1]:8448"),
        ("[2001:DB8::A]", "[2001:db8::a]"),
        ("localhost", "localhost"),
    ],
)
def test_canonical(given: str, canonical: str) -> None:
    """Case, IPv6 spelling and port zeros are normalised; an explicit port stays."""
    assert canonical_server_name(given) == canonical
    assert is_canonical_server_name(canonical)
    assert parse_mxc(f"mxc://{given}/abc") == MediaId(canonical, "abc")


@pytest.mark.parametrize(
    "given",
    [
        "",
        "example.org.",
        "bücher.example",
        "010.0.0.1",
        "999.1.1.1",
        "example.org:0",
        "example.org:65536",
        "[::1",
        "[::1]x",
        "[fe80::1%eth0]",
        "exa_mple.org",
        "a..b",
    ],
)
def test_invalid(given: str) -> None:
    """Names outside the grammar (Unicode, trailing dot, octal-looking IPv4) are refused."""
    assert canonical_server_name(given) is None
    with pytest.raises(InvalidMxc):
        parse_mxc(f"mxc://{given}/abc")


def test_spellings_are_one_media() -> None:
    """Differently cased mentions of one media are equal (one cache key, one revocation)."""
    assert parse_mxc("mxc://Example.Org/abc") == parse_mxc("mxc://example.org/abc")
    assert parse_mxc("mxc://example.org/abc") != parse_mxc("mxc://example.org:443/abc")
    assert parse_mxc("mxc://example.org/ABC") != parse_mxc("mxc://example.org/abc")


def test_links_carry_only_canonical_names() -> None:
    """A non-canonical server name is neither signed nor accepted in a token."""
    from relay.core.signing import KeyRing, LinkClaims, SigningKey, Verdict, sign, verify

    ring = KeyRing([SigningKey("k1", b"s" * 32)])
    with pytest.raises(ValueError, match="non-canonical"):
        sign(ring, LinkClaims(MediaId("Example.org", "abc"), None, None, 2_000_000_000))
    token = sign(ring, LinkClaims(MediaId("example.org", "abc"), None, None, 2_000_000_000))
    assert verify(ring, token, None, 1_000_000_000).verdict is Verdict.VALID


@given(
    st.text(alphabet="abcXYZ019-.:[]", min_size=1, max_size=30)
    | st.ip_addresses().map(lambda ip: f"[{ip}]" if ip.version == 6 else str(ip))
)
def test_canonical_is_idempotent_and_case_blind(name: str) -> None:
    """Canonical names are fixed points, and a name's case never changes its canonical form."""
    canonical = canonical_server_name(name)
    if canonical is None:
        return
    assert canonical_server_name(canonical) == canonical
    assert canonical_server_name(name.upper()) == canonical
    assert canonical_server_name(name.lower()) == canonical

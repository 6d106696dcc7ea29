"""Signed-URL tokens: round trips, tampering, rotation, expiry and strict parsing."""

from __future__ import annotations

import string
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.mxc import MediaId
from relay.core.records import reference_tag
from relay.core.signing import (
    KeyRing,
    LinkClaims,
    SigningKey,
    Verdict,
    Verification,
    build_url,
    link_path,
    sign,
    verify,
)
from relay.core.variant import Thumbnail, Variant

KEY_A = SigningKey("a", b"A" * 32)
KEY_B = SigningKey("key-B_2", bytes(range(48)))
RING = KeyRing([KEY_A])
NOW = 1_700_000_000.0
EXPIRES = 1_700_003_600
TYPICAL_MEDIA = MediaId("matrix.example.org", "AbCdEfGhIjKlMnOpQrStUvWx")
TOKEN_ALPHABET = string.ascii_letters + string.digits + "_.-"


def claims(
    media: MediaId = TYPICAL_MEDIA,
    variant: Variant = None,
    filename: str | None = None,
    expires_at: int = EXPIRES,
    reference: str | None = None,
) -> LinkClaims:
    return LinkClaims(media, variant, filename, expires_at, reference)


ROUND_TRIP_CASES = [
    pytest.param(claims(), id="original-no-filename"),
    pytest.param(claims(filename="cat.png"), id="original-ascii-filename"),
    pytest.param(claims(variant=Thumbnail(96, 96, "crop")), id="thumbnail-crop"),
    pytest.param(
        claims(variant=Thumbnail(800, 600, "scale", animated=True), filename="x.gif"),
        id="thumbnail-animated-with-filename",
    ),
    pytest.param(claims(variant=Thumbnail(1, 65535, "scale")), id="thumbnail-extreme-sides"),
    pytest.param(claims(filename="Grüße 🐱 / ;\"'.png"), id="unicode-filename"),
    pytest.param(claims(media=MediaId("[2001:db8::1]:8448", "abc")), id="ipv6-server-port"),
    pytest.param(claims(media=MediaId("[::1]", "a_b-c")), id="ipv6-server"),
    pytest.param(claims(media=MediaId("1.2.3.4:80", "x")), id="ipv4-server-port"),
    pytest.param(claims(media=MediaId("localhost", "x"), expires_at=0), id="expiry-zero"),
]


@pytest.mark.parametrize("link", ROUND_TRIP_CASES)
def test_round_trip(link: LinkClaims) -> None:
    """A freshly signed token verifies as VALID and returns exactly the signed claims."""
    token = sign(RING, link)
    result = verify(RING, token, link.filename, now=link.expires_at - 1)
    assert result == Verification(Verdict.VALID, link)


@pytest.mark.parametrize("link", ROUND_TRIP_CASES)
def test_token_uses_url_safe_characters_only(link: LinkClaims) -> None:
    """Tokens need no escaping in a URL: only [A-Za-z0-9_.-]."""
    token = sign(RING, link)
    assert set(token) <= set(TOKEN_ALPHABET)
    assert token.startswith("1.")


def test_typical_token_is_short() -> None:
    """A token for a typical mxc and a thumbnail variant stays under 200 characters."""
    link = claims(variant=Thumbnail(800, 600, "scale", animated=True), filename="photo.jpg")
    ring = KeyRing([SigningKey("k" * 16, b"s" * 32)])
    assert len(sign(ring, link)) < 200


def test_forged_mac_is_refused() -> None:
    """A token whose MAC was made with another secret (same key id) is FORGED."""
    impostor = KeyRing([SigningKey("a", b"Z" * 32)])
    token = sign(impostor, claims())
    assert verify(RING, token, None, NOW) == Verification(Verdict.FORGED)


@pytest.mark.parametrize("cut", [1, 2, 5, 23, 24])
def test_truncated_token_is_refused(cut: int) -> None:
    """Cutting characters off the end never leaves a VALID token."""
    token = sign(RING, claims())
    result = verify(RING, token[:-cut], None, NOW)
    assert result.verdict in (Verdict.MALFORMED, Verdict.FORGED)
    assert result.claims is None


@pytest.mark.parametrize(
    "link",
    [
        claims(filename="f.txt", variant=Thumbnail(64, 48, "crop")),
        claims(media=MediaId("[::1]:8448", "m")),
    ],
)
def test_every_single_character_change_is_refused(link: LinkClaims) -> None:
    """Replacing, deleting or inserting any one character never yields a VALID token."""
    token = sign(RING, link)
    mutants: set[str] = set()
    for i in range(len(token) + 1):
        if i < len(token):
            mutants.add(token[:i] + token[i + 1 :])
            mutants.update(token[:i] + c + token[i + 1 :] for c in TOKEN_ALPHABET)
        mutants.update(token[:i] + c + token[i:] for c in TOKEN_ALPHABET)
    mutants.discard(token)
    for mutant in mutants:
        result = verify(RING, mutant, link.filename, NOW)
        assert result.verdict is not Verdict.VALID, mutant
        assert result.verdict is not Verdict.EXPIRED, mutant
        assert result.claims is None


def _mutate(token: str, data: st.DataObject) -> str:
    kind = data.draw(st.sampled_from(["insert", "delete", "replace", "swap", "duplicate"]))
    if kind == "swap" or kind == "duplicate":
        fields = token.split(".")
        i = data.draw(st.integers(0, len(fields) - 1))
        j = data.draw(st.integers(0, len(fields) - 1))
        if kind == "swap":
            fields[i], fields[j] = fields[j], fields[i]
        else:
            fields.insert(i, fields[j])
        return ".".join(fields)
    alphabet = st.sampled_from(TOKEN_ALPHABET) | st.characters()
    if kind == "insert":
        i = data.draw(st.integers(0, len(token)))
        return token[:i] + data.draw(alphabet) + token[i:]
    i = data.draw(st.integers(0, len(token) - 1))
    if kind == "delete":
        return token[:i] + token[i + 1 :]
    return token[:i] + data.draw(alphabet) + token[i + 1 :]


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    variant=st.none()
    | st.builds(
        Thumbnail,
        st.integers(1, 65535),
        st.integers(1, 65535),
        st.sampled_from(["crop", "scale"]),
        st.booleans(),
    ),
    filename=st.none()
    | st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20).filter(
        lambda s: s not in (".", "..")
    ),
)
def test_no_mutation_verifies(data: st.DataObject, variant: Variant, filename: str | None) -> None:
    """No insert/delete/replace/field swap of a valid token verifies, under any filename."""
    token = sign(RING, claims(variant=variant, filename=filename))
    mutant = _mutate(token, data)
    if mutant == token:
        return
    other_filename = data.draw(st.sampled_from([filename, None, "x", "cat.png"]))
    result = verify(RING, mutant, other_filename, NOW)
    assert result.verdict is not Verdict.VALID
    assert result.verdict is not Verdict.EXPIRED
    assert result.claims is None


def test_key_removed_from_ring_is_refused() -> None:
    """A token signed with a key that has since been removed from the ring is FORGED."""
    old_ring = KeyRing([KEY_A])
    new_ring = KeyRing([KEY_B])
    token = sign(old_ring, claims())
    assert verify(new_ring, token, None, NOW) == Verification(Verdict.FORGED)


def test_rotation_keeps_old_links_valid() -> None:
    """A token signed by key A still verifies after rotation to ring [B, A]."""
    link = claims(filename="a.png")
    token = sign(KeyRing([KEY_A]), link)
    rotated = KeyRing([KEY_B, KEY_A])
    assert verify(rotated, token, "a.png", NOW) == Verification(Verdict.VALID, link)
    assert rotated.signing_key == KEY_B
    assert sign(rotated, link).split(".")[1] == KEY_B.key_id


def test_unknown_key_id_is_forged() -> None:
    """A well-formed token naming a key id the ring does not hold is FORGED."""
    token = sign(KeyRing([SigningKey("zz", b"A" * 32)]), claims())
    assert verify(RING, token, None, NOW) == Verification(Verdict.FORGED)


@pytest.mark.parametrize(
    ("now", "verdict"),
    [
        (EXPIRES - 1, Verdict.VALID),
        (EXPIRES - 0.001, Verdict.VALID),
        (EXPIRES, Verdict.EXPIRED),
        (EXPIRES + 0.5, Verdict.EXPIRED),
        (EXPIRES + 86400, Verdict.EXPIRED),
        (float("nan"), Verdict.EXPIRED),
        (float("inf"), Verdict.EXPIRED),
    ],
)
def test_expiry_boundary(now: float, verdict: Verdict) -> None:
    """A link is expired from its expires_at second on (now >= expires_at), claims kept."""
    link = claims()
    assert verify(RING, sign(RING, link), None, now) == Verification(verdict, link)


def test_expiry_is_checked_only_after_the_mac() -> None:
    """An expired token with a bad MAC is FORGED, not EXPIRED: nothing leaks unsigned."""
    token = sign(KeyRing([SigningKey("a", b"Q" * 32)]), claims(expires_at=10))
    assert verify(RING, token, None, NOW) == Verification(Verdict.FORGED)


@pytest.mark.parametrize(
    ("signed", "presented"),
    [
        ("cat.png", "dog.png"),
        ("cat.png", None),
        (None, "cat.png"),
        ("cat.png", "Cat.png"),
        ("cat.png", "cat.png "),
        ("cat.png", ""),
        ("a/b", "b"),
        ("cat.png", "cat\udcff.png"),
    ],
)
def test_filename_mismatch_is_forged(signed: str | None, presented: str | None) -> None:
    """The filename is covered by the MAC: any other (or missing) name is FORGED."""
    token = sign(RING, claims(filename=signed))
    assert verify(RING, token, presented, NOW) == Verification(Verdict.FORGED)


VALID_TOKEN = sign(RING, claims(variant=Thumbnail(64, 48, "crop")))
_FIELDS = VALID_TOKEN.split(".")


def _with_field(index: int, value: str) -> str:
    fields = list(_FIELDS)
    fields[index] = value
    return ".".join(fields)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("", id="empty"),
        pytest.param("1.", id="version-only"),
        pytest.param("garbage", id="garbage"),
        pytest.param("1.a.b.c.d.e.f", id="seven-junk-fields"),
        pytest.param("x" * 10_000, id="10kB"),
        pytest.param(VALID_TOKEN + "." + "x" * 1100, id="over-1KiB"),
        pytest.param(VALID_TOKEN.replace("a", "ä", 1), id="non-ascii"),
        pytest.param(VALID_TOKEN + ".", id="extra-empty-field"),
        pytest.param(VALID_TOKEN + ".x", id="extra-field"),
        pytest.param(VALID_TOKEN.rsplit(".", 1)[0], id="no-mac"),
        pytest.param(_with_field(0, "2"), id="unknown-version"),
        pytest.param(_with_field(0, "01"), id="version-leading-zero"),
        pytest.param(_with_field(1, ""), id="empty-key-id"),
        pytest.param(_with_field(1, "k" * 17), id="key-id-too-long"),
        pytest.param(_with_field(2, "0" + _FIELDS[2]), id="expiry-leading-zero"),
        pytest.param(_with_field(2, "-" + _FIELDS[2]), id="expiry-negative"),
        pytest.param(_with_field(2, "1e9"), id="expiry-not-integer"),
        pytest.param(_with_field(2, "9" * 13), id="expiry-too-many-digits"),
        pytest.param(_with_field(2, ""), id="expiry-empty"),
        pytest.param(_with_field(3, "x64x48"), id="unknown-method"),
        pytest.param(_with_field(3, "c0x48"), id="width-zero"),
        pytest.param(_with_field(3, "c064x48"), id="width-leading-zero"),
        pytest.param(_with_field(3, "c65536x48"), id="width-too-big"),
        pytest.param(_with_field(3, "c64x99999"), id="height-too-big"),
        pytest.param(_with_field(3, "c64x48b"), id="unknown-variant-flag"),
        pytest.param(_with_field(3, "c64"), id="variant-no-height"),
        pytest.param(_with_field(3, ""), id="variant-empty"),
        pytest.param(_with_field(3, "O"), id="variant-uppercase-original"),
        pytest.param(_with_field(4, ""), id="server-empty"),
        pytest.param(_with_field(4, "a_x"), id="server-unknown-escape"),
        pytest.param(_with_field(4, "a_"), id="server-dangling-escape"),
        pytest.param(_with_field(4, "_d_d"), id="server-dot-dot"),
        pytest.param(_with_field(4, "-bad-"), id="server-bad-label"),
        pytest.param(_with_field(4, "_l_c_c1"), id="server-unclosed-ipv6"),
        pytest.param(_with_field(4, "host_c99999"), id="server-bad-port"),
        pytest.param(_with_field(5, ""), id="media-id-empty"),
        pytest.param(_with_field(5, "m" * 256), id="media-id-too-long"),
        pytest.param(_with_field(6, _FIELDS[6][:-1]), id="mac-short"),
        pytest.param(_with_field(6, _FIELDS[6] + "A"), id="mac-long"),
        pytest.param(_with_field(6, _FIELDS[6][:-1] + "="), id="mac-padding"),
        pytest.param(_with_field(6, _FIELDS[6][:-2] + "=="), id="mac-double-padding"),
    ],
)
def test_malformed_tokens(token: str) -> None:
    """Garbage of every kind is MALFORMED (never an exception, never claims)."""
    assert verify(RING, token, None, NOW) == Verification(Verdict.MALFORMED)


@pytest.mark.parametrize("token", [None, 17, b"1.a.b", ["1"]])
def test_non_string_token_is_malformed(token: object) -> None:
    """verify is total even for values that are not strings at all."""
    assert verify(RING, token, None, NOW) == Verification(Verdict.MALFORMED)  # type: ignore[arg-type]


def test_valid_token_fixture_is_valid() -> None:
    """The token the malformed table mutates is itself VALID (so the table tests parsing)."""
    assert verify(RING, VALID_TOKEN, None, NOW).verdict is Verdict.VALID


@pytest.mark.parametrize(
    ("key_id", "secret"),
    [
        ("", b"s" * 32),
        ("k" * 17, b"s" * 32),
        ("a.b", b"s" * 32),
        ("a/b", b"s" * 32),
        ("ключ", b"s" * 32),
        ("ok", b"s" * 31),
        ("ok", b""),
        ("ok", "s" * 32),
    ],
)
def test_signing_key_validation(key_id: str, secret: bytes) -> None:
    """Key ids are 1-16 URL-safe characters and secrets are at least 32 bytes."""
    with pytest.raises(ValueError, match="signing key"):
        SigningKey(key_id, secret)


def test_signing_key_repr_hides_secret() -> None:
    """Neither repr nor str of a key (nor of a ring) shows the secret."""
    key = SigningKey("visible", b"TOPSECRET-" + b"x" * 30)
    for text in (repr(key), str(key), repr(KeyRing([key]))):
        assert "visible" in text
        assert "TOPSECRET" not in text
        assert "xxxx" not in text


def test_key_ring_validation() -> None:
    """A ring needs at least one key and unique key ids."""
    with pytest.raises(ValueError, match="at least one"):
        KeyRing([])
    with pytest.raises(ValueError, match="duplicate"):
        KeyRing([KEY_A, SigningKey("a", b"other" * 8)])


@pytest.mark.parametrize(
    "link",
    [
        pytest.param(claims(media=MediaId("bad..server", "x")), id="bad-server"),
        pytest.param(claims(media=MediaId("example.org", "../x")), id="bad-media-id"),
        pytest.param(claims(variant=Thumbnail(0, 10, "crop")), id="width-zero"),
        pytest.param(claims(variant=Thumbnail(10, 65536, "crop")), id="height-too-big"),
        pytest.param(claims(variant=Thumbnail(10, 10, "stretch")), id="bad-method"),  # type: ignore[arg-type]
        pytest.param(claims(variant=Thumbnail(True, 10, "crop")), id="bool-width"),
        pytest.param(claims(expires_at=-1), id="negative-expiry"),
        pytest.param(claims(expires_at=10**12), id="huge-expiry"),
        pytest.param(claims(expires_at=1.5), id="float-expiry"),  # type: ignore[arg-type]
        pytest.param(claims(filename=""), id="empty-filename"),
        pytest.param(claims(filename=".."), id="dot-dot-filename"),
        pytest.param(claims(filename="\udcff"), id="surrogate-filename"),
    ],
)
def test_sign_refuses_claims_it_could_not_verify(link: LinkClaims) -> None:
    """sign raises ValueError rather than minting a token that can never be VALID."""
    with pytest.raises(ValueError):
        sign(RING, link)


@pytest.mark.parametrize(
    ("base_url", "filename", "expected"),
    [
        ("https://relay.example/media/", None, "https://relay.example/media/TOKEN"),
        ("https://relay.example/media", None, "https://relay.example/media/TOKEN"),
        ("https://relay.example", "a.png", "https://relay.example/TOKEN/a.png"),
        ("https://relay.example/", "a.png", "https://relay.example/TOKEN/a.png"),
        (
            "https://relay.example/media/",
            "name with spaces.png",
            "https://relay.example/media/TOKEN/name%20with%20spaces.png",
        ),
        (
            "https://relay.example/media",
            "a;b;c.txt",
            "https://relay.example/media/TOKEN/a%3Bb%3Bc.txt",
        ),
        (
            "https://relay.example/media",
            "🐱.png",
            "https://relay.example/media/TOKEN/%F0%9F%90%B1.png",
        ),
        ("https://relay.example/media", "../x/y", "https://relay.example/media/TOKEN/..%2Fx%2Fy"),
        ("https://relay.example/media", "a?b#c%", "https://relay.example/media/TOKEN/a%3Fb%23c%25"),
    ],
)
def test_build_url(base_url: str, filename: str | None, expected: str) -> None:
    """The filename is one percent-encoded path segment after the token, under any prefix."""
    url = build_url(base_url, "TOKEN", filename)
    assert url == expected
    path = urlsplit(url).path
    assert not urlsplit(url).query
    assert not urlsplit(url).fragment
    if filename is not None:
        assert unquote(path.rsplit("/", 1)[1]) == filename
        assert path.rsplit("/", 2)[1] == "TOKEN"


@pytest.mark.parametrize("filename", ["", ".", ".."])
def test_link_path_refuses_dot_segments(filename: str) -> None:
    """Empty, '.' and '..' cannot be one path segment (browsers resolve them away)."""
    with pytest.raises(ValueError):
        link_path("TOKEN", filename)


def test_build_url_round_trip_through_verify() -> None:
    """A filename taken back out of a built URL verifies against the token in it."""
    link = claims(filename="My photo; 🐱 / final.png")
    url = build_url("https://relay.example/media/", sign(RING, link), link.filename)
    token, segment = urlsplit(url).path.split("/")[-2:]
    assert verify(RING, token, unquote(segment), NOW) == Verification(Verdict.VALID, link)


# -- links bound to a reference (version 2) ------------------------------------------

REFERENCE = reference_tag("$event:example.org")


def test_bound_link_round_trips_as_version_2() -> None:
    """A reference goes into a version-2 token and comes back out, covered by the MAC."""
    bound = claims(filename="cat.png", reference=REFERENCE)
    token = sign(RING, bound)
    assert token.startswith("2.") and token.split(".")[6] == REFERENCE
    result = verify(RING, token, "cat.png", NOW)
    assert (result.verdict, result.claims) == (Verdict.VALID, bound)


def test_unbound_link_stays_version_1() -> None:
    """Without a reference the token is the version-1 format, and verifies as before."""
    token = sign(RING, claims())
    assert token.startswith("1.") and len(token.split(".")) == 7
    result = verify(RING, token, None, NOW)
    assert result.verdict is Verdict.VALID and result.claims is not None
    assert result.claims.reference is None


@pytest.mark.parametrize(
    "change",
    [
        lambda f: [*f[:6], reference_tag("$other:example.org"), *f[7:]],  # another reference
        lambda f: ["1", *f[1:6], f[7]],  # reference dropped, version downgraded
        lambda f: f[:6] + f[7:],  # reference dropped, still version 2
        lambda f: ["1", *f[1:]],  # version 1 with eight fields
        lambda f: [*f[:6], "short", *f[7:]],  # not a tag
    ],
)
def test_bound_link_cannot_be_rebound(change: object) -> None:
    """Changing, dropping or downgrading the reference is refused (forged or malformed)."""
    fields = sign(RING, claims(reference=REFERENCE)).split(".")
    tampered = ".".join(change(fields))  # type: ignore[operator]
    assert verify(RING, tampered, None, NOW).verdict in (Verdict.FORGED, Verdict.MALFORMED)


def test_sign_refuses_a_reference_that_is_not_a_tag() -> None:
    """Only a reference tag can be bound."""
    with pytest.raises(ValueError):
        sign(RING, claims(reference="$event:example.org"))

"""Range, If-None-Match and If-Range decisions (RFC 9110 sections 13 and 14)."""

from __future__ import annotations

import pytest

from relay.http.ranges import (
    ByteRange,
    RangeNotSatisfiable,
    none_match,
    parse_range,
    range_applies,
)

HUGE = "9" * 5000  # past Python's int() digit limit: must not raise ValueError


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-0", 10, ByteRange(0, 0)),
        ("bytes=0-9", 10, ByteRange(0, 9)),
        ("bytes=2-5", 10, ByteRange(2, 5)),
        ("bytes=5-", 10, ByteRange(5, 9)),
        ("bytes=9-", 10, ByteRange(9, 9)),
        ("bytes=0-", 10, ByteRange(0, 9)),
        ("bytes=-3", 10, ByteRange(7, 9)),
        ("bytes=-10", 10, ByteRange(0, 9)),
        ("bytes=-11", 10, ByteRange(0, 9)),
        ("bytes=3-3", 10, ByteRange(3, 3)),
        # The end is clamped to the last byte (RFC 9110 section 14.1.2).
        ("bytes=5-100", 10, ByteRange(5, 9)),
        ("bytes=0-99999999999999999999999", 10, ByteRange(0, 9)),
        (f"bytes=0-{HUGE}", 10, ByteRange(0, 9)),
        (f"bytes=-{HUGE}", 10, ByteRange(0, 9)),
        ("bytes=0005-0007", 10, ByteRange(5, 7)),
        ("bytes=-0003", 10, ByteRange(7, 9)),
        # Unit is case-insensitive; OWS around the list elements is allowed, empty ones ignored.
        ("Bytes=1-2", 10, ByteRange(1, 2)),
        ("BYTES=1-2", 10, ByteRange(1, 2)),
        ("  bytes=1-2  ", 10, ByteRange(1, 2)),
        ("bytes= 1-2", 10, ByteRange(1, 2)),
        ("bytes=1-2 ,", 10, ByteRange(1, 2)),
        ("bytes=, 1-2", 10, ByteRange(1, 2)),
        ("bytes=\t1-2\t", 10, ByteRange(1, 2)),
        # Ignored: the whole body is served.
        (None, 10, None),
        ("", 10, None),
        ("bytes", 10, None),
        ("bytes=", 10, None),
        ("bytes=,", 10, None),
        ("bytes =1-2", 10, None),
        ("bytes=1 - 2", 10, None),
        ("bytes=1- 2", 10, None),
        ("bytes=5-2", 10, None),
        ("bytes=-", 10, None),
        ("bytes=--5", 10, None),
        ("bytes=-5-10", 10, None),
        ("bytes=-1-", 10, None),
        ("bytes=+1-2", 10, None),
        ("bytes=1-+2", 10, None),
        ("bytes=0x10-20", 10, None),
        ("bytes=1.5-2", 10, None),
        ("bytes=a-b", 10, None),
        ("bytes=\uff11-\uff12", 10, None),  # fullwidth digits
        ("bytes=1-2;x", 10, None),
        ("bytes==1-2", 10, None),
        ("items=0-1", 10, None),
        ("bits=0-1", 10, None),
        ("0-1", 10, None),
        (f"bytes={HUGE}-1", 10, None),
        ("bytes=" + ",".join(["0-1"] * 2000), 10, None),
        # Several ranges: served whole rather than as multipart/byteranges.
        ("bytes=0-1,2-3", 10, None),
        ("bytes=0-1, 5-", 10, None),
        ("bytes=0-1,-2", 10, None),
        ("bytes=0-1,0-1", 10, None),
        ("bytes=20-30,40-50", 10, None),
        # Zero-length body: a non-zero suffix is satisfiable (RFC 9110 section 14.1.3) yet
        # names no byte, so the empty whole is served.
        ("bytes=-5", 0, None),
        ("bytes=5-2", 0, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: ByteRange | None) -> None:
    """One valid byte range is returned (end clamped); anything else means the whole body."""
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=10-", 10),
        ("bytes=10-20", 10),
        ("bytes=11-12", 10),
        ("bytes=99999999999999999999999-", 10),
        (f"bytes={HUGE}-", 10),
        ("bytes=-0", 10),
        ("bytes=-000", 10),
        ("bytes=0-", 0),
        ("bytes=0-0", 0),
        ("bytes=-0", 0),
    ],
)
def test_unsatisfiable_range(header: str, size: int) -> None:
    """A valid range that selects no byte raises RangeNotSatisfiable (answer 416)."""
    with pytest.raises(RangeNotSatisfiable) as caught:
        parse_range(header, size)
    assert caught.value.size == size
    assert caught.value.content_range == f"bytes */{size}"


@pytest.mark.parametrize(
    ("byte_range", "size", "length", "content_range"),
    [
        (ByteRange(0, 0), 1, 1, "bytes 0-0/1"),
        (ByteRange(0, 9), 10, 10, "bytes 0-9/10"),
        (ByteRange(7, 9), 10, 3, "bytes 7-9/10"),
        (ByteRange(100, 199), 1000, 100, "bytes 100-199/1000"),
    ],
)
def test_byte_range_length_and_content_range(
    byte_range: ByteRange, size: int, length: int, content_range: str
) -> None:
    """Ends are inclusive: length is end - start + 1, Content-Range as RFC 9110 section 14.4."""
    assert byte_range.length == length
    assert byte_range.content_range(size) == content_range


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (5, 4), (0, -1)])
def test_byte_range_refuses_impossible_ranges(start: int, end: int) -> None:
    """A ByteRange with a negative start or an end before its start cannot be built."""
    with pytest.raises(ValueError, match="invalid byte range"):
        ByteRange(start, end)


ETAG = '"' + "ab" * 32 + '"'
OPAQUE = "ab" * 32


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        (None, False),
        ("", False),
        ("   ", False),
        ("*", True),
        (" * ", True),
        (ETAG, True),
        (f"W/{ETAG}", True),
        (f' "other", {ETAG}', True),
        (f'"other",{ETAG}', True),
        (f'"a,b", W/{ETAG} , "c"', True),
        (f"{ETAG},", True),
        (f", ,{ETAG}", True),
        ('"other"', False),
        ('W/"other"', False),
        ('"a", "b"', False),
        (OPAQUE, False),
        (f"w/{ETAG}", False),
        (f'"{OPAQUE}', False),
        (f"{ETAG}x", False),
        (f'"other" junk, {ETAG}', False),
        (f'"x"y{ETAG}', False),
        (f"*, {ETAG}", False),
        ('"' + OPAQUE.upper() + '"', False),
        (f'"{OPAQUE} "', False),
        ('"a", ' * 2000 + ETAG, False),  # past the header length cap
    ],
)
def test_none_match(header: str | None, matches: bool) -> None:
    """If-None-Match uses weak comparison over a list, '*' matches; malformed never matches."""
    assert none_match(header, ETAG) is matches


def test_none_match_with_weak_current_etag() -> None:
    """Weak comparison also ignores W/ on the current entity tag."""
    assert none_match('"v1"', 'W/"v1"') is True
    assert none_match('"v2"', 'W/"v1"') is False


@pytest.mark.parametrize(
    ("header", "applies"),
    [
        (None, True),
        (ETAG, True),
        (f"  {ETAG} ", True),
        (f"W/{ETAG}", False),
        ('"other"', False),
        (f"{ETAG}, {ETAG}", False),
        ("Wed, 21 Oct 2015 07:28:00 GMT", False),
        ("", False),
        ("*", False),
        (OPAQUE, False),
        ('"' + OPAQUE.upper() + '"', False),
    ],
)
def test_range_applies(header: str | None, applies: bool) -> None:
    """If-Range needs a strong, equal entity tag; dates, weak tags and junk ignore Range."""
    assert range_applies(header, ETAG) is applies


def test_range_applies_never_with_weak_current_etag() -> None:
    """Strong comparison: a weak current entity tag never lets a range through If-Range."""
    assert range_applies('"v1"', 'W/"v1"') is False
    assert range_applies('W/"v1"', 'W/"v1"') is False

"""Range and conditional requests (RFC 9110 sections 13 and 14), as pure decisions.

Order of evaluation for a GET (RFC 9110 section 13.2.2): first :func:`none_match`
(true → 304 Not Modified), then, only when a Range header is present,
:func:`range_applies` for If-Range (false → ignore Range, 200), then
:func:`parse_range` (``None`` → 200 with the whole body, a :class:`ByteRange` → 206,
:class:`RangeNotSatisfiable` → 416).

Only one range is served. A request for several ranges gets the whole body (200), which
RFC 9110 section 14.2 allows ("A server MAY ignore the Range header field"): clients
that play or resume media ask for one range, and multipart/byteranges responses are
the tool of the overlapping-ranges amplification attacks of RFC 9110 section 17.15.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 9110 section 5.6.3: OWS = *( SP / HTAB ).
_OWS = " \t"
_INT_RANGE = re.compile(r"([0-9]+)-([0-9]*)")
_SUFFIX_RANGE = re.compile(r"-([0-9]+)")
# RFC 9110 section 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE,
# etagc = %x21 / %x23-7E / obs-text (commas are etagc, so lists need a real tokenizer).
_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
# aiohttp's own header line limit (8190); past it nothing is parsed and the header is ignored.
MAX_HEADER_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A satisfiable byte range, both ends inclusive (RFC 9110 section 14.1.2)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"invalid byte range {self.start}-{self.end}")

    @property
    def length(self) -> int:
        """The number of bytes in the range."""
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        """The ``Content-Range`` value of a 206 response (RFC 9110 section 14.4)."""
        return f"bytes {self.start}-{self.end}/{size}"


class RangeNotSatisfiable(Exception):
    """The range is valid but selects no byte: answer 416 with :attr:`content_range`."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for a representation of {size} bytes")
        self.size = size

    @property
    def content_range(self) -> str:
        """The ``Content-Range`` value of the 416 response (RFC 9110 section 15.5.17)."""
        return f"bytes */{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range a ``Range`` header asks of a ``size``-byte body.

    ``None`` means "serve the whole body with 200": no header, another unit, a
    syntactically invalid header (RFC 9110 section 14.2 lets a server ignore it), or
    several ranges (see the module docstring). The end is clamped to the last byte.
    Raises :class:`RangeNotSatisfiable` when the one range selects nothing: a first
    byte at or past the end, or a zero-length suffix.
    """
    if header is None or len(header) > MAX_HEADER_LENGTH or not header.isascii():
        return None
    unit, equals, range_set = header.strip(_OWS).partition("=")
    # RFC 9110 section 14.1: range units are compared case-insensitively.
    if not equals or unit.lower() != "bytes":
        return None
    # RFC 9110 section 5.6.1: list elements are separated by OWS "," OWS, and a
    # recipient ignores empty elements.
    specs = [spec.strip(_OWS) for spec in range_set.split(",")]
    specs = [spec for spec in specs if spec]
    if len(specs) != 1:
        return None
    spec = specs[0]
    if match := _INT_RANGE.fullmatch(spec):
        first, last = match.group(1), match.group(2)
        if last and _compare_digits(last, first) < 0:
            # RFC 9110 section 14.1.1: last-pos below first-pos makes the spec invalid.
            return None
        if _compare_digits(first, str(size)) >= 0:
            raise RangeNotSatisfiable(size)
        start = int(first)
        end = size - 1 if not last or _compare_digits(last, str(size)) >= 0 else int(last)
        return ByteRange(start, end)
    if match := _SUFFIX_RANGE.fullmatch(spec):
        suffix = match.group(1)
        if _compare_digits(suffix, "0") == 0:
            raise RangeNotSatisfiable(size)
        if size == 0:
            # RFC 9110 section 14.1.3: on an empty body a non-zero suffix is satisfiable,
            # but no Content-Range can name an empty range, so send the (empty) whole.
            return None
        length = size if _compare_digits(suffix, str(size)) >= 0 else int(suffix)
        return ByteRange(size - length, size - 1)
    return None


def _compare_digits(a: str, b: str) -> int:
    """Compare two decimal digit strings as numbers, without int() on huge inputs."""
    a, b = a.lstrip("0") or "0", b.lstrip("0") or "0"
    if len(a) != len(b):
        return -1 if len(a) < len(b) else 1
    return (a > b) - (a < b)


def _entity_tags(header: str) -> list[tuple[bool, str]] | None:
    """``[(weak, opaque_tag), ...]`` of a comma-separated list, or ``None`` if malformed."""
    tags: list[tuple[bool, str]] = []
    position, length = 0, len(header)
    while position < length:
        char = header[position]
        if char in _OWS or char == ",":
            position += 1
            continue
        match = _ENTITY_TAG.match(header, position)
        if match is None:
            return None
        tags.append((match.group(1) is not None, match.group(2)))
        position = match.end()
        # Only a separator (or the end) may follow a tag.
        if position < length and header[position] not in _OWS + ",":
            return None
    return tags


def none_match(if_none_match: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` matches the current ``etag`` (true → 304 Not Modified).

    RFC 9110 section 13.1.2: ``*`` matches any current representation; otherwise a
    list of entity tags, compared with the weak comparison (``W/`` ignored). A
    malformed header matches nothing, so the body is sent rather than withheld.
    """
    if if_none_match is None or len(if_none_match) > MAX_HEADER_LENGTH:
        return False
    if if_none_match.strip(_OWS) == "*":
        return True
    current = _entity_tags(etag)
    tags = _entity_tags(if_none_match)
    if not current or len(current) != 1 or not tags:
        return False
    opaque = current[0][1]
    return any(tag == opaque for _, tag in tags)


def range_applies(if_range: str | None, etag: str) -> bool:
    """Whether a Range request may be answered with a part (RFC 9110 section 13.1.5).

    No ``If-Range`` → true. An entity tag → true only if it is strong and equal to the
    strong current ``etag`` (strong comparison). A date → false: media responses carry
    no ``Last-Modified``, so a date cannot be a strong validator here. Anything else →
    false, and the whole body is sent, which is always a correct answer.
    """
    if if_range is None:
        return True
    value = if_range.strip(_OWS)
    given = _ENTITY_TAG.fullmatch(value)
    current = _ENTITY_TAG.fullmatch(etag)
    if given is None or current is None:
        return False
    if given.group(1) is not None or current.group(1) is not None:
        return False
    return given.group(2) == current.group(2)

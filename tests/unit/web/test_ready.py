"""relay.web.ready's pure parts: the kept head and the Date line."""

from __future__ import annotations

import pytest
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict

from relay.web.ready import HttpDate, ready_head


def test_the_head_keeps_every_header_but_the_per_request_ones() -> None:
    """Date, Cache-Control, Connection and Content-Length are written per request; the
    body's length, Server and the plan's own headers are kept, in the plan's order."""
    headers = CIMultiDict(
        [
            ("Content-Type", "image/png"),
            ("ETag", '"abc"'),
            ("Cache-Control", "private, max-age=5"),
            ("Date", "Thu, 01 Jan 1970 00:00:00 GMT"),
            ("Connection", "close"),
            ("Content-Length", "1"),
            ("X-Content-Type-Options", "nosniff"),
        ]
    )
    head = ready_head(headers, b"12345")
    assert head is not None
    assert head.body == b"12345"
    assert head.fixed.split(b"\r\n") == [
        b"Content-Length: 5",
        b"Content-Type: image/png",
        b'ETag: "abc"',
        b"X-Content-Type-Options: nosniff",
        b"Server: " + SERVER_SOFTWARE.encode(),
        b"",
    ]


def test_a_missing_content_type_is_aiohttps_default() -> None:
    """A body without a type goes out as application/octet-stream, as aiohttp sends it."""
    head = ready_head(CIMultiDict(), b"x")
    assert head is not None
    assert b"Content-Type: application/octet-stream\r\n" in head.fixed


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Content-Disposition", "inline\r\nSet-Cookie: a=b"),
        ("Content-Disposition", "inline\nX: y"),
        ("Content-Disposition", "in\x00line"),
        ("X-Bad\r\nSet-Cookie", "a"),
        ("X:Colon", "a"),
    ],
)
def test_a_header_that_could_split_the_head_is_refused(name: str, value: str) -> None:
    """CR, LF, NUL or a colon in a name: no head (the caller takes aiohttp's checks)."""
    assert ready_head(CIMultiDict([(name, value)]), b"x") is None


def test_the_date_line_changes_with_the_second() -> None:
    """One formatting per second (RFC 9110 section 5.6.7's IMF-fixdate), new at the next."""
    now = [0.2]
    date = HttpDate(clock=lambda: now[0])
    assert date.line() == b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
    now[0] = 0.9
    assert date.line() == b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
    now[0] = 86_401.0
    assert date.line() == b"Date: Fri, 02 Jan 1970 00:00:01 GMT\r\n"

"""A remembered small file's 200, its head serialised once: head and body in one write.

aiohttp builds every response from scratch: a header multidict filled and checked,
then serialised, then written (on a cached 100 KiB file about a third of the CPU of
a request). A plain GET that the relay answered a moment ago from a cached file of
at most ``SMALL_BODY`` bytes (:mod:`relay.web.public`, step 3) has the same headers
every time but three: ``Date``, ``Cache-Control`` (from the link's own expiry) and
``Connection`` (from the request's version and keep-alive), so the rest is kept as
bytes (:class:`ReadyHead`) and :class:`ReadyAnswer` writes status line, head and body
with one ``writelines`` (``writev`` on uvloop: the body is not copied).

What aiohttp would send is kept: the same headers (``Server`` and ``Date`` included),
``Connection: close`` to an HTTP/1.1 client that asked to close and ``Connection:
keep-alive`` to an HTTP/1.0 one that asked to keep it, and the write waits for the
transport to drain like aiohttp's own. Only plain GETs come here (no HEAD, Range or
If-None-Match), and the public application has no ``on_response_prepare`` signal
that this would skip.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, HttpVersion10, HttpVersion11

# Headers written per request (never kept in the head), lower-cased.
PER_REQUEST = frozenset({"date", "cache-control", "connection", "content-length"})
# aiohttp's rule for header names and values (RFC 9110 section 5.5): no CR, LF or NUL.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_STATUS_LINES = {HttpVersion11: b"HTTP/1.1 200 OK\r\n", HttpVersion10: b"HTTP/1.0 200 OK\r\n"}


@dataclass(frozen=True, slots=True)
class ReadyHead:
    """The fixed header lines of a 200 (each ending in CRLF) and its whole body."""

    fixed: bytes
    body: bytes


def ready_head(headers: Mapping[str, str], body: bytes) -> ReadyHead | None:
    """The head of a 200 with ``headers`` (minus :data:`PER_REQUEST`) and ``body``;
    None when a header could not be written as it is (the caller then takes aiohttp's way)."""
    lines = [f"Content-Length: {len(body)}\r\n"]
    seen = set()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in PER_REQUEST:
            continue
        if ":" in name or _FORBIDDEN.search(name) or _FORBIDDEN.search(value):
            return None
        seen.add(lowered)
        lines.append(f"{name}: {value}\r\n")
    if "server" not in seen:
        lines.append(f"Server: {SERVER_SOFTWARE}\r\n")
    if "content-type" not in seen:
        lines.append("Content-Type: application/octet-stream\r\n")
    return ReadyHead("".join(lines).encode("utf-8"), body)


class HttpDate:
    """The ``Date`` header line of this second (RFC 9110 section 6.6.1), formatted once."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        second = int(self._clock())
        if second != self._second:
            self._line = f"Date: {formatdate(second, usegmt=True)}\r\n".encode()
            self._second = second
        return self._line


class ReadyAnswer(web.StreamResponse):
    """A 200 from a :class:`ReadyHead`: written whole when aiohttp prepares it."""

    def __init__(self, head: ReadyHead, per_request: bytes) -> None:
        """``per_request``: the Date and Cache-Control lines of this answer."""
        super().__init__(status=200)
        self._head = head
        self._per_request = per_request
        self._sent = False
        self._keep = True

    @property
    def prepared(self) -> bool:
        return self._sent

    @property
    def keep_alive(self) -> bool:
        return self._keep

    @property
    def content_length(self) -> int | None:
        return len(self._head.body)

    @content_length.setter
    def content_length(self, value: int | None) -> None:
        raise RuntimeError("a ready answer's length is its body's")

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._sent:
            return None
        transport = request.transport
        if transport is None or transport.is_closing():
            # As aiohttp's writer: the client left; the request ends without an answer.
            raise ConnectionResetError("Cannot write to closing transport")
        keep = self._keep = request.keep_alive
        self._sent = True
        transport.writelines(self.whole(request.version, keep))
        await request.writer.drain()
        return None

    def whole(self, version: HttpVersion, keep: bool) -> tuple[bytes, bytes]:
        """Status line and head, and the body, as written to a client of ``version``
        that keeps the connection (``keep``) or not (also :mod:`relay.web.fast_path`)."""
        status_line = _STATUS_LINES.get(version)
        if status_line is None:
            status_line = f"HTTP/{version.major}.{version.minor} 200 OK\r\n".encode()
        if keep:
            connection = b"Connection: keep-alive\r\n" if version == HttpVersion10 else b""
        else:
            connection = b"Connection: close\r\n" if version == HttpVersion11 else b""
        head = b"".join((status_line, self._head.fixed, self._per_request, connection, b"\r\n"))
        return head, self._head.body

    async def write_eof(self, data: bytes = b"") -> None:
        """Nothing left to write: :meth:`prepare` sent everything."""

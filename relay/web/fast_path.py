"""Remembered plain GETs answered before aiohttp sees them; everything else is aiohttp's.

Why: on a cached small file the relay's own work is already one ready-made write
(:mod:`relay.web.ready`); what is left of a request's CPU is aiohttp's request side
(the parser, the Request object, routing, a task per request). This protocol, made for
each connection of the public listener (:class:`relay.web.listener.LimitedSite`),
reads request heads itself and answers a request only when ALL of these hold:

- the head is complete (up to ``\\r\\n\\r\\n``), at most :data:`MAX_HEAD` bytes and
  :data:`MAX_FIELDS` header lines (below aiohttp's limits), every header line a plain
  ``name: value`` of visible ASCII;
- the request line is exactly ``GET <path> HTTP/1.1``, the path only letters, digits
  and ``_.-~/`` (no query, no percent-escape, no ``.`` or ``..`` segment, no ``//``)
  and shaped as a native link route (``<prefix>/<token>[/<filename>]``, or without the
  prefix with a :data:`~relay.web.public.LINK_SHAPE` token);
- no Range, If-None-Match, If-Range, Transfer-Encoding, Expect or Upgrade header, no
  Content-Length but ``0``, no Connection but ``keep-alive``;
- :meth:`MediaServer.remembered_answer <relay.web.public.MediaServer.remembered_answer>`
  has an answer: the token and filename verified before (no MAC here), the link not
  expired, the media admitted from memory alone (revocation known to be False, nothing
  to revalidate), a small body remembered under the same filename and reference.

Then it writes the bytes aiohttp would (:meth:`ReadyAnswer.whole
<relay.web.ready.ReadyAnswer.whole>`), counts it (:meth:`PublicEdge.count
<relay.web.edge.PublicEdge.count>`) and logs it (:meth:`AccessLog.record_answer
<relay.web.access_log.AccessLog.record_answer>`). A request of that shape whose link
verified before but whose ready answer lapsed (nobody asked for a moment) waits for
one renewal (:meth:`MediaServer.renewal <relay.web.public.MediaServer.renewal>`) and
is tried once more. Anything else, and every request after it, is aiohttp's: the
connection is handed to the request handler aiohttp would have made, with the bytes
read so far (``transport.set_protocol``: asyncio then calls it directly). Pipelined
requests are answered in order until the first one that is not taken here.

The listener's limits hold: connections here count towards ``max_connections``
(:attr:`FastPath.open`); a connection with no complete head ``header_timeout`` after
it opened or after its last answer is closed (as aiohttp's keep-alive timer does);
``send_timeout`` is the socket's TCP_USER_TIMEOUT, whoever writes. While the client
does not read (the transport paused writing) no more requests are answered or read.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

from aiohttp.http import HttpVersion11
from multidict import CIMultiDict

from relay.core.variant import variant_key
from relay.web.edge import PublicEdge
from relay.web.public import LINK_SHAPE, NATIVE, MediaServer

# Below aiohttp's max_line_size / max_field_size (8190) and max_headers (128).
MAX_HEAD = 8190
MAX_FIELDS = 100
_REQUEST_LINE = re.compile(rb"GET (/[A-Za-z0-9_.~/\-]*) HTTP/1\.1")
# RFC 9110 token; a value of visible ASCII with inner spaces or tabs, optional whitespace around.
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z\-]+):[ \t]*((?:[\x21-\x7e][\x20-\x7e\t]*)?)")
_NOT_HERE = ("Range", "If-None-Match", "If-Range", "Transfer-Encoding", "Expect", "Upgrade")
_TOKEN = re.compile(LINK_SHAPE)


class FastPath:
    """What the public listener's connections share: the media server, counters, log."""

    def __init__(
        self,
        media: MediaServer,
        edge: PublicEdge,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._media = media
        self._edge = edge
        self._prefix = media.path_prefix
        self._monotonic = monotonic
        # Connections not handed to aiohttp, counted towards max_connections.
        self.open: set[FastConnection] = set()

    def close_all(self) -> None:
        """Close the connections still here (the listener stops)."""
        for connection in list(self.open):
            connection.close()

    def route(self, path: str) -> tuple[str, str | None] | None:
        """The token and filename aiohttp's native link routes would find in ``path``."""
        if "//" in path:
            return None
        prefix = self._prefix
        if prefix and path.startswith(prefix + "/"):
            parts = path[len(prefix) + 1 :].split("/")
        else:
            parts = path[1:].split("/")
            if not _TOKEN.fullmatch(parts[0]):
                return None
        if len(parts) > 2 or any(p in ("", ".", "..") for p in parts):
            return None
        return parts[0], parts[1] if len(parts) == 2 else None

    def _parse(self, head: bytes) -> tuple[tuple[str, str | None], CIMultiDict[str]] | None:
        """The link (token, filename) and headers of a request shaped as one taken here."""
        if len(head) > MAX_HEAD:
            return None
        lines = head[:-4].split(b"\r\n")
        if len(lines) > MAX_FIELDS + 1:
            return None
        request_line = _REQUEST_LINE.fullmatch(lines[0])
        if request_line is None:
            return None
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            field = _FIELD.fullmatch(line)
            if field is None:
                return None
            headers.add(field[1].decode("ascii"), field[2].decode("ascii").rstrip(" \t"))
        if any(name in headers for name in _NOT_HERE):
            return None
        if headers.getall("Content-Length", ["0"]) != ["0"]:
            return None
        if any(value.lower() != "keep-alive" for value in headers.getall("Connection", ())):
            return None
        link = self.route(request_line[1].decode("ascii"))
        if link is None:
            return None
        return link, headers

    def serve(self, head: bytes, transport: asyncio.Transport, peer: str | None) -> bool:
        """Answer the request of ``head`` (a whole head, ending in CRLF CRLF) if it is
        one taken here (module docstring); False, with nothing written, if not."""
        started = self._monotonic()
        parsed = self._parse(head)
        if parsed is None:
            return False
        link, headers = parsed
        found = self._media.remembered_answer(*link)
        if found is None:
            return False
        claims, answer = found
        head_bytes, body = answer.whole(HttpVersion11, True)
        transport.writelines((head_bytes, body))
        self._edge.count(NATIVE, 200)
        self._edge.access.record_answer(
            "GET",
            NATIVE,
            (str(claims.media), variant_key(claims.variant)),
            200,
            len(body),
            self._monotonic() - started,
            headers,
            peer,
        )
        return True

    def renewal(self, head: bytes) -> asyncio.Future[None] | None:
        """For a request shaped as one taken here whose link verified before but whose
        ready answer has lapsed (an idle moment): the renewal to wait for before asking
        :meth:`serve` again, so one idle second does not make the connection aiohttp's."""
        parsed = self._parse(head)
        return None if parsed is None else self._media.renewal(*parsed[0])


class FastConnection(asyncio.Protocol):
    """One connection of the public listener, until it is handed to aiohttp."""

    def __init__(
        self,
        fast: FastPath,
        handler: Callable[[], asyncio.Protocol],
        header_timeout: float,
    ) -> None:
        """``handler``: makes aiohttp's request handler for this connection."""
        self._fast = fast
        self._make_handler = handler
        self._header_timeout = header_timeout
        self._transport: asyncio.Transport | None = None
        self._peer: str | None = None
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._handler: asyncio.Protocol | None = None
        # Waiting for a renewal of the ready answer (FastPath.renewal); at most one per
        # request, then the request is aiohttp's.
        self._renewing = False
        self._renewed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peername = transport.get_extra_info("peername")
        # As aiohttp's request.remote.
        if isinstance(peername, list | tuple):
            self._peer = str(peername[0])
        elif peername is not None:
            self._peer = str(peername)
        self._fast.open.add(self)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:  # only before set_protocol took effect
            self._handler.data_received(data)
            return
        self._buffer = self._buffer + data if self._buffer else data
        self._serve()

    def eof_received(self) -> bool | None:
        if self._handler is None and self._buffer:
            self._hand_over()  # a part of a head: aiohttp says what that is
        if self._handler is not None:
            return self._handler.eof_received()
        return None  # nothing pending: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._fast.open.discard(self)
        self._buffer = b""

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None and not self._transport.is_closing():
            if not self._renewing:
                self._transport.resume_reading()
            self._serve()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _serve(self) -> None:
        transport = self._transport
        assert transport is not None
        while (
            self._handler is None
            and not self._paused
            and not self._renewing
            and not transport.is_closing()
        ):
            buffer = self._buffer
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._hand_over()  # aiohttp answers a head too long
                return
            cut = end + 4
            head = buffer[:cut]
            if not self._fast.serve(head, transport, self._peer):
                renewal = None if self._renewed else self._fast.renewal(head)
                if renewal is None:
                    self._hand_over()
                else:
                    self._wait_for(renewal)
                return
            self._renewed = False
            self._buffer = buffer[cut:]
            self._arm()

    def _wait_for(self, renewal: asyncio.Future[None]) -> None:
        """Stop reading until the renewal ends, then try the same request once more."""
        transport = self._transport
        assert transport is not None
        self._renewing = self._renewed = True
        self._disarm()  # the head is complete: header_timeout does not apply to it
        transport.pause_reading()
        renewal.add_done_callback(self._renewal_done)

    def _renewal_done(self, _: asyncio.Future[None]) -> None:
        self._renewing = False
        transport = self._transport
        if transport is None or transport.is_closing() or self._handler is not None:
            return
        if not self._paused:
            transport.resume_reading()
        self._serve()

    def _hand_over(self) -> None:
        """From now on the connection is aiohttp's, starting with the bytes read here."""
        transport = self._transport
        assert transport is not None
        self._disarm()
        # Counted here until aiohttp's handler counts it in connection_made.
        self._fast.open.discard(self)
        handler = self._handler = self._make_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._paused:
            handler.pause_writing()
            transport.resume_reading()
        buffered, self._buffer = self._buffer, b""
        if buffered:
            handler.data_received(buffered)

    def _arm(self) -> None:
        self._disarm()
        if self._header_timeout > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._paused:
            self._arm()  # answers still being sent: send_timeout is the guard then
            return
        self.close()

"""The public listener's own defences: header deadline, stalled readers, a connection cap.

A reverse proxy in front should enforce all three too; these make it defence in depth
rather than the only defence (issue 13, finding 8). What aiohttp offers is used as is:

- **headers within** ``header_timeout``: aiohttp's ``keepalive_timeout`` is armed when a
  connection opens and again after each response, and closes the connection if no
  complete request head has arrived by then (``RequestHandler._process_keepalive``: the
  handler is still waiting for a message). Bytes of an unfinished head do not re-arm
  it, so a slow-loris client is closed on time; an idle keep-alive connection is closed
  after the same time, which is what an idle connection costs anyway.
- **a reader that stopped reading** for ``send_timeout``: aiohttp has no write timeout,
  and a deadline on each ``write``/``sendfile`` would either cut slow but steady clients
  or miss a sendfile stuck mid-file. Linux's ``TCP_USER_TIMEOUT`` (RFC 5482) is exactly
  "no progress for this long": sent data unacknowledged, or a zero receive window that
  has not opened, aborts the connection with ETIMEDOUT, whatever is sending (write,
  drain, or the kernel's sendfile). Set on the listening socket, accepted sockets
  inherit it. The handler then sees the connection lost, and the cached file it held
  open is closed.
- **at most** ``max_connections`` open at once, in each process (``public.workers``):
  counted in the protocol factory, which asyncio calls for each accepted socket; one
  over the cap gets a fixed 503 and is closed before anything of it is read or parsed.

Errors that aiohttp logs for a connection (a malformed request line, a head too long)
quote the request line, which holds a signed link: the public listener's connection
logger keeps only the exception's type (finding 10; links are capabilities).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from relay.support.metrics import Metrics
from relay.web.fast_path import FastConnection, FastPath

log = logging.getLogger(__name__)
# Descriptors beyond the connections: database, cache files being sent, upstream sockets.
SPARE_DESCRIPTORS = 512
# The logger aiohttp's request handlers of the public listener report to.
CONNECTION_LOG = "relay.web.public.connections"

_REFUSED_BODY = json.dumps(
    {"errcode": "M_LIMIT_EXCEEDED", "error": "Too many open connections; try again"}
).encode()
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Cache-Control: no-store\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY
)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Seconds for a request head to arrive, seconds without client progress, open connections."""

    header_timeout: float
    send_timeout: float
    max_connections: int


class _WithoutMessages(logging.Filter):
    """Keep a record's message but only the type of its exception (never its text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def connection_logger() -> logging.Logger:
    """The logger for the public listener's aiohttp request handlers (filter installed once)."""
    logger = logging.getLogger(CONNECTION_LOG)
    if not any(isinstance(f, _WithoutMessages) for f in logger.filters):
        logger.addFilter(_WithoutMessages())
    return logger


def ensure_descriptors(limits: ConnectionLimits) -> None:
    """Raise the soft open-file limit so the cap, not EMFILE, is what refuses connections.

    Many systems start processes with a soft limit of 1024, below the default cap plus
    what the relay itself keeps open; the hard limit is usually far higher.
    """
    want = limits.max_connections + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < want:
        log.warning(
            "open-file limit %d is below public.max_connections + %d; connections beyond it"
            " fail with EMFILE (raise the hard limit, e.g. LimitNOFILE=)",
            new,
            SPARE_DESCRIPTORS,
        )


def runner_args(limits: ConnectionLimits) -> dict[str, Any]:
    """Keyword arguments for the public ``web.AppRunner`` (passed on to each handler)."""
    return {"keepalive_timeout": limits.header_timeout, "logger": connection_logger()}


class _Refuse(asyncio.Protocol):
    """A connection over the cap: one fixed 503, then closed; nothing it sends is read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_REFUSED)
        transport.close()


class LimitedSite(web.BaseSite):
    """A TCP site whose accepted connections obey :class:`ConnectionLimits`."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        limits: ConnectionLimits,
        metrics: Metrics,
        *,
        reuse_port: bool = False,
        fast: FastPath | None = None,
    ) -> None:
        """``fast``: answer remembered plain GETs before aiohttp (relay.web.fast_path)."""
        super().__init__(runner)
        self._fast = fast
        self._reuse_port = reuse_port
        self._limited_runner = runner
        self._host = host
        self._port = port
        self._limits = limits
        self._metrics = metrics

    @property
    def name(self) -> str:
        shown = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{shown}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._limited_runner.server
        assert server is not None  # BaseSite refuses a runner that was not set up
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory(server),
            self._host,
            self._port,
            reuse_address=True,
            # Several processes (public.workers) each bind the port; the kernel spreads
            # new connections over them. Off otherwise, so that a second relay started
            # on a busy port fails instead of silently taking half the connections.
            reuse_port=self._reuse_port or None,
        )
        user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
        for sock in self._server.sockets:
            if user_timeout is None:
                log.warning("no TCP_USER_TIMEOUT here: public.send_timeout is not enforced")
                break
            # Milliseconds; inherited by every socket accepted from this one.
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, int(self._limits.send_timeout * 1000))

    async def stop(self) -> None:
        await super().stop()
        if self._fast is not None:
            self._fast.close_all()  # aiohttp's shutdown closes only its own connections

    def _factory(self, server: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        cap = self._limits.max_connections
        refused = self._metrics.connections_refused
        fast = self._fast
        header_timeout = self._limits.header_timeout

        def protocol() -> asyncio.BaseProtocol:
            # asyncio calls this once per accepted socket, just before connection_made,
            # so the count includes every connection still open or closing.
            if len(server.connections) + (len(fast.open) if fast is not None else 0) >= cap:
                refused.inc()
                return _Refuse()
            if fast is not None:
                return FastConnection(fast, server, header_timeout)
            return server()

        return protocol

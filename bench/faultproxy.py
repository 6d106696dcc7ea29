"""A homeserver that misbehaves on demand: Synapse behind a proxy that injects faults.

Everything is forwarded to the real Synapse, except media downloads whose media id
names a fault (``f429-…``, ``freset-…``): those the proxy answers itself, badly. The
proxy can also be taken down and brought back (the homeserver unreachable).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

DOWNLOAD = "/_matrix/client/v1/media/download/"
RESET_DECLARED = 8 * 1024 * 1024  # bytes promised by a "reset" answer
RESET_SENT = 1024 * 1024  # bytes sent before the connection is cut
DRIP_DECLARED = 1024 * 1024
DRIP_BYTES, DRIP_EVERY = 16, 0.5  # 32 B/s: far slower than any download timeout allows
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


def _error(status: int, errcode: str, **extra: object) -> web.Response:
    return web.json_response({"errcode": errcode, "error": "injected", **extra}, status=status)


async def _reset(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = RESET_DECLARED
    await response.prepare(request)
    await response.write(b"\x5a" * RESET_SENT)
    if request.transport is not None:
        request.transport.abort()  # RST mid-body
    return response


async def _drip(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = DRIP_DECLARED
    await response.prepare(request)
    for _ in range(DRIP_DECLARED // DRIP_BYTES):
        await response.write(b"d" * DRIP_BYTES)
        await asyncio.sleep(DRIP_EVERY)
    return response


async def _hang(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(3600)  # never answers: the relay's read timeout must end it
    raise AssertionError("unreachable")


async def _429(request: web.Request) -> web.StreamResponse:
    return _error(429, "M_LIMIT_EXCEEDED", retry_after_ms=2000)


async def _500(request: web.Request) -> web.StreamResponse:
    return _error(500, "M_UNKNOWN")


async def _502(request: web.Request) -> web.StreamResponse:
    return _error(502, "M_UNKNOWN")


async def _503(request: web.Request) -> web.StreamResponse:
    return web.Response(status=503, text="<html>down for maintenance</html>")  # a proxy's page


FAULTS: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
    "f429": _429,
    "f500": _500,
    "f502": _502,
    "f503": _503,
    "freset": _reset,
    "fdrip": _drip,
    "fhang": _hang,
}


class FaultProxy:
    """Forwards to ``upstream``; fault media ids are answered by :data:`FAULTS`."""

    def __init__(self, upstream: str, port: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = port
        self.injected: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again, after :meth:`take_down`) on the same port."""
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def take_down(self) -> None:
        """Close the listener and every open connection: the homeserver is unreachable."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def close(self) -> None:
        await self.take_down()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith(DOWNLOAD):
            media_id = request.path.rsplit("/", 1)[-1]
            fault = FAULTS.get(media_id.split("-", 1)[0])
            if fault is not None:
                name = media_id.split("-", 1)[0]
                self.injected[name] = self.injected.get(name, 0) + 1
                return await fault(request)
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=await request.read() if request.body_exists else None,
            allow_redirects=False,
        ) as upstream:
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            response = web.StreamResponse(status=upstream.status, headers=out)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                async for chunk in upstream.content.iter_chunked(256 * 1024):
                    await response.write(chunk)
                await response.write_eof()
            return response

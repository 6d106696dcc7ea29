"""A tiny homeserver for what a real Synapse cannot be made to do on demand."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest_asyncio
from aiohttp import web

from relay.core.mxc import MediaId
from relay.core.records import MediaRecord
from tests.harness.loopback import start_loopback

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVER = "example.org"
AS_TOKEN = "as-token-stub"


@dataclass
class Seen:
    """One request the stub received."""

    port: int
    raw_path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class StubServer:
    """A tiny homeserver: /versions, media config, and per-media-id download handlers."""

    versions: dict[str, Any] = field(default_factory=lambda: {"versions": ["v1.11"]})
    media: dict[str, Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    # media id → handler answering on the legacy paths (default: same as ``media``)
    legacy_media: dict[str, Handler] | None = None
    config_status: int = 200
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner, self.port = await start_loopback(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def media_requests(self) -> list[Seen]:
        return [s for s in self.seen if "/download/" in s.raw_path or "/thumbnail/" in s.raw_path]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Seen(self.port, request.raw_path, dict(request.query), dict(request.headers))
        )
        path = request.path
        if path == "/_matrix/client/versions":
            return web.json_response(self.versions)
        if path.endswith("/media/config") or path == "/_matrix/media/v3/config":
            if self.config_status != 200:
                return error_response(self.config_status, "M_UNKNOWN_TOKEN")
            return web.json_response({"m.upload.size": 1234})
        legacy = path.startswith("/_matrix/media/v3/")
        table = self.legacy_media if legacy and self.legacy_media is not None else self.media
        handler = table.get(path.rsplit("/", 1)[-1])
        if handler is None:
            return error_response(404, "M_NOT_FOUND")
        return await handler(request)


def error_response(status: int, errcode: str, **extra: Any) -> web.Response:
    return web.json_response({"errcode": errcode, "error": "stub", **extra}, status=status)


def serve_bytes(data: bytes, content_type: str = "image/png", **headers: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=data, content_type=content_type, headers=headers)

    return handler


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def stub() -> AsyncIterator[StubServer]:
    """The stub homeserver, started on a loopback port."""
    server = StubServer()
    await server.start()
    yield server
    await server.stop()


class NoRecords:
    """A store that has seen no media (for pipelines over the stub)."""

    async def media_references(self, media: MediaId) -> list[MediaRecord]:
        return []


class NothingRevoked:
    """A store in which nothing is revoked."""

    async def is_revoked(self, media: MediaId) -> bool:
        return False

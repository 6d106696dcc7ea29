"""The relay's own disk or descriptors running out while caching: 503 + Retry-After, not 500.

A real public listener (MediaServer behind the error middleware) over a stub homeserver;
the cache is a MediaCache whose file system "fills up" on demand: a subclass, since a
real full disk or descriptor table cannot be arranged for one test (DESIGN: fakes are
for the edge cases a real server cannot be made to show).
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from relay.core.mxc import MediaId
from relay.core.signing import KeyRing, LinkClaims, SigningKey, build_url, sign
from relay.media.cache import CacheWriter, MediaCache
from relay.media.cache_layout import CacheKey
from relay.media.downloads import MediaSource
from relay.media.pipeline import MediaPipeline
from relay.media.renditions import Renditions
from relay.media.revocation import RevocationCheck
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.fetcher import MediaFetcher
from relay.web.middleware import error_middleware
from relay.web.public import MediaServer
from tests.harness.loopback import start_loopback
from tests.harness.stub_homeserver import (
    AS_TOKEN,
    SERVER,
    NoRecords,
    NothingRevoked,
    StubServer,
    serve_bytes,
)

RING = KeyRing([SigningKey("k1", b"s" * 32)])


class FillingCache(MediaCache):
    """A cache whose next writes fail with ``failure`` (an errno) until it is cleared."""

    failure: int | None = None

    def begin(self, key: CacheKey) -> CacheWriter:
        if self.failure == errno.EMFILE:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        if self.failure == errno.ENOSPC:
            # The temporary file exists, but its writes go to /dev/full: ENOSPC.
            path = self.new_temp_path()
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return CacheWriter(self, key, path, os.open("/dev/full", os.O_WRONLY))
        return super().begin(key)


@pytest_asyncio.fixture
async def served(
    stub: StubServer, tmp_path: Path
) -> AsyncIterator[tuple[str, FillingCache, aiohttp.ClientSession]]:
    metrics = Metrics()
    async with aiohttp.ClientSession() as session:
        caps = Capabilities(stub.url, AS_TOKEN)
        fetcher = MediaFetcher(session, stub.url, AS_TOKEN, caps, metrics, max_size=1 << 22)
        cache = FillingCache(tmp_path / "cache", 1 << 24, metrics)
        await cache.start()
        source = MediaSource(fetcher, cache, metrics)
        pipeline = MediaPipeline(
            NoRecords(), RevocationCheck(NothingRevoked()), source, Renditions(source, metrics)
        )
        server = MediaServer(RING, pipeline, metrics, path_prefix="")
        app = web.Application(middlewares=[error_middleware])
        app.add_routes(server.routes())
        runner, port = await start_loopback(app)
        try:
            yield f"http://127.0.0.1:{port}", cache, session
        finally:
            await runner.cleanup()
            await pipeline.close()


def link(base: str, media_id: str) -> str:
    token = sign(RING, LinkClaims(MediaId(SERVER, media_id), None, None, 4_000_000_000))
    return build_url(base, token, None)


@pytest.mark.parametrize("failure", [errno.EMFILE, errno.ENOSPC])
async def test_exhausted_cache_answers_503_then_recovers(
    served: tuple[str, FillingCache, aiohttp.ClientSession], stub: StubServer, failure: int
) -> None:
    """EMFILE or ENOSPC while caching: 503 M_UNKNOWN with Retry-After; later a 200."""
    base, cache, session = served
    stub.media["abc"] = serve_bytes(b"x" * 100_000, "video/mp4")
    cache.failure = failure
    async with session.get(link(base, "abc")) as resp:
        body = await resp.json()
        assert resp.status == 503, body
        assert body["errcode"] == "M_UNKNOWN"
        assert int(resp.headers["Retry-After"]) >= 1
    assert len(cache) == 0
    assert [p for p in (cache.root / "tmp").iterdir()] == []
    cache.failure = None
    async with session.get(link(base, "abc")) as resp:
        assert resp.status == 200
        assert await resp.read() == b"x" * 100_000

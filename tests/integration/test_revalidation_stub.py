"""Revalidation's question and its policy against a stub homeserver: what a real Synapse
cannot be made to do on demand (fail with 5xx, honour Range)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay.core.errors import MatrixError
from relay.core.mxc import MediaId
from relay.media.cache import MediaCache
from relay.media.downloads import MediaSource
from relay.media.revalidation import Revalidator
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.errors import UpstreamError, UpstreamRateLimited, UpstreamUnauthorized
from relay.upstream.fetcher import MediaFetcher
from relay.upstream.probe import MediaProbe
from tests.harness.stub_homeserver import (
    AS_TOKEN,
    SERVER,
    FakeClock,
    StubServer,
    error_response,
    serve_bytes,
)

DATA = b"\x89PNG" + b"x" * 200_000  # more than the probe reads
INTERVAL = 10.0


class Upstream:
    """The stub's answer for the media, switchable: bytes, or an error status."""

    def __init__(self) -> None:
        self.status = 200

    async def handler(self, request: web.Request) -> web.StreamResponse:
        if self.status == 200:
            return await serve_bytes(DATA)(request)
        return error_response(self.status, "M_NOT_FOUND" if self.status == 404 else "M_UNKNOWN")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def fetcher_for(session: aiohttp.ClientSession, url: str, metrics: Metrics) -> MediaFetcher:
    caps = Capabilities(url, AS_TOKEN)
    return MediaFetcher(session, url, AS_TOKEN, caps, metrics, max_size=1 << 20)


def probe_for(
    session: aiohttp.ClientSession, url: str, metrics: Metrics, fetcher: MediaFetcher | None = None
) -> MediaProbe:
    fetcher = fetcher or fetcher_for(session, url, metrics)
    return MediaProbe(session, url, AS_TOKEN, fetcher, metrics, timeout=5)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (404, False),
        (502, UpstreamError),
        (504, UpstreamError),
        (429, UpstreamRateLimited),
        (401, UpstreamUnauthorized),
    ],
)
async def test_probe_answers(
    stub: StubServer, session: aiohttp.ClientSession, status: int, expected: object
) -> None:
    """200 → present; 404 → gone; every other failure is trouble, never "gone"."""
    upstream = Upstream()
    stub.media["cat"] = upstream.handler
    metrics = Metrics()
    probe = probe_for(session, stub.url, metrics)
    assert await probe.still_served(MediaId(SERVER, "cat")) is True
    upstream.status = status
    if expected is False:
        assert await probe.still_served(MediaId(SERVER, "cat")) is False
    else:
        with pytest.raises(expected):  # type: ignore[call-overload]
            await probe.still_served(MediaId(SERVER, "cat"))
    (first, *_), last = stub.media_requests(), stub.media_requests()[-1]
    for seen in (first, last):
        assert seen.raw_path.startswith(f"/_matrix/client/v1/media/download/{SERVER}/cat?")
        assert seen.headers["Range"] == "bytes=0-0"
        assert seen.headers["Authorization"] == f"Bearer {AS_TOKEN}"


async def test_probe_accepts_a_ranged_answer(
    stub: StubServer, session: aiohttp.ClientSession
) -> None:
    """A homeserver that honours Range (206, one byte) still serves the media."""

    async def ranged(request: web.Request) -> web.StreamResponse:
        return web.Response(status=206, body=DATA[:1], headers={"Content-Range": "bytes 0-0/9"})

    stub.media["cat"] = ranged
    assert await probe_for(session, stub.url, Metrics()).still_served(MediaId(SERVER, "cat"))


async def test_trouble_then_503_then_recovery(
    stub: StubServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """With the homeserver failing, a cached item is served for 3 intervals, one check
    per interval, then 503 with Retry-After; once it answers again the item is served."""
    upstream = Upstream()
    stub.media["cat"] = upstream.handler
    metrics = Metrics()
    fetcher = fetcher_for(session, stub.url, metrics)
    probe = probe_for(session, stub.url, metrics, fetcher)
    cache = MediaCache(tmp_path / "cache", 1 << 24, metrics)
    await cache.start()
    source = MediaSource(fetcher, cache, metrics)
    media = MediaId(SERVER, "cat")
    body = await source.open_file(media)
    assert body.length == len(DATA)
    clock = FakeClock(body.created_at)
    gone: list[MediaId] = []

    async def on_gone(item: MediaId) -> None:
        gone.append(item)

    revalidator = Revalidator(probe, on_gone, metrics, interval=INTERVAL, clock=clock)
    downloads = len(stub.media_requests())

    def checks() -> int:
        return len(stub.media_requests()) - downloads

    upstream.status = 502
    for _ in range(int(3 * INTERVAL) + 1):  # one hit a second, 0 to 30 s
        await revalidator.ensure_served(media, cache.oldest(SERVER, "cat"))
        clock.now += 1
    assert checks() == 3  # at 10, 20 and 30 s
    clock.now += INTERVAL  # 41 s: past the grace
    with pytest.raises(MatrixError) as caught:
        await revalidator.ensure_served(media, cache.oldest(SERVER, "cat"))
    assert caught.value.status == 503 and caught.value.headers["Retry-After"] == "10"
    assert metrics.value("relay_revalidations", {"outcome": "failed"}) == 4
    upstream.status = 200
    clock.now += INTERVAL
    await revalidator.ensure_served(media, cache.oldest(SERVER, "cat"))
    assert gone == [] and checks() == 5
    upstream.status = 404
    clock.now += INTERVAL
    with pytest.raises(MatrixError) as caught:
        await revalidator.ensure_served(media, cache.oldest(SERVER, "cat"))
    assert caught.value.status == 404 and gone == [media]

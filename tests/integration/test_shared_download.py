"""One download across relays sharing a cache directory, two MediaSources in this process.

Each source has its own cache instance, index and lock descriptors, and ``flock`` locks
of separate open files exclude each other as between processes, so these pin down
what the OS-process tests (test_shared_cache) would be slow to: encrypted media,
error classes, adoption. The homeserver is the stub, which counts requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from relay.core.mxc import MediaId
from relay.media.cache import MediaCache
from relay.media.downloads import MediaSource
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.errors import UpstreamRateLimited
from relay.upstream.fetcher import MediaFetcher
from tests.harness.cache import read_body
from tests.harness.encryption import encrypt_attachment
from tests.harness.stub_homeserver import AS_TOKEN, SERVER, StubServer, error_response
from tests.harness.waiting import eventually

MEDIA = MediaId(SERVER, "abc")
MakeSource = Callable[[], Awaitable[tuple[MediaSource, Metrics]]]


class Held:
    """Answers ``answer()`` once opened; counts requests."""

    def __init__(self, answer: Callable[[], web.StreamResponse]) -> None:
        self.answer = answer
        self.opened = asyncio.Event()
        self.requests = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await self.opened.wait()
        return self.answer()


@pytest_asyncio.fixture
async def make_source(stub: StubServer, tmp_path: Path) -> AsyncIterator[MakeSource]:
    """Sources over one cache directory, each with its own cache instance."""
    sources: list[MediaSource] = []
    async with aiohttp.ClientSession() as session:

        async def make() -> tuple[MediaSource, Metrics]:
            metrics = Metrics()
            caps = Capabilities(stub.url, AS_TOKEN, session=session)
            fetcher = MediaFetcher(session, stub.url, AS_TOKEN, caps, metrics, max_size=1 << 22)
            cache = MediaCache(tmp_path / "cache", 1 << 24, metrics)
            await cache.start()
            source = MediaSource(fetcher, cache, metrics)
            sources.append(source)
            return source, metrics

        yield make
        for source in sources:
            await source.close()


async def _both_waiting(held: Held, follower: MediaSource) -> None:
    async def waiting() -> bool:
        return held.requests == 1 and follower.downloads_in_progress == 1

    await eventually(waiting, within=10)


async def test_an_encrypted_download_is_decrypted_once_and_waited_for(
    make_source: MakeSource, stub: StubServer
) -> None:
    """The owner fetches, verifies and decrypts; the other relay waits for the entry (no
    plaintext before the hash is checked) and asks the homeserver nothing."""
    plaintext = b"secret " * 10_000
    ciphertext, info = encrypt_attachment(plaintext)
    held = Held(lambda: web.Response(body=ciphertext, content_type="application/octet-stream"))
    stub.media["abc"] = held
    (owner, _), (other, _) = await make_source(), await make_source()
    first = asyncio.create_task(owner.open(MEDIA, info))
    await eventually(lambda: _true(held.requests == 1), within=10)
    second = asyncio.create_task(other.open(MEDIA, info))
    await _both_waiting(held, other)
    held.opened.set()
    bodies = [await first, await second]
    assert [await read_body(b) for b in bodies] == [plaintext, plaintext]
    assert all(b.path is not None for b in bodies)  # complete files, never a stream
    assert held.requests == 1


async def test_a_rate_limited_owner_gives_the_others_its_answer(
    make_source: MakeSource, stub: StubServer
) -> None:
    """429 to the owner: the other relay raises UpstreamRateLimited with the same
    back-off (503, Retry-After), with no request of its own."""
    held = Held(lambda: error_response(429, "M_LIMIT_EXCEEDED", retry_after_ms=7000))
    stub.media["abc"] = held
    (owner, _), (other, _) = await make_source(), await make_source()
    first = asyncio.create_task(owner.open(MEDIA))
    await eventually(lambda: _true(held.requests == 1), within=10)
    second = asyncio.create_task(other.open(MEDIA))
    await _both_waiting(held, other)
    held.opened.set()
    for task in (first, second):
        with pytest.raises(UpstreamRateLimited) as info:
            await task
        assert (info.value.status, info.value.retry_after) == (503, 7)
        assert info.value.to_matrix_error().errcode == "M_LIMIT_EXCEEDED"
    assert held.requests == 1


async def test_an_entry_committed_by_another_relay_is_adopted(
    make_source: MakeSource, stub: StubServer
) -> None:
    """A miss in one relay's index finds the other's committed entry on disk: a hit,
    served as a file, no upstream request."""
    held = Held(lambda: web.Response(body=b"committed once", content_type="text/plain"))
    held.opened.set()
    stub.media["abc"] = held
    (owner, _), (other, metrics) = await make_source(), await make_source()
    assert await read_body(await owner.open(MEDIA)) == b"committed once"
    body = await other.open(MEDIA)
    assert body.path is not None
    assert await read_body(body) == b"committed once"
    assert (body.content_type, held.requests) == ("text/plain", 1)
    assert metrics.value("relay_cache_hits") == 1


async def _true(value: bool) -> bool:
    return value

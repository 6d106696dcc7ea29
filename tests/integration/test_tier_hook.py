"""MediaSource's hook for the shared tier: asked on a local miss, filled after a download,
purged with the cache. The tier here is a dict (the real S3 tier has its own tests
against an S3 server); the homeserver is the stub, which counts requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from relay.core.mxc import MediaId
from relay.media.cache import MediaCache
from relay.media.cache_layout import CacheEntry, CacheKey
from relay.media.downloads import MediaSource
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.fetcher import MediaFetcher
from tests.harness.cache import read_body
from tests.harness.encryption import encrypt_attachment
from tests.harness.stub_homeserver import AS_TOKEN, SERVER, StubServer, serve_bytes
from tests.harness.waiting import eventually

MEDIA = MediaId(SERVER, "abc")


@dataclass
class DictObject:
    content_type: str
    content_length: int | None
    filename: str | None
    data: bytes
    closed: bool = False

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), 1000):
            yield self.data[i : i + 1000]

    async def close(self) -> None:
        self.closed = True


@dataclass
class DictTier:
    """A SharedTier over a dict; ``holds`` refuses encrypted plaintext like the real one."""

    objects: dict[CacheKey, tuple[bytes, str, str | None]] = field(default_factory=dict)
    opened: list[DictObject] = field(default_factory=list)
    gets: int = 0
    fail_purge: bool = False

    def holds(self, key: CacheKey) -> bool:
        return not key.variant.startswith("enc-")

    async def get(self, key: CacheKey) -> DictObject | None:
        self.gets += 1
        found = self.objects.get(key)
        if found is None:
            return None
        data, content_type, filename = found
        obj = DictObject(content_type, len(data), filename, data)
        self.opened.append(obj)
        return obj

    async def put(self, key: CacheKey, entry: CacheEntry) -> None:
        data = await asyncio.to_thread(entry.path.read_bytes)
        self.objects[key] = (data, entry.content_type, entry.filename)

    async def purge(self, server_name: str, media_id: str) -> int:
        if self.fail_purge:
            raise OSError("the bucket is unreachable")
        keys = [k for k in self.objects if (k.server_name, k.media_id) == (server_name, media_id)]
        for key in keys:
            del self.objects[key]
        return len(keys)


MakeSource = Callable[[DictTier], Awaitable[MediaSource]]


@pytest_asyncio.fixture
async def make_source(stub: StubServer, tmp_path: Path) -> AsyncIterator[MakeSource]:
    sources: list[MediaSource] = []
    async with aiohttp.ClientSession() as session:

        async def make(tier: DictTier) -> MediaSource:
            metrics = Metrics()
            caps = Capabilities(stub.url, AS_TOKEN, session=session)
            fetcher = MediaFetcher(session, stub.url, AS_TOKEN, caps, metrics, max_size=1 << 22)
            cache = MediaCache(tmp_path / f"cache{len(sources)}", 1 << 24, metrics)
            await cache.start()
            source = MediaSource(fetcher, cache, metrics, tier=tier)
            sources.append(source)
            return source

        yield make
        for source in sources:
            await source.close()


async def test_a_local_miss_is_served_from_the_tier(
    make_source: MakeSource, stub: StubServer
) -> None:
    """What the tier holds is streamed into the cache: no homeserver request, the type
    and filename kept, the object closed, nothing copied back up."""
    tier = DictTier()
    key = MediaSource.cache_key(MEDIA)
    tier.objects[key] = (b"from the bucket" * 1000, "image/webp", "cat.webp")
    source = await make_source(tier)
    body = await source.open(MEDIA)
    assert await read_body(body) == b"from the bucket" * 1000
    assert (body.content_type, body.filename) == ("image/webp", "cat.webp")
    assert stub.media_requests() == []
    assert tier.opened[0].closed
    entry = source.cache.lookup(key)
    assert entry is not None and entry.filename == "cat.webp"
    assert list(tier.objects) == [key]


async def test_a_download_from_the_homeserver_is_copied_up(
    make_source: MakeSource, stub: StubServer
) -> None:
    """Tier empty: the homeserver answers, and once committed the entry is put in the
    tier in the background; a second relay (its own cache) then never asks the
    homeserver."""
    stub.media["abc"] = serve_bytes(b"original bytes", "image/png")
    tier = DictTier()
    first = await make_source(tier)
    assert await read_body(await first.open(MEDIA)) == b"original bytes"
    assert tier.gets == 1
    key = MediaSource.cache_key(MEDIA)

    async def copied() -> bool:
        return key in tier.objects

    await eventually(copied, within=5)
    assert tier.objects[key] == (b"original bytes", "image/png", None)
    second = await make_source(tier)
    assert await read_body(await second.open(MEDIA)) == b"original bytes"
    assert len(stub.media_requests()) == 1


async def test_encrypted_plaintext_never_touches_the_tier(
    make_source: MakeSource, stub: StubServer
) -> None:
    """An encrypted attachment's plaintext is neither looked up in nor copied to the tier."""
    ciphertext, info = encrypt_attachment(b"secret plaintext")
    stub.media["abc"] = serve_bytes(ciphertext, "application/octet-stream")
    tier = DictTier()
    source = await make_source(tier)
    body = await source.open(MEDIA, info)
    assert await read_body(body) == b"secret plaintext"
    # A plain download after it: once its copy is up, one of the plaintext would be too.
    stub.media["plain"] = serve_bytes(b"plain", "text/plain")
    plain = MediaId(SERVER, "plain")
    await read_body(await source.open(plain))

    async def copied() -> bool:
        return bool(tier.objects)

    await eventually(copied, within=5)
    assert list(tier.objects) == [MediaSource.cache_key(plain)]
    assert tier.gets == 1


async def test_purge_reaches_the_tier_and_its_failure_is_raised(
    make_source: MakeSource, stub: StubServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Purge removes the tier's objects too; a tier that cannot purge raises (so the
    revocation is retried) after the local files are gone, and is logged."""
    tier = DictTier()
    key = MediaSource.cache_key(MEDIA)
    tier.objects[key] = (b"x", "text/plain", None)
    source = await make_source(tier)
    await read_body(await source.open(MEDIA))
    await source.purge(MEDIA)
    assert tier.objects == {}
    assert source.cache.lookup(key) is None
    tier.objects[key] = (b"x", "text/plain", None)
    await read_body(await source.open(MEDIA))
    tier.fail_purge = True
    with pytest.raises(OSError, match="unreachable"):
        await source.purge(MEDIA)
    assert source.cache.lookup(key) is None
    assert any("shared tier failed" in r.getMessage() for r in caplog.records)

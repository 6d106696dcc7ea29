"""Renditions with a shared tier: copied down before rendering, copied up after.

The tier is an in-memory SharedTier (the bucket's own behaviour is tested against a
real S3 server in tests/integration/test_shared_tier.py); the cache is real.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from relay.core.attachment_keys import EncryptionInfo
from relay.core.mxc import MediaId
from relay.core.variant import Thumbnail, variant_key
from relay.media.cache import MediaCache
from relay.media.cache_layout import CacheEntry, CacheKey
from relay.media.downloads import MediaSource
from relay.media.renditions import Renditions, derived_key
from relay.media.shared_tier import plaintext
from relay.support.metrics import Metrics
from relay.upstream.errors import UpstreamNotFound
from relay.upstream.fetcher import MediaFetcher
from tests.harness.cache import put_bytes
from tests.harness.images import image_bytes
from tests.harness.waiting import eventually

MEDIA = MediaId("example.org", "abcDEF123")
THUMB = Thumbnail(64, 48, "scale")
KEY = derived_key(MediaSource.cache_key(MEDIA), variant_key(THUMB))
ENCRYPTION = EncryptionInfo(key=b"k" * 32, iv=b"i" * 16, sha256=b"h" * 32)


class NoFetcher:
    @contextlib.asynccontextmanager
    async def open(self, media: MediaId, thumbnail: object = None) -> AsyncIterator[None]:
        raise UpstreamNotFound("not here")
        yield  # pragma: no cover - makes this an async generator


class Stored:
    """A TierObject over bytes; ``length`` may lie, ``fail_after`` breaks the stream."""

    def __init__(self, data: bytes, length: int, fail_after: int | None = None) -> None:
        self._data = data
        self.content_type = "image/png"
        self.content_length: int | None = length
        self.filename: str | None = "photo.png"
        self._fail_after = fail_after
        self.closed = False

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self._data), 10):
            if self._fail_after is not None and start >= self._fail_after:
                raise ConnectionResetError("the store hung up")
            yield self._data[start : start + 10]

    async def close(self) -> None:
        self.closed = True


class MemoryTier:
    """A SharedTier in memory, recording what was asked of it."""

    def __init__(self) -> None:
        self.objects: dict[CacheKey, Stored] = {}
        self.gets: list[CacheKey] = []
        self.puts: dict[CacheKey, bytes] = {}
        self.block_puts = False
        self.cancelled_puts = 0

    def holds(self, key: CacheKey) -> bool:
        return not plaintext(key)

    async def get(self, key: CacheKey) -> Stored | None:
        self.gets.append(key)
        return self.objects.get(key)

    async def put(self, key: CacheKey, entry: CacheEntry) -> None:
        if self.block_puts:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled_puts += 1
                raise
        self.puts[key] = entry.path.read_bytes()

    async def purge(self, server_name: str, media_id: str) -> int:
        return 0


@pytest.fixture
async def world(tmp_path: Path) -> tuple[Renditions, MemoryTier, Metrics, MediaCache]:
    metrics = Metrics()
    cache = MediaCache(tmp_path / "cache", 1 << 26, metrics)
    await cache.start()
    source = MediaSource(cast(MediaFetcher, NoFetcher()), cache, metrics)
    tier = MemoryTier()
    return Renditions(source, metrics, tier=tier), tier, metrics, cache


async def _put_original(cache: MediaCache, encryption: EncryptionInfo | None = None) -> None:
    key = MediaSource.cache_key(MEDIA, encryption)
    assert await put_bytes(cache, key, image_bytes("PNG"), "image/png", "photo.png") is not None


World = tuple[Renditions, MemoryTier, Metrics, MediaCache]


async def test_a_thumbnail_in_the_tier_is_copied_down_not_rendered(world: World) -> None:
    """The tier's copy is committed to the cache as is; nothing rendered, nothing put back."""
    renditions, tier, metrics, cache = world
    stored = b"\x89PNG-the-tier's-thumbnail" * 7
    tier.objects[KEY] = Stored(stored, len(stored))
    entry = await renditions.thumbnail(MEDIA, None, THUMB)
    assert entry.path.read_bytes() == stored
    assert (entry.content_type, entry.filename) == ("image/png", "photo.png")
    assert metrics.value("relay_thumbnails_generated") == 0
    assert tier.objects[KEY].closed and tier.puts == {}
    assert cache.lookup(KEY) == entry
    await renditions.close()


@pytest.mark.parametrize(
    ("length", "fail_after"), [(10_000, None), (170, 50)], ids=["short", "broken"]
)
async def test_a_bad_copy_in_the_tier_is_rendered_instead(
    world: World, length: int, fail_after: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A copy shorter than announced, or a stream that breaks, is discarded (logged) and
    the thumbnail is rendered from the original; the good one then goes up."""
    renditions, tier, metrics, cache = world
    await _put_original(cache)
    tier.objects[KEY] = Stored(b"x" * 170, length, fail_after)
    entry = await renditions.thumbnail(MEDIA, None, THUMB)
    assert metrics.value("relay_thumbnails_generated") == 1
    assert entry.content_type == "image/jpeg" and entry.path.read_bytes() != b"x" * 170
    assert "copying original+thumb-64x48-scale down from the shared tier failed" in caplog.text
    assert tier.objects[KEY].closed
    assert list(cache.work_dir.iterdir()) == []  # the bad copy's temporary file is gone

    async def put_up() -> bool:
        return tier.puts.get(KEY) == entry.path.read_bytes()

    await eventually(put_up, within=5, interval=0.01)
    await renditions.close()


async def test_a_rendered_thumbnail_is_copied_up(world: World) -> None:
    """Rendered here (the tier had none): the committed bytes are put under the same key."""
    renditions, tier, _, cache = world
    await _put_original(cache)
    entry = await renditions.thumbnail(MEDIA, None, THUMB)
    assert tier.gets == [KEY]

    async def put_up() -> bool:
        return tier.puts.get(KEY) == entry.path.read_bytes()

    await eventually(put_up, within=5, interval=0.01)
    await renditions.close()


async def test_renditions_of_plaintext_never_meet_the_tier(world: World) -> None:
    """A thumbnail of a decrypted attachment is neither looked up nor put."""
    renditions, tier, metrics, cache = world
    await _put_original(cache, ENCRYPTION)
    await renditions.thumbnail(MEDIA, ENCRYPTION, THUMB)
    await renditions.close()
    assert metrics.value("relay_thumbnails_generated") == 1
    assert (tier.gets, tier.puts) == ([], {})


async def test_close_cancels_copies_up(world: World) -> None:
    """A copy up that hangs does not hold the shutdown."""
    renditions, tier, _, cache = world
    tier.block_puts = True
    await _put_original(cache)
    await renditions.thumbnail(MEDIA, None, THUMB)
    await asyncio.sleep(0)  # the copy up has started and is waiting
    await asyncio.wait_for(renditions.close(), timeout=5)
    assert (tier.puts, tier.cancelled_puts) == ({}, 1)

"""Media caches for tests: started over a directory, filled as a download would."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.media.cache import MediaCache
from relay.media.cache_layout import CacheEntry, CacheKey
from relay.media.downloads import MediaBody
from relay.support.metrics import Metrics


async def put_bytes(
    cache: MediaCache, key: CacheKey, data: bytes, content_type: str, filename: str | None = None
) -> CacheEntry | None:
    """Store a small complete body under ``key`` (None if purged meanwhile)."""
    writer = cache.begin(key)
    try:
        await writer.write(data)
        return await writer.commit(content_type, filename)
    except BaseException:
        writer.abort()
        raise


async def started_cache(root: Path, max_bytes: int = 1 << 20) -> tuple[MediaCache, Metrics]:
    """A started cache under ``root`` and the metrics it counts into."""
    metrics = Metrics()
    cache = MediaCache(root, max_bytes, metrics)
    await cache.start()
    return cache, metrics


def files_under(root: Path) -> list[Path]:
    """Every file below ``root``, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file())


async def read_body(body: MediaBody) -> bytes:
    """All of a body as served: the cached file, or the chunks of a download under way."""
    if body.path is not None:
        return await asyncio.to_thread(body.path.read_bytes)
    return b"".join([chunk async for chunk in body.iter_chunks()])

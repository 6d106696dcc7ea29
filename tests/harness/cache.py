"""Putting a complete body straight into a media cache, as a download would."""

from __future__ import annotations

from relay.media.cache import CacheEntry, CacheKey, MediaCache


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

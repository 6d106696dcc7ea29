"""One cache entry being written: a temporary file, its hash, its share of the budget.

:meth:`relay.media.cache.MediaCache.begin` makes one; :meth:`CacheWriter.commit` puts
the file in place atomically (through the cache, which indexes it), and
:meth:`CacheWriter.abort` discards it. Readers may follow :attr:`CacheWriter.path`
while it grows.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from relay.media import cache_layout as layout
from relay.media.cache_layout import CacheEntry, CacheKey

if TYPE_CHECKING:
    from relay.media.cache import MediaCache


class CacheFull(OSError):
    """The bytes being written would pass ``max_bytes`` even with every entry evicted."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


class CacheWriter:
    """Writes one entry into a temporary file; :meth:`commit` puts it in place atomically."""

    def __init__(self, cache: MediaCache, key: CacheKey, path: Path, fd: int) -> None:
        self._cache = cache
        self.key = key
        self.path = path  # the temporary file; readers may follow it while it grows
        self._fd: int | None = fd
        self._hash = hashlib.sha256()
        self.written = 0
        # Bytes reserved in the cache's budget for this file (see MediaCache.reserve).
        self.reserved = 0
        # Set by purge(): the media was revoked while downloading; never commit it.
        self.purged = False

    async def write(self, data: bytes) -> None:
        """Append bytes (written and hashed off the event loop); raises CacheFull."""
        if self._fd is None:
            raise RuntimeError("cache writer is closed")
        self._cache.reserve(len(data))
        self.reserved += len(data)
        await asyncio.to_thread(self._write, self._fd, data)
        self.written += len(data)

    def reserve(self, nbytes: int, *, keep: CacheKey | None = None) -> None:
        """Reserve room for what another writer (Pillow, by path) will put at :attr:`path`,
        never evicting ``keep`` (the source being read); raises CacheFull."""
        self._cache.reserve(nbytes, keep=keep)
        self.reserved += nbytes

    def release(self) -> None:
        """Give back this file's reservation (it was committed, or is being discarded)."""
        self._cache.release(self.reserved)
        self.reserved = 0

    def _write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        self._hash.update(data)

    async def commit(self, content_type: str, filename: str | None) -> CacheEntry | None:
        """Move the file into the cache; None when the media was purged meanwhile."""
        self._close()
        return await self._finish(content_type, filename, self._hash.hexdigest())

    async def _finish(
        self, content_type: str, filename: str | None, sha256: str
    ) -> CacheEntry | None:
        if self.purged:
            layout.unlink(self.path)
            self.release()
            self._cache.forget_writer(self)
            return None
        return await self._cache.install(self, content_type, filename, sha256)

    async def commit_file(self, content_type: str, filename: str | None) -> CacheEntry | None:
        """Commit what another writer (Pillow, by path) put at :attr:`path` instead of
        :meth:`write`: hashed here in one read, never copied."""
        self._close()
        self.written, digest = await asyncio.to_thread(layout.hash_file, self.path)
        self._hash = hashlib.sha256()
        return await self._finish(content_type, filename, digest)

    def abort(self) -> None:
        """Discard everything written; safe to call twice or after commit."""
        self._close()
        layout.unlink(self.path)
        self.release()
        self._cache.forget_writer(self)

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

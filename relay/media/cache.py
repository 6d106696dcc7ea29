"""On-disk media cache: atomic entries, LRU eviction under a size cap, survives restarts.

The files themselves (names from a hash, sidecars, the start-up scan, removal) are
:mod:`relay.media.cache_layout`'s; this module keeps the index in LRU order, the
writers of entries in progress and the byte budget.

Eviction unlinks files that may still be being sent: on Linux (POSIX) an open file
descriptor keeps the data readable until it is closed, so readers that already
opened a file finish normally; the serving side treats a file that vanished between
lookup and open as a miss.

``max_bytes`` covers what is being written as well as what is committed: every byte a
download, a decryption or its ciphertext puts in ``work/`` is reserved first
(:meth:`MediaCache.reserve`), evicting committed entries to make room, so fifty
concurrent downloads cannot put fifty times ``media.max_size`` on the disk beside a
full cache. When the bytes in flight alone would pass the cap the write is refused
with :class:`CacheFull` (an ``ENOSPC`` OSError: the client gets 503 and Retry-After).
A stripped original reserves its source's size before it is written; thumbnails are
counted when committed (at most two are made at once, each bounded by the render
budget). Unlinked files still open for a reader keep their blocks until closed
(POSIX), which no accounting in this process can see.

Several relay processes may share one ``root``: each writes in a ``work/`` directory of
its own (locked for its life, so a start-up scan never removes a live process's files),
a lookup that misses the index looks for an entry another process committed (one
open of its sidecar, on a miss only) and adopts it, a purge removes every variant on
disk whoever wrote it, and :mod:`relay.media.cache_sweep` keeps the whole directory
under ``max_bytes``. The byte budget of files in flight stays per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from relay.media import cache_layout as layout
from relay.media.cache_layout import CacheEntry, CacheKey
from relay.media.cache_sweep import SWEEP_INTERVAL, Sweeper
from relay.media.cache_writer import CacheFull, CacheWriter
from relay.support.file_lock import FileLock
from relay.support.metrics import Metrics

__all__ = ["CacheFull", "CacheWriter", "MediaCache"]

log = logging.getLogger(__name__)

# Access times are written to disk at most this often per entry (LRU survives restarts
# approximately; exact order is only kept in memory).
TOUCH_INTERVAL = 60.0


@dataclass(slots=True)
class _Item:
    key: CacheKey
    entry: CacheEntry
    touched_on_disk: float


class MediaCache:
    """Size-capped LRU cache of media files under ``root``."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        metrics: Metrics,
        *,
        sweep_interval: float = SWEEP_INTERVAL,
    ) -> None:
        self.root = Path(root).resolve()
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._work: FileLock | None = None  # this process's work/ directory, locked
        self._sweeper = Sweeper(
            self.root, max_bytes, on_removed=self._swept, interval=sweep_interval
        )
        self._index: OrderedDict[str, _Item] = OrderedDict()  # digest → item, LRU first
        self._by_media: dict[tuple[str, str], set[str]] = {}
        self._writers: set[CacheWriter] = set()
        self.total_bytes = 0
        # Bytes reserved for files being written in work/ (not yet committed).
        self.pending_bytes = 0

    # -- start-up -----------------------------------------------------------------------

    async def start(self) -> None:
        """Take a work directory, scan existing entries (removing only what no live
        process can be writing), rebuild the LRU index."""
        if self._work is None:
            await asyncio.to_thread(layout.prepare, self.root)
            self._work = await asyncio.to_thread(layout.new_work_dir, self.root)
        items = [
            _Item(key, entry, touched)
            for key, entry, touched in await asyncio.to_thread(layout.scan, self.root)
        ]
        self._index.clear()
        self._by_media.clear()
        self.total_bytes = 0
        self.pending_bytes = 0
        for item in sorted(items, key=lambda i: i.touched_on_disk):
            self._add(item)
        self._evict(protect=None)
        log.info(
            "media cache: %d entries, %d bytes in %s", len(self._index), self.total_bytes, self.root
        )

    async def close(self) -> None:
        """Wait for a sweep under way; give up the work directory."""
        await self._sweeper.close()
        if self._work is not None:
            with contextlib.suppress(OSError):  # not empty: the next start-up scan's
                self._work.release(remove=True)
            self._work = None

    @property
    def work_dir(self) -> Path:
        """This process's directory for files being written."""
        if self._work is None:
            raise RuntimeError("media cache not started")
        return self._work.path

    # -- lookups ------------------------------------------------------------------------

    def lookup(self, key: CacheKey) -> CacheEntry | None:
        """The complete entry for ``key`` (counted as hit or miss, marked recently used)."""
        digest = key.digest()
        item = self._find(key, digest)
        if item is None:
            self._metrics.cache_misses.inc()
            return None
        self._index.move_to_end(digest)
        now = time.time()
        if now - item.touched_on_disk >= TOUCH_INTERVAL:
            item.touched_on_disk = now
            with contextlib.suppress(OSError):
                os.utime(item.entry.path, (now, now))
        self._metrics.cache_hits.inc()
        return item.entry

    def peek(self, key: CacheKey) -> CacheEntry | None:
        """Like :meth:`lookup`, but neither counted nor marked used (a download checking
        whether another process committed meanwhile)."""
        item = self._find(key, key.digest())
        return None if item is None else item.entry

    def _find(self, key: CacheKey, digest: str) -> _Item | None:
        """The index's item, checked on disk (one stat); on a miss, the entry another
        process committed (one open of its sidecar), adopted into the index."""
        item = self._index.get(digest)
        if item is not None:
            try:
                size = item.entry.path.stat().st_size
            except OSError:
                size = -1
            if size != item.entry.length:
                # Removed (evicted by another process's sweep, purged) or rewritten
                # behind our back: forget it; the disk may hold a newer entry.
                self._drop(digest, unlink=False)
                item = None
        if item is None:
            found = layout.read_entry(self.root, key)
            if found is None:
                return None
            item = _Item(key, found[0], found[1])
            self._add(item)
            self._evict(protect=digest)
            if digest not in self._index:
                return None  # larger than the whole cache
        return item

    def oldest(self, server_name: str, media_id: str) -> float | None:
        """The ``created_at`` of the oldest entry of a media item (any variant), or None.

        No I/O: revalidation seeds its last-check time from this (an entry was made
        from an upstream answer no older than itself).
        """
        digests = self._by_media.get((server_name, media_id))
        if not digests:
            return None
        return min(self._index[d].entry.created_at for d in digests)

    def __contains__(self, key: CacheKey) -> bool:
        return key.digest() in self._index

    def __len__(self) -> int:
        return len(self._index)

    # -- writing ------------------------------------------------------------------------

    def new_temp_path(self) -> Path:
        """A fresh path in this process's work directory (same file system as entries)."""
        return layout.temp_path(self.root, self.work_dir)

    def reserve(self, nbytes: int, *, keep: CacheKey | None = None) -> None:
        """Count ``nbytes`` more about to be written in ``work/`` against ``max_bytes``,
        evicting least-recently-used entries (but not ``keep``, a source about to be
        read: the cap may then be passed by that one entry until the copy is committed);
        raises :class:`CacheFull` when the bytes being written would pass ``max_bytes``
        on their own."""
        if self.pending_bytes + nbytes > self.max_bytes:
            log.warning(
                "media cache: %d bytes being written, %d more would pass cache_max_size %d",
                self.pending_bytes,
                nbytes,
                self.max_bytes,
            )
            raise CacheFull("media cache is full of downloads in progress")
        self.pending_bytes += nbytes
        self._evict(protect=None, keep=None if keep is None else keep.digest())
        self._sweeper.written()

    def release(self, nbytes: int) -> None:
        """Give back a reservation (the file was committed, or removed)."""
        self.pending_bytes = max(0, self.pending_bytes - nbytes)

    def begin(self, key: CacheKey) -> CacheWriter:
        """Start writing ``key``; call ``commit`` or ``abort`` on the writer."""
        path = self.new_temp_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        writer = CacheWriter(self, key, path, fd)
        self._writers.add(writer)
        return writer

    def forget_writer(self, writer: CacheWriter) -> None:
        """The writer is done (aborted or purged): no purge needs to mark it any more."""
        self._writers.discard(writer)

    async def install(
        self, writer: CacheWriter, content_type: str, filename: str | None, sha256: str
    ) -> CacheEntry | None:
        """Move a finished writer's file into place and index it (CacheWriter.commit)."""
        key = writer.key
        digest = key.digest()
        body = layout.entry_path(self.root, key)
        entry = CacheEntry(
            path=body,
            content_type=content_type,
            length=writer.written,
            sha256=sha256,
            filename=filename,
            created_at=time.time(),
        )
        try:
            await asyncio.to_thread(layout.install, writer.path, key, entry)
        except BaseException:
            layout.unlink(writer.path)
            raise
        finally:
            # Committed or gone, the file is no longer in flight; as an entry it counts below.
            writer.release()
            self._writers.discard(writer)
        if writer.purged:
            # Purged while the file was being moved into place.
            await asyncio.to_thread(layout.unlink_entries, [body])
            return None
        if digest in self._index:
            self._drop(digest, unlink=False)
        self._add(_Item(key, entry, entry.created_at))
        self._evict(protect=digest)
        self._sweeper.written()
        return entry

    # -- removal ------------------------------------------------------------------------

    async def purge(self, server_name: str, media_id: str) -> int:
        """Remove every variant of a media item on disk, whoever wrote it (revocation);
        returns how many were removed.

        Downloads of it still under way here are marked so they are never committed;
        another process's writers are its own purge's (it receives the revocation too).
        """
        for writer in self._writers:
            if (writer.key.server_name, writer.key.media_id) == (server_name, media_id):
                writer.purged = True
        for digest in list(self._by_media.get((server_name, media_id), ())):
            self._drop(digest, unlink=False)
        removed = await asyncio.to_thread(layout.remove_media, self.root, server_name, media_id)
        return len(removed)

    def _swept(self, removed: list[Path]) -> None:
        """Forget what a sweep removed (bodies are named ``<media>-<variant digest>``)."""
        for path in removed:
            digest = path.name.rpartition("-")[2]
            if digest in self._index:
                self._drop(digest, unlink=False)
                self._metrics.cache_evictions.inc()

    def _evict(self, protect: str | None, *, keep: str | None = None) -> None:
        """Drop least-recently-used entries until under ``max_bytes``, but not ``keep``."""
        if protect is not None and self._index[protect].entry.length > self.max_bytes:
            # One entry larger than the whole cache: drop it rather than everything else.
            log.warning(
                "media cache: entry of %d bytes exceeds cache_max_size %d; not kept",
                self._index[protect].entry.length,
                self.max_bytes,
            )
            self._drop(protect, unlink=True)
            self._metrics.cache_evictions.inc()
        for digest in list(self._index):
            if self.total_bytes + self.pending_bytes <= self.max_bytes:
                return
            if digest in (protect, keep):
                continue
            if not self._index[digest].entry.path.exists():
                self._drop(digest, unlink=False)  # another process's sweep took it
                continue
            self._drop(digest, unlink=True)
            self._metrics.cache_evictions.inc()

    def _add(self, item: _Item) -> None:
        digest = item.key.digest()
        self._index[digest] = item
        self._by_media.setdefault((item.key.server_name, item.key.media_id), set()).add(digest)
        self.total_bytes += item.entry.length

    def _drop(self, digest: str, *, unlink: bool) -> None:
        item = self._index.pop(digest, None)
        if item is None:
            return
        self.total_bytes -= item.entry.length
        media = (item.key.server_name, item.key.media_id)
        siblings = self._by_media.get(media)
        if siblings is not None:
            siblings.discard(digest)
            if not siblings:
                del self._by_media[media]
        if unlink:
            layout.unlink_entries([item.entry.path])

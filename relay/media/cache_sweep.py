"""One size cap for every relay process sharing a cache directory.

Each process evicts from its own index (:mod:`relay.media.cache`), but only sees the
entries it wrote, adopted or found at start-up. The :class:`Sweeper` keeps the whole
directory under ``cache_max_size``: a process that wrote something sweeps at most every
:data:`SWEEP_INTERVAL` seconds, if it gets the flock on the cache root without waiting
(otherwise another process is sweeping right now). A sweep measures the directory
(bodies, and the files every process is writing in ``work/``) and removes the least
recently used entries, by mtime, which lookups touch at most once a minute, until the
total fits. The cache grows only through writes, so a process that writes nothing has
nothing to sweep. The others see a removed
entry as a miss (every hit stats its body).

Bytes reserved for downloads in progress stay a per-process budget: a process refuses
new writes when its own bytes in flight would pass the cap; the sweep counts all of
them, so several writing processes make room among the committed entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from relay.media import cache_layout as layout
from relay.support.file_lock import FileLock

log = logging.getLogger(__name__)

# How often (at most) a writing process sweeps; the cache only grows through writes.
SWEEP_INTERVAL = 5.0


def measure(root: Path) -> tuple[list[tuple[float, int, Path]], int]:
    """The committed bodies as (mtime, size, path), and the bytes being written."""
    bodies: list[tuple[float, int, Path]] = []
    for shard in os.scandir(root):
        if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
            continue
        for item in os.scandir(shard.path):
            if item.name.endswith(layout.META_SUFFIX) or item.name.startswith("."):
                continue
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile
            bodies.append((info.st_mtime, info.st_size, Path(item.path)))
    in_flight = 0
    for work in os.scandir(root / layout.WORK_DIR):
        try:
            for item in os.scandir(work.path):
                try:
                    in_flight += item.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return bodies, in_flight


def sweep(root: Path, max_bytes: int) -> list[Path]:
    """Remove dead processes' files being written, then least-recently-used entries
    until the directory fits ``max_bytes``; returns the bodies removed."""
    layout.remove_dead_work(root)
    bodies, in_flight = measure(root)
    total = in_flight + sum(size for _, size, _ in bodies)
    removed: list[Path] = []
    for _, size, path in sorted(bodies, key=lambda b: b[0]):
        if total <= max_bytes:
            break
        layout.unlink_entries([path])
        removed.append(path)
        total -= size
    return removed


class Sweeper:
    """Runs :func:`sweep` in a thread after writes, at most every ``interval`` seconds,
    one process at a time; ``on_removed`` hears of the bodies it removed."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        *,
        on_removed: Callable[[list[Path]], None],
        interval: float = SWEEP_INTERVAL,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.interval = interval
        self._on_removed = on_removed
        # The first sweep comes one interval after start-up (which evicted already).
        self._last = time.monotonic()
        self._task: asyncio.Task[list[Path]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._written = False
        self._closed = False

    def written(self) -> None:
        """Something was written: sweep now, or when next allowed."""
        self._written = True
        if self._closed:
            return
        if self._timer is not None or (self._task is not None and not self._task.done()):
            return  # one is scheduled, or running (it looks again when done)
        delay = self._last + self.interval - time.monotonic()
        if delay > 0:
            self._timer = asyncio.get_running_loop().call_later(delay, self._start)
        else:
            self._start()

    async def close(self) -> None:
        """Cancel a scheduled sweep; wait for one under way."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task

    def run(self) -> list[Path]:
        """One sweep, unless another process is sweeping right now; blocking I/O."""
        self._last = time.monotonic()
        lock = FileLock.try_acquire(self.root, directory=True)
        if lock is None:
            return []  # another process sweeps now; the next write here looks again
        try:
            removed = sweep(self.root, self.max_bytes)
        finally:
            lock.release()
        if removed:
            log.info("media cache: swept %d least recently used entries", len(removed))
        return removed

    def _start(self) -> None:
        self._timer = None
        self._written = False
        self._task = asyncio.create_task(asyncio.to_thread(self.run), name="cache sweep")
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[list[Path]]) -> None:
        if task.cancelled():
            return
        if (error := task.exception()) is not None:
            log.warning("media cache: sweep failed: %s", error)
        else:
            self._on_removed(task.result())
        if self._written:
            self.written()  # written to during the sweep

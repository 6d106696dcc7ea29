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

import logging
import os
import time
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
    """Remove least-recently-used entries until the directory fits ``max_bytes``;
    returns the bodies removed."""
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
    """Runs :func:`sweep` at most every ``interval`` seconds, one process at a time."""

    def __init__(self, root: Path, max_bytes: int, *, interval: float = SWEEP_INTERVAL) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.interval = interval
        # The first sweep comes one interval after start-up (which evicted already).
        self._last = time.monotonic()

    def wait_time(self) -> float:
        """Seconds until the next sweep may run (0: now)."""
        return max(0.0, self._last + self.interval - time.monotonic())

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

"""One download per cache key across the relay processes that share a cache directory.

Within a process, :mod:`relay.support.singleflight` already joins every request for a
key to one download; this is the layer between processes. The process that downloads
holds a ``flock`` on ``tmp/<key digest>.lock`` (:func:`try_claim`); the kernel frees it
if the process dies, even by ``SIGKILL``. The lock file also carries the owner's word
to the others, written over itself at offset 0 (:class:`Claim`):

- once the upstream headers arrive, an :class:`Announcement`: the file being written
  (in the owner's ``work/`` directory), its inode, the content type, length, filename;
- if the download fails, the error's class, status and message (:class:`Failure`),
  written before the lock file is removed, so a process that has it open still reads
  it.

Another process finds the lock held and follows (:func:`follow`): it polls every
:data:`POLL_INTERVAL` for the committed entry, for the announcement (then it streams
the growing file, through a descriptor of its own), and for the lock coming free. The
owner commits by renaming the file into place (same inode), so a follower knows the
bytes it streamed are the entry's. The owner fails: followers answer the same error
class. The owner dies, or fails for its own reasons (its disk, shutting down): a
follower that has not started following a file takes the lock and downloads itself
(one retry); one that has gives its readers an error (their responses are cut short,
as when the homeserver breaks off).

Encrypted attachments are not streamed (no plaintext before the hash is checked): the
owner announces nothing, its followers wait for the entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from relay.media import cache_layout as layout
from relay.media.cache_layout import CacheEntry, CacheKey
from relay.support.file_lock import FileLock
from relay.upstream.errors import (
    FetchError,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamTooLarge,
)

# How often a follower looks at the file it follows and at the owner's lock.
POLL_INTERVAL = 0.01
# Announcements are small (the filename is the longest part); a record never passes this.
RECORD_MAX = 8192


class BrokeOff(UpstreamError):
    """The process whose download this one followed went away mid-body."""


@dataclass(frozen=True, slots=True)
class Announcement:
    """The owner's download under way: the file it writes and the upstream headers."""

    path: Path
    inode: int
    content_type: str
    length: int | None
    filename: str | None


@dataclass(frozen=True, slots=True)
class Failure:
    """The owner's download failed with ``error`` (rebuilt from its class and status)."""

    error: FetchError


class Claim:
    """This process owns the download of one key (holds its lock)."""

    def __init__(self, lock: FileLock) -> None:
        self._lock = lock
        self._written = 0

    def announce(
        self, path: Path, content_type: str, length: int | None, filename: str | None
    ) -> None:
        """Tell followers where the body grows (call once the headers are in)."""
        self._write(
            {
                "state": "streaming",
                "path": str(path),
                "inode": os.stat(path).st_ino,
                "content_type": content_type,
                "length": length,
                "filename": filename,
            }
        )

    def fail(self, error: BaseException) -> None:
        """Tell followers the download failed with an answer they should give too."""
        if isinstance(error, UpstreamNotFound):  # Purged (revoked meanwhile) included
            kind, status, retry = "not_found", 404, 0
        elif isinstance(error, UpstreamTooLarge):
            kind, status, retry = "too_large", 502, 0
        elif isinstance(error, UpstreamRateLimited):
            kind, status, retry = "rate_limited", 503, error.retry_after
        elif isinstance(error, UpstreamError) and not isinstance(error, BrokeOff):
            kind, status, retry = "error", error.status, error.retry_after
        else:
            return  # our own trouble (disk, shutdown): a follower may do better itself
        self._write(
            {
                "state": "failed",
                "kind": kind,
                "status": status,
                "retry_after": retry,
                "message": str(error)[:500],
            }
        )

    def release(self) -> None:
        """Give up the lock, removing its file (the entry is committed, or not)."""
        self._lock.release(remove=True)

    def _write(self, record: dict[str, object]) -> None:
        data = json.dumps(record).encode()[:RECORD_MAX]
        # Padded to what was there: a reader never sees the tail of an older record.
        padded = data.ljust(self._written, b" ")
        os.pwrite(self._lock.fd, padded, 0)
        self._written = len(padded)


def try_claim(root: Path, key: CacheKey) -> Claim | None:
    """The download of ``key`` for this process, or None when another process has it."""
    lock = FileLock.try_acquire(layout.lock_path(root, key))
    if lock is None:
        return None
    os.ftruncate(lock.fd, 0)  # what a killed owner announced is no longer true
    return Claim(lock)


class Watch:
    """Another process's lock file, open for reading what its owner writes there."""

    def __init__(self, root: Path, path: Path, fd: int) -> None:
        self._root = root
        self.path = path
        self._fd = fd

    @classmethod
    def open(cls, root: Path, key: CacheKey) -> Watch | None:
        path = layout.lock_path(root, key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        return cls(root, path, fd)

    def read(self) -> Announcement | Failure | None:
        """What the owner wrote (None: nothing yet, or a record half written)."""
        try:
            record = json.loads(os.pread(self._fd, RECORD_MAX, 0) or b"null")
            if not isinstance(record, dict):
                return None
            if record["state"] == "failed":
                return Failure(_error(record))
            path = layout.checked(self._root, Path(str(record["path"])))
            length = record["length"]
            filename = record["filename"]
            return Announcement(
                path,
                int(record["inode"]),
                str(record["content_type"]),
                None if length is None else int(length),
                None if filename is None else str(filename),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def current(self) -> bool:
        """Whether the lock's path still names the file this watch reads."""
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def owner_gone(self) -> bool:
        """Whether nobody holds the lock on this file (its owner died, or ended)."""
        try:
            # A descriptor of our own is an open file description of its own: flock
            # on it competes with the owner's (taken for an instant, never kept).
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return True

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _error(record: dict[str, object]) -> FetchError:
    message = str(record.get("message", "the download failed in another relay process"))
    kind = record.get("kind")
    if kind == "not_found":
        return UpstreamNotFound(message)
    if kind == "too_large":
        return UpstreamTooLarge(message)
    status = record.get("status")
    retry = record.get("retry_after")
    if not isinstance(retry, int) or not 0 < retry <= 3600:
        retry = 5
    if kind == "rate_limited":
        return UpstreamRateLimited(message, retry_after=retry)
    return UpstreamError(
        message,
        status=status if isinstance(status, int) and status in (502, 503, 504) else 502,
        retry_after=retry,
    )


class Follower(Protocol):
    """What following another process's download updates (the local flight)."""

    readers: int  # bodies handed out from the followed file

    def announced(self, announcement: Announcement, fd: int) -> None:
        """Headers known, body at ``fd`` (the follower's to close from now on)."""
        ...

    def progress(self, written: int) -> None:
        """``written`` bytes of the body are in the file."""
        ...

    def unfollow(self) -> None:
        """Forget the followed file (closes its descriptor); only when no readers."""
        ...


async def follow(
    root: Path,
    key: CacheKey,
    committed: Callable[[], CacheEntry | None],
    follower: Follower,
    *,
    stream: bool,
    poll: float = POLL_INTERVAL,
) -> CacheEntry | Claim:
    """Wait for another process's download of ``key`` (see the module docstring).

    ``committed()`` is the entry if it is in the cache. Returns it, or the Claim when
    the owner went away before a reader started on its file; raises the owner's error,
    or :class:`BrokeOff` when a followed owner went away.
    """
    watch = Watch.open(root, key)
    followed: Announcement | None = None
    fd = -1  # the followed file, handed to ``follower`` (it closes it)
    written = 0
    try:
        while True:
            entry = committed()
            if entry is not None:
                if followed is not None and follower.readers and not _same_file(fd, entry):
                    # A dead owner's file was being read; the entry is another's.
                    raise BrokeOff("the download in another relay process was replaced")
                if followed is not None:
                    follower.progress(entry.length)
                return entry
            gone = watch is None or not watch.current() or watch.owner_gone()
            record = watch.read() if watch is not None else None
            if isinstance(record, Failure):
                raise record.error
            if gone and committed() is not None:
                continue  # committed and released just now
            if followed is not None and (gone or _moved(record, followed)):
                if follower.readers:
                    raise BrokeOff("the relay process downloading this media went away")
                follower.unfollow()
                followed, fd, written = None, -1, 0
            if followed is None and gone:
                if watch is not None:
                    watch.close()
                claim = try_claim(root, key)
                if claim is not None:
                    if committed() is None:
                        return claim
                    claim.release()  # committed just now: the top of the loop returns it
                    continue
                watch = Watch.open(root, key)  # a new owner took it first
            elif followed is None and stream and isinstance(record, Announcement):
                fd = _open_announced(record)
                if fd >= 0:
                    followed = record
                    follower.announced(record, fd)
            if followed is not None:
                size = os.fstat(fd).st_size
                if size > written:
                    written = size
                    follower.progress(size)
            await asyncio.sleep(poll)
    finally:
        if watch is not None:
            watch.close()


def _moved(record: Announcement | Failure | None, followed: Announcement) -> bool:
    """A new owner announced another file (the one followed was a dead owner's)."""
    return isinstance(record, Announcement) and record.inode != followed.inode


def _open_announced(record: Announcement) -> int:
    """A descriptor of the announced file, or -1 when it is gone or not that file."""
    try:
        fd = os.open(record.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return -1  # renamed into place already, or its owner cleaned up: look again
    if os.fstat(fd).st_ino != record.inode:
        os.close(fd)
        return -1
    return fd


def _same_file(fd: int, entry: CacheEntry) -> bool:
    """Whether the committed entry is the file followed (a rename keeps the inode)."""
    with contextlib.suppress(OSError):
        return os.fstat(fd).st_ino == os.stat(entry.path).st_ino
    return False

"""Exclusive advisory locks (``flock``) shared by processes on one machine.

A :class:`FileLock` is held on a file or a directory through an open descriptor: the
kernel releases it when the descriptor closes, so a process killed with ``SIGKILL``
never leaves a lock behind, only (perhaps) the file, which the next holder reuses.

A lock file may be removed by its holder when done (:meth:`FileLock.release` with
``remove=True``). Another process may have opened the old file meanwhile and be
waiting on it; after it wins the lock it checks that the path still names the file it
locked (same device and inode) and otherwise tries again on the new file, so two
processes never both believe they hold the lock of one path.

Blocking acquisition is deliberately absent: callers poll with ``try_acquire`` from
the event loop, which never blocks on another process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import weakref
from pathlib import Path

# An unlucky interleaving (the file removed and recreated between our open and our
# stat) repeats at most this often before we report the lock as busy.
ATTEMPTS = 8


class FileLock:
    """An exclusive ``flock`` on ``path``, held until :meth:`release` (or process exit)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        # A lock dropped without release() (its owner forgotten) still frees its fd.
        self._close = weakref.finalize(self, os.close, fd)

    @classmethod
    def try_acquire(cls, path: Path, *, directory: bool = False) -> FileLock | None:
        """The lock on ``path`` (a lock file, created 0600; or an existing directory),
        or None when another open descriptor holds it. Raises OSError for I/O trouble."""
        for _ in range(ATTEMPTS):
            fd = _open(path, directory)
            if fd is None:
                continue  # a directory removed under us: look again
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            if _still_at(path, fd):
                return cls(path, fd)
            os.close(fd)  # removed (and perhaps recreated) by its last holder: again
        return None

    def release(self, *, remove: bool = False) -> None:
        """Give the lock up; ``remove`` first removes the file (or empty directory), so
        nobody finds it free later; safe to call twice."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    if os.path.isdir(self.path):
                        os.rmdir(self.path)
                    else:
                        os.unlink(self.path)
        finally:
            self._close()

    @property
    def held(self) -> bool:
        return self.fd >= 0


def _open(path: Path, directory: bool) -> int | None:
    if directory:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
    # O_NOFOLLOW: a symlink planted at the lock's name is refused, never followed.
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(path, flags, 0o600)


def _still_at(path: Path, fd: int) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

"""The package's one atomic file write: readers see the old file or the new one, never half.

The temporary file comes from ``tempfile.mkstemp`` in the target's directory, so it is
created with ``O_CREAT | O_EXCL`` and mode 0600 from its first byte: no window in which
a secret is readable by others, and no fixed temporary name for someone to plant a
symlink at. ``os.replace`` renames over the target without following a symlink there
(the symlink itself is replaced). The data and then the directory entry are fsync-ed,
so after a crash the file is either the old one or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically; the file ends up with exactly ``mode``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:  # mkstemp already made it 0600; fchmod ignores the umask
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX: the directory entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

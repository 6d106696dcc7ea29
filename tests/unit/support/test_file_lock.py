"""flock-based locks between processes: exclusive, freed by the kernel, removable."""

from __future__ import annotations

import asyncio
import errno
import os
import sys
from pathlib import Path

import pytest

from relay.support.file_lock import FileLock


def test_a_held_lock_is_refused_until_released(tmp_path: Path) -> None:
    """A second descriptor (as another process would) cannot take a held lock."""
    path = tmp_path / "a.lock"
    first = FileLock.try_acquire(path)
    assert first is not None and first.held
    assert FileLock.try_acquire(path) is None
    first.release()
    assert not first.held
    again = FileLock.try_acquire(path)
    assert again is not None
    again.release()
    assert path.exists()  # released, not removed
    assert (path.stat().st_mode & 0o777) == 0o600


def test_release_with_remove_leaves_no_file(tmp_path: Path) -> None:
    """The holder removes the lock file before letting go; a second release is a no-op."""
    path = tmp_path / "a.lock"
    lock = FileLock.try_acquire(path)
    assert lock is not None
    lock.release(remove=True)
    lock.release(remove=True)
    assert not path.exists()


def test_directory_lock(tmp_path: Path) -> None:
    """A directory is locked through a descriptor of itself; a missing one is not locked."""
    directory = tmp_path / "work"
    directory.mkdir()
    lock = FileLock.try_acquire(directory, directory=True)
    assert lock is not None
    assert FileLock.try_acquire(directory, directory=True) is None
    lock.release(remove=True)
    assert not directory.exists()
    assert FileLock.try_acquire(directory, directory=True) is None


def test_a_planted_symlink_is_refused(tmp_path: Path) -> None:
    """A symlink at the lock's name is never followed (nor its target created)."""
    target = tmp_path / "elsewhere"
    (tmp_path / "a.lock").symlink_to(target)
    with pytest.raises(OSError) as info:
        FileLock.try_acquire(tmp_path / "a.lock")
    assert info.value.errno == errno.ELOOP
    assert not target.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="flock semantics")
async def test_the_kernel_frees_the_lock_of_a_killed_process(tmp_path: Path) -> None:
    """A process killed -9 while holding the lock leaves it free for the next one."""
    path = tmp_path / "a.lock"
    code = (
        "import sys, time; from pathlib import Path; from relay.support.file_lock import FileLock;"
        f"lock = FileLock.try_acquire(Path({str(path)!r})); print(lock is not None, flush=True);"
        "time.sleep(60)"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, cwd=os.getcwd()
    )
    assert child.stdout is not None
    assert await asyncio.wait_for(child.stdout.readline(), 30) == b"True\n"
    assert FileLock.try_acquire(path) is None
    child.kill()
    await child.wait()
    lock = FileLock.try_acquire(path)
    assert lock is not None
    lock.release(remove=True)

"""The one atomic write: modes from the start, no symlink followed, no temp file left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.support.atomic import write_atomic


def test_new_file_is_private_with_the_data(tmp_path: Path) -> None:
    """A new file holds exactly the data, mode 0600 whatever the umask."""
    target = tmp_path / "secret.yaml"
    old_umask = os.umask(0)
    try:
        write_atomic(target, b"token: x\n")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"token: x\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.yaml"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o400])
def test_mode_is_exact_and_replaces_a_looser_file(tmp_path: Path, mode: int) -> None:
    """The file ends up with exactly the mode asked for, not the old file's mode."""
    target = tmp_path / "f"
    target.write_bytes(b"old")
    target.chmod(0o666)
    write_atomic(target, b"new", mode=mode)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == mode


def test_symlink_at_target_is_replaced_not_followed(tmp_path: Path) -> None:
    """A symlink at the target is replaced by the file; what it pointed to is untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    victim.chmod(0o644)
    target = tmp_path / "config.yaml"
    target.symlink_to(victim)
    write_atomic(target, b"secret")
    assert not target.is_symlink()
    assert target.read_bytes() == b"secret"
    assert victim.read_bytes() == b"keep me"
    assert victim.stat().st_mode & 0o777 == 0o644


def test_stale_temp_names_are_not_followed(tmp_path: Path) -> None:
    """Symlinks planted at the old fixed temp names are neither written through nor used."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    target = tmp_path / "registration.yaml"
    planted = [tmp_path / ".registration.yaml.tmp", tmp_path / ".registration.yaml.tmp-0"]
    for name in planted:
        name.symlink_to(victim)
    write_atomic(target, b"as_token: x\n")
    assert victim.read_bytes() == b"keep me"
    assert target.read_bytes() == b"as_token: x\n"
    assert all(name.is_symlink() for name in planted)
    assert len(list(tmp_path.iterdir())) == 2 + len(planted)


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    """If the write fails, the old file is intact and no temporary file is left."""
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_missing_directory_raises(tmp_path: Path) -> None:
    """A target in a missing directory fails loudly rather than writing elsewhere."""
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "f", b"x")

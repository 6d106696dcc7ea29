"""A file the relay's user may not write is one line naming the uid and the chown to run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from relay.core.exit_codes import EXIT_ERROR


def _unwritable(tmp_path: Path) -> Path:
    """A config path whose directory refuses new files to the current user."""
    if os.getuid() == 0:
        # Root writes anywhere on a normal file system; sysfs refuses new files even to root.
        return Path("/sys/media-relay-test-config.yaml")
    data = tmp_path / "data"
    data.mkdir(mode=0o555)  # like a root-owned directory mounted on /data
    return data / "config.yaml"


def test_unwritable_config_directory_names_uid_and_chown(tmp_path: Path) -> None:
    """--create-missing where the config cannot be written exits 1 with the uid and a chown."""
    config = _unwritable(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "run", "-c", str(config), "--create-missing"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
        check=False,
    )
    assert proc.returncode == EXIT_ERROR, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("media-relay: error: [Errno 13] Permission denied")
    assert f"uid {os.getuid()}" in lines[0]
    assert "chown -R 1337:1337" in lines[0]
    assert not config.exists()

"""``media-relay demo --once``: the README's quick start works end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.synapse


def test_demo_once_serves_the_posted_image(tmp_path: Path) -> None:
    """The demo posts an image, prints a signed URL, fetches it and gets the same bytes."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "demo", "--once", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        env=environ,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    url_lines = [line.strip() for line in result.stdout.splitlines() if "://127.0.0.1:" in line]
    assert url_lines and url_lines[0].startswith("http://127.0.0.1:")
    assert "matches the upload" in result.stdout
    # The demo went through the operator's files: a filled config and a registration.
    config = (tmp_path / "config.yaml").read_text()
    assert "as_token: generate" not in config and "# Every key can be overridden" in config
    assert "sender_localpart: mediarelay" in (tmp_path / "registration.yaml").read_text()

"""``media-relay sign``: prints a working signed URL, refuses unseen media unless --force."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from relay.core.exit_codes import EXIT_DATABASE, EXIT_ERROR, EXIT_OK, EXIT_USAGE
from tests.harness import make_png
from tests.harness.links import fetch, post_media, run_sign
from tests.harness.matrix_client import MatrixUser
from tests.harness.relay import MakeConfig, StartRelay

pytestmark = pytest.mark.synapse


async def test_sign_prints_a_working_url(
    make_config: MakeConfig,
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """For media seen in a served room, stdout is exactly one URL that serves the bytes."""
    relay = await start_relay(make_config())
    data = make_png(24, 24)
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    code, out, err = await run_sign(
        tmp_path / "config.yaml", mxc, "--ttl", "120", "--filename", "my cat.png"
    )
    assert code == EXIT_OK, err
    assert out.count("\n") == 1
    url = out.strip()
    assert url.startswith(relay.config.public.url)
    assert url.endswith("/" + quote("my cat.png", safe=""))
    assert "valid until" in err
    status, headers, body = await fetch(http_session, url)
    assert (status, body) == (200, data)
    assert headers["Content-Disposition"] == "inline; filename*=utf-8''my%20cat.png"
    assert 0 < int(headers["Cache-Control"].rpartition("=")[2]) <= 120


async def test_unseen_media_needs_force(
    make_config: MakeConfig, start_relay: StartRelay, tmp_path: Path
) -> None:
    """Unseen media is refused (non-zero, a hint about --force, nothing on stdout)."""
    await start_relay(make_config())
    code, out, err = await run_sign(tmp_path / "config.yaml", "mxc://localhost/NotSeenHere")
    assert code == EXIT_ERROR
    assert out == ""
    assert "--force" in err


async def test_force_signs_without_the_database(make_config: MakeConfig, tmp_path: Path) -> None:
    """--force signs unseen media and needs no database at all."""
    config = make_config(database="postgresql://nobody@127.0.0.1:9/none")
    code, out, err = await run_sign(tmp_path / "config.yaml", "mxc://localhost/Unseen", "--force")
    assert code == EXIT_OK, err
    assert out.startswith(config.public.url) and out.count("\n") == 1


async def test_unusable_database_is_the_database_exit(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    """Without --force an unreachable database exits 5 with a message, printing no URL."""
    make_config(database="postgresql://nobody@127.0.0.1:9/none")
    code, out, err = await run_sign(tmp_path / "config.yaml", "mxc://localhost/Unseen")
    assert code == EXIT_DATABASE
    assert out == ""
    assert "--force" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mxc://localhost/../../v3/joined_rooms"], "invalid media id"),
        (["https://localhost/abc"], "must start with mxc://"),
        (["mxc://localhost/abc", "--width", "64"], "both --width and --height"),
        (["mxc://localhost/abc", "--method", "crop"], "need --width and --height"),
        (["mxc://localhost/abc", "--width", "0", "--height", "5"], "--width and --height"),
        (["mxc://localhost/abc", "--ttl", "0"], "--ttl"),
        (["mxc://localhost/abc", "--filename", ".."], "cannot sign"),
    ],
)
async def test_bad_arguments_exit_2(
    make_config: MakeConfig, tmp_path: Path, args: list[str], message: str
) -> None:
    """Invalid mxc URIs and inconsistent options exit 2 with a clear message and no URL."""
    make_config()
    code, out, err = await run_sign(tmp_path / "config.yaml", *args, "--force")
    assert code == EXIT_USAGE
    assert out == ""
    assert message in err


async def test_thumbnail_link(make_config: MakeConfig, tmp_path: Path) -> None:
    """--width/--height/--method bind a thumbnail variant into the token."""
    make_config()
    code, out, err = await run_sign(
        tmp_path / "config.yaml",
        "mxc://localhost/abc",
        *("--width", "64", "--height", "32", "--method", "crop", "--animated", "--force"),
    )
    assert code == EXIT_OK, err
    assert out.strip().rsplit("/", 1)[1].split(".")[3] == "c64x32a"

"""``media-relay audit``: the rows match what the bridge API and ``media-relay sign`` granted."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import aiohttp
import pytest

from relay.core.exit_codes import EXIT_OK, EXIT_USAGE
from relay.core.mxc import parse_mxc
from relay.store.audit import AuditRow, AuditTrail
from tests.harness import make_png
from tests.harness.links import post_media, run_cli, sign
from tests.harness.matrix_client import MatrixUser, image_content
from tests.harness.relay import BRIDGE_TOKEN, MakeConfig, StartRelay
from tests.harness.waiting import eventually

pytestmark = pytest.mark.synapse


async def audit_lines(config: Path, mxc: str) -> list[dict[str, object]]:
    code, out, err = await run_cli(config, "audit", mxc)
    assert code == EXIT_OK, err
    return [json.loads(line) for line in out.splitlines()]


async def test_audit_lists_every_grant(
    make_config: MakeConfig,
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Sign, thumbnail sign, rewrite (link and preview) and the CLI: one row each, as granted."""
    relay = await start_relay(make_config())
    config = tmp_path / "config.yaml"
    data = make_png(32, 32, (secrets.randbelow(256), 3, 5))
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    assert await audit_lines(config, mxc) == []

    plain = await sign(http_session, relay, mxc, ttl=99_999)  # clamped to the bridge's 7200
    thumb = await sign(http_session, relay, mxc, thumbnail={"width": 64, "height": 48})
    async with http_session.post(
        relay.internal_url + "/_relay/v1/rewrite",
        json={"content": image_content(mxc, body="cat.png", mimetype="image/png")},
        headers={"Authorization": f"Bearer {BRIDGE_TOKEN}"},
    ) as resp:
        assert resp.status == 200
        (rewritten,) = (await resp.json())["media"]
    code, _, err = await run_cli(config, "sign", mxc, "--ttl", "60")
    assert code == EXIT_OK, err

    async def all_rows() -> list[dict[str, object]]:
        lines = await audit_lines(config, mxc)
        return lines if len(lines) == 5 else []

    lines = await eventually(all_rows, within=5)
    assert [set(line) for line in lines] == [
        {"signed_at", "bridge", "mxc", "variant", "expires_at"}
    ] * 5
    assert all(line["mxc"] == mxc for line in lines)
    signed_at = [int(str(line["signed_at"])) for line in lines]
    assert signed_at == sorted(signed_at)
    granted = sorted(
        [
            ("testbridge", "original", plain["expires_at"]),
            ("testbridge", "thumb-64x48-scale", thumb["expires_at"]),
            ("testbridge", "original", rewritten["expires_at"]),
            ("testbridge", "thumb-320x240-scale", rewritten["thumbnail_expires_at"]),
        ]
    )
    bridge_rows = sorted(
        (str(line["bridge"]), str(line["variant"]), line["expires_at"])
        for line in lines
        if line["bridge"] != "cli"
    )
    assert bridge_rows == granted
    (cli_row,) = [line for line in lines if line["bridge"] == "cli"]
    assert cli_row["variant"] == "original"
    assert 0 < int(str(cli_row["expires_at"])) - int(str(cli_row["signed_at"])) <= 61_000


async def test_rows_past_retention_are_swept(
    make_config: MakeConfig, start_relay: StartRelay, tmp_path: Path
) -> None:
    """The relay's periodic sweep removes rows older than signing.audit_retention."""
    relay = await start_relay(make_config(signing={"audit_retention": 1}))
    assert relay.store is not None
    trail = AuditTrail(relay.store.db)
    media = parse_mxc("mxc://localhost/old")
    await trail.insert([AuditRow(1_000, "irc", media, "original", 2_000)])

    async def swept() -> bool:
        return await trail.for_media(media) == []

    await eventually(swept, within=3)


async def test_malformed_mxc_exits_2(make_config: MakeConfig, tmp_path: Path) -> None:
    """A bad mxc is one line on stderr and exit 2."""
    make_config()
    code, out, err = await run_cli(tmp_path / "config.yaml", "audit", "mxc://localhost/../x")
    assert (code, out) == (EXIT_USAGE, "")
    assert err.count("\n") == 1 and "invalid media id" in err

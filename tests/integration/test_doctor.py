"""``media-relay doctor`` against the real Synapse: passes when healthy, names what is broken."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from aiohttp import web

from relay.cli.doctor import Finding, diagnose
from relay.core.exit_codes import EXIT_ERROR, EXIT_HOMESERVER, EXIT_OK
from tests.harness.loopback import start_loopback
from tests.harness.relay import MakeConfig, StartRelay

pytestmark = pytest.mark.synapse

CHECKS = [
    "config",
    "database",
    "homeserver",
    "authenticated media",
    "as_token",
    "homeserver → appservice.address",
    "public.url → relay",
]


async def _doctor(config: Path) -> tuple[int, str]:
    """Run the real command line in a child process: (exit code, stdout)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "doctor", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    assert not err.strip() or b"Traceback" not in err, err.decode()
    return proc.returncode, out.decode()


def _by_name(findings: list[Finding]) -> dict[str, Finding]:
    assert [f.check for f in findings] == CHECKS
    return {f.check: f for f in findings}


async def test_healthy_setup_passes(
    make_config: MakeConfig, start_relay: StartRelay, tmp_path: Path
) -> None:
    """With Synapse and the relay running, every check passes and the command exits 0."""
    await start_relay(make_config())
    code, out = await _doctor(tmp_path / "config.yaml")
    assert code == EXIT_OK, out
    assert out.splitlines()[-1] == f"all {len(CHECKS)} checks passed"
    assert "FAIL" not in out
    assert "reaches this relay" in out


async def test_unreachable_homeserver_is_named(make_config: MakeConfig, tmp_path: Path) -> None:
    """A homeserver that does not answer is named with its address and a fix; exit code 4."""
    make_config(homeserver={"address": "http://127.0.0.1:9"})
    code, out = await _doctor(tmp_path / "config.yaml")
    assert code == EXIT_HOMESERVER
    lines = out.splitlines()
    fail = next(i for i, line in enumerate(lines) if line.startswith("FAIL  homeserver:"))
    assert "unreachable: http://127.0.0.1:9" in lines[fail]
    assert lines[fail + 1].lstrip().startswith("fix: check homeserver.address")
    assert lines[0].startswith("ok    config:")
    assert lines[1].startswith("ok    database:")


async def test_relay_not_running_says_so(make_config: MakeConfig, tmp_path: Path) -> None:
    """Without a running relay the homeserver checks pass and both routes say to start it."""
    make_config()
    found = _by_name(await diagnose(tmp_path / "config.yaml"))
    for name in CHECKS[:5]:
        assert found[name].ok, found[name]
    for name in CHECKS[5:]:
        assert not found[name].ok
        assert "start the relay, then run doctor again" in found[name].detail
    assert "M_CONNECTION_FAILED" in found["homeserver → appservice.address"].detail
    assert "appservice.address" in found["homeserver → appservice.address"].fix


async def test_unknown_as_token(make_config: MakeConfig, tmp_path: Path) -> None:
    """An as_token the homeserver does not know points at app_service_config_files."""
    make_config(appservice={"as_token": "x" * 40})
    found = _by_name(await diagnose(tmp_path / "config.yaml"))
    assert found["homeserver"].ok
    token = found["as_token"]
    assert not token.ok
    assert token.exit_code == EXIT_HOMESERVER
    assert "M_UNKNOWN_TOKEN" in token.detail
    assert "app_service_config_files" in token.fix
    assert found["homeserver → appservice.address"].detail.startswith("not checked")


async def test_other_signing_key_is_refused(
    make_config: MakeConfig, start_relay: StartRelay, tmp_path: Path
) -> None:
    """A relay answering public.url with other signing keys fails the probe (403 seen)."""
    await start_relay(make_config())
    make_config(signing={"keys": [{"id": "k9", "secret": "other-secret-" + "o" * 32}]})
    found = _by_name(await diagnose(tmp_path / "config.yaml"))
    assert found["homeserver → appservice.address"].ok
    probe = found["public.url → relay"]
    assert not probe.ok
    assert "signing key" in probe.detail
    assert probe.exit_code == EXIT_ERROR


async def test_proxy_page_is_not_the_relay(
    make_config: MakeConfig, start_relay: StartRelay, tmp_path: Path
) -> None:
    """public.url answered by something else (a proxy's HTML 404) fails with the route fix."""
    await start_relay(make_config())

    async def page(request: web.Request) -> web.Response:
        return web.Response(status=404, text="<h1>Not Found</h1>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    runner, port = await start_loopback(app)
    try:
        make_config(public={"url": f"http://127.0.0.1:{port}/media/"})
        found = _by_name(await diagnose(tmp_path / "config.yaml"))
    finally:
        await runner.cleanup()
    probe = found["public.url → relay"]
    assert not probe.ok
    assert "something other than the relay answered 404" in probe.detail
    assert "reverse proxy" in probe.fix

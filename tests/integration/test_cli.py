"""The ``media-relay`` command as an operator runs it: files, exit codes, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from ruamel.yaml import YAML

from relay.core.exit_codes import EXIT_CONFIG, EXIT_DATABASE, EXIT_HOMESERVER, EXIT_NEEDS_SETUP
from relay.devtools.local_synapse import LocalSynapse, free_ports
from tests.harness.waiting import eventually

EXAMPLE = Path(__file__).parents[2] / "relay" / "config.example.yaml"


def media_relay(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environ, **(env or {})},
    )


def edited_example(path: Path, **values: object) -> Path:
    """The example config with some dotted keys changed, comments kept."""
    yaml = YAML()
    doc = yaml.load(EXAMPLE.read_text())
    for dotted, value in values.items():
        section, key = dotted.split("__")
        doc[section][key] = value
    with path.open("w") as f:
        yaml.dump(doc, f)
    return path


def test_version_and_help(tmp_path: Path) -> None:
    """--version prints the version; --help lists the commands and the exit codes."""
    version = media_relay("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("media-relay ")
    helptext = media_relay("--help", cwd=tmp_path).stdout
    for word in ("generate-registration", "check-config", "sign", "demo", "exit codes"):
        assert word in helptext


def test_bad_config_is_one_line_and_never_overwritten(tmp_path: Path) -> None:
    """A config that fails validation exits 3 with one line and is left byte for byte."""
    config = edited_example(tmp_path / "config.yaml", appservice__port="abc")
    before = config.read_bytes()
    for command in ("check-config", "generate-registration"):
        result = media_relay(command, "-c", str(config), cwd=tmp_path)
        assert result.returncode == EXIT_CONFIG
        assert result.stderr.strip().splitlines() == [
            "media-relay: error: appservice.port: expected an integer 1-65535, got 'abc'"
        ]
        assert "Traceback" not in result.stderr
    assert config.read_bytes() == before
    assert not (tmp_path / "registration.yaml").exists()


def test_create_missing_config(tmp_path: Path) -> None:
    """--create-missing copies the example and exits 6 telling the operator what to edit."""
    result = media_relay("run", "-c", "config.yaml", "--create-missing", cwd=tmp_path)
    assert result.returncode == EXIT_NEEDS_SETUP
    assert (tmp_path / "config.yaml").read_text() == EXAMPLE.read_text()
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o600  # secrets go in here
    assert "homeserver.address" in result.stderr and "public.url" in result.stderr


def test_database_unusable_exit_code(tmp_path: Path) -> None:
    """An unusable database exits 5 with one line naming it."""
    config = edited_example(tmp_path / "config.yaml", homeserver__address="http://127.0.0.1:9")
    assert media_relay("generate-registration", "-c", str(config), cwd=tmp_path).returncode == 0
    result = media_relay(
        "-c", str(config), cwd=tmp_path, env={"RELAY_DATABASE": "sqlite:no/such/dir/relay.db"}
    )
    assert result.returncode == EXIT_DATABASE
    assert result.stderr.strip().splitlines()[-1].startswith("media-relay: error: database ")


def test_unreachable_homeserver_exit_code(tmp_path: Path) -> None:
    """A homeserver that does not answer exits 4 with one clear line and no traceback."""
    config = edited_example(tmp_path / "config.yaml", homeserver__address="http://127.0.0.1:9")
    assert media_relay("generate-registration", "-c", str(config), cwd=tmp_path).returncode == 0
    result = media_relay("-c", str(config), cwd=tmp_path)
    assert result.returncode == EXIT_HOMESERVER
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("media-relay: error: homeserver unreachable")
    assert "Traceback" not in result.stderr


@pytest.mark.synapse
async def test_operator_flow_with_generated_registration(tmp_path: Path) -> None:
    """A generated registration works with Synapse; the relay runs, is pinged, stops on SIGTERM."""
    internal, public, synapse_port = free_ports(3)
    config = edited_example(
        tmp_path / "config.yaml",
        homeserver__address=f"http://127.0.0.1:{synapse_port}",
        homeserver__domain="localhost",
        appservice__port=internal,
        appservice__address=f"http://127.0.0.1:{internal}",
        public__hostname="127.0.0.1",
        public__port=public,
        public__url=f"http://127.0.0.1:{public}/",
    )
    generated = media_relay(
        "generate-registration", "-c", str(config), "-r", "reg.yaml", cwd=tmp_path
    )
    assert generated.returncode == 0, generated.stderr
    as_token = YAML(typ="safe").load((tmp_path / "reg.yaml").read_text())["as_token"]

    async with LocalSynapse(tmp_path / "synapse", [tmp_path / "reg.yaml"], port=synapse_port) as hs:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            "-c",
            str(config),
            cwd=tmp_path,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with aiohttp.ClientSession() as session:

                async def healthy() -> bool:
                    try:
                        async with session.get(f"http://127.0.0.1:{public}/_relay/health") as r:
                            return r.status == 200
                    except aiohttp.ClientError:
                        return False

                await eventually(healthy, within=30)
                async with session.post(
                    f"{hs.base_url}/_matrix/client/v1/appservice/media-relay/ping",
                    json={"transaction_id": "cli-test"},
                    headers={"Authorization": f"Bearer {as_token}"},
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    assert "duration_ms" in await resp.json()
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 0, stderr.decode()
    log = stderr.decode()
    assert f"internal listener (homeserver and bridges) on http://127.0.0.1:{internal}" in log
    assert f"public listener (signed media links) on http://127.0.0.1:{public}" in log
    assert "homeserver ping (transaction_id=cli-test)" in log
    assert "stopping" in log

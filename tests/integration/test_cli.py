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


def test_check_config_names_every_mistake(tmp_path: Path) -> None:
    """Three independent mistakes give three lines in one run, exit 3, file untouched."""
    config = edited_example(
        tmp_path / "config.yaml",
        appservice__port="abc",
        signing__tll=60,
        media__max_size="lots",
    )
    before = config.read_bytes()
    result = media_relay("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.strip().splitlines() == [
        "media-relay: error: appservice.port: expected an integer 1-65535, got 'abc'",
        "media-relay: error: media.max_size: expected a size such as 100M or 10G, got 'lots'",
        "media-relay: error: signing.tll: unknown key (did you mean 'ttl'?)",
    ]
    assert config.read_bytes() == before


def test_placeholder_never_hides_broken_bridges(tmp_path: Path) -> None:
    """With 'generate' tokens and a broken bridges list, every command names the bridges."""
    config = tmp_path / "config.yaml"
    config.write_text(EXAMPLE.read_text().replace("  - name: example-bridge", "    name: x"))
    before = config.read_bytes()
    for command in ("check-config", "generate-registration", "run"):
        result = media_relay(command, "-c", str(config), cwd=tmp_path)
        assert result.returncode == EXIT_CONFIG
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith("media-relay: error: bridges: expected a list, got "), lines
        assert len(lines) == 1
    assert config.read_bytes() == before
    assert not (tmp_path / "registration.yaml").exists()


def test_check_config_before_generate_names_the_placeholders(tmp_path: Path) -> None:
    """The untouched example fails only on its placeholders, each telling what to run."""
    config = tmp_path / "config.yaml"
    config.write_text(EXAMPLE.read_text())
    result = media_relay("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == EXIT_CONFIG
    keys = ["appservice.as_token", "appservice.hs_token", "signing.keys[0].secret"]
    assert result.stderr.strip().splitlines() == [
        f"media-relay: error: {key}: still 'generate'; run media-relay generate-registration first"
        for key in [*keys, "bridges[0].token"]
    ]


def test_unknown_relay_variable_is_an_error(tmp_path: Path) -> None:
    """A mistyped RELAY_ variable is reported with the near miss; tooling variables are not."""
    config = edited_example(tmp_path / "config.yaml")
    assert media_relay("generate-registration", "-c", str(config), cwd=tmp_path).returncode == 0
    env = {"RELAY_PUBLIC_ULR": "https://x/", "RELAY_TEST_ANYTHING": "1", "RELAY_VENV": "/v"}
    result = media_relay("check-config", "-c", str(config), cwd=tmp_path, env=env)
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.strip().splitlines() == [
        "media-relay: error: RELAY_PUBLIC_ULR: unknown key public.ulr "
        "(did you mean RELAY_PUBLIC_URL?)"
    ]
    ok = media_relay("check-config", "-c", str(config), cwd=tmp_path, env={"RELAY_VENV": "/v"})
    assert ok.returncode == 0 and ok.stdout.startswith(f"{config}: OK (homeserver ")


def test_generated_files_are_private(tmp_path: Path) -> None:
    """After generate-registration the config and the registration are 0600; a config that
    others could read is tightened, and the operator is told in one line."""
    config = edited_example(tmp_path / "config.yaml")
    config.chmod(0o644)
    result = media_relay("generate-registration", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert config.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "registration.yaml").stat().st_mode & 0o777 == 0o600
    told = [line for line in result.stderr.splitlines() if "its mode was" in line]
    assert len(told) == 1 and told[0].endswith(
        f"{config} holds secrets: its mode was 644, it is now 600"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "registration.yaml"]


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

"""What every benchmark needs: a registration, a relay config, the relay as a subprocess.

The relay runs as its own process (``python -m relay run -c …``) so that the load
generator never shares its event loop, exactly as an operator would run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
from ruamel.yaml import YAML

from relay.devtools.local_synapse import LocalSynapse, free_ports

SERVER_NAME = "localhost"
HEALTH_TIMEOUT = 30.0


def _secret() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class RelaySetup:
    """One relay under test: its appservice identity and its two ports."""

    workdir: Path
    appservice_id: str
    bot_localpart: str
    internal_port: int
    public_port: int
    as_token: str = field(default_factory=_secret)
    hs_token: str = field(default_factory=_secret)

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}"


def prepare(
    workdir: Path, appservice_id: str, bot_localpart: str, **synapse_config: Any
) -> tuple[RelaySetup, LocalSynapse]:
    """Ports, the relay's identity and registration, and a (not yet started) Synapse."""
    internal, public, synapse_port = free_ports(3)
    setup = RelaySetup(workdir, appservice_id, bot_localpart, internal, public)
    synapse = LocalSynapse(
        workdir=workdir / "synapse",
        registration_files=[write_registration(setup)],
        server_name=SERVER_NAME,
        port=synapse_port,
        extra_config=synapse_config,
    )
    return setup, synapse


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with path.open("w", encoding="utf-8") as out:
        yaml.dump(data, out)
    return path


def write_registration(setup: RelaySetup) -> Path:
    """The appservice registration Synapse loads (written before Synapse starts)."""
    bot = f"@{setup.bot_localpart}:{SERVER_NAME}"
    return write_yaml(
        setup.workdir / "registration.yaml",
        {
            "id": setup.appservice_id,
            "url": setup.internal_url,
            "as_token": setup.as_token,
            "hs_token": setup.hs_token,
            "sender_localpart": setup.bot_localpart,
            "rate_limited": False,
            "namespaces": {
                "users": [{"exclusive": True, "regex": "^" + re.escape(bot) + "$"}],
                "aliases": [],
                "rooms": [],
            },
        },
    )


def relay_config(
    setup: RelaySetup,
    synapse: LocalSynapse,
    *,
    database: str,
    cache_dir: Path,
    **sections: Any,
) -> dict[str, Any]:
    """A production-like config (defaults everywhere but addresses), plus ``sections``.

    A mapping in ``sections`` is merged into the section of that name; anything else
    replaces it.
    """
    config: dict[str, Any] = {
        "homeserver": {"address": synapse.base_url, "domain": SERVER_NAME},
        "appservice": {
            "id": setup.appservice_id,
            "bot_localpart": setup.bot_localpart,
            "as_token": setup.as_token,
            "hs_token": setup.hs_token,
            "hostname": "127.0.0.1",
            "port": setup.internal_port,
            "address": setup.internal_url,
        },
        "public": {
            "url": f"http://127.0.0.1:{setup.public_port}/",
            "hostname": "127.0.0.1",
            "port": setup.public_port,
        },
        "database": database,
        "media": {"cache_dir": str(cache_dir)},
        "signing": {"keys": [{"id": "k1", "secret": _secret()}]},
        "bridges": [],
        "logging": {"level": "WARNING"},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name].update(value)
        else:
            config[name] = value
    return config


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def spawn_relay(config: Path, log_file: IO[bytes]) -> subprocess.Popen[bytes]:
    # Popen returns at once; a sync helper keeps the blocking-call lint honest.
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "run", "-c", str(config)],
        cwd=config.parent,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )


@contextlib.asynccontextmanager
async def relay_process(config: Path, internal_port: int) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``python -m relay run -c config`` until its health check answers; SIGTERM afterwards."""
    log_path = config.with_name("relay.log")
    with log_path.open("wb") as log_file:
        process = spawn_relay(config, log_file)
        try:
            await wait_healthy(process, internal_port, log_path)
            yield process
        finally:
            await stop_process(process)


async def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 15)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


async def wait_healthy(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    url = f"http://127.0.0.1:{port}/_relay/health"
    deadline = time.monotonic() + HEALTH_TIMEOUT
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"relay exited with {process.returncode}:\n{log_tail(log_path)}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(
        f"relay did not become healthy in {HEALTH_TIMEOUT:.0f} s:\n{log_tail(log_path)}"
    )

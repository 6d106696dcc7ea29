"""Fixtures that run the relay under test: databases (SQLite and PostgreSQL) and relay processes."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from mautrix.util.async_db import Database
from ruamel.yaml import YAML

from relay.app import Relay
from relay.config.loading import load
from relay.config.settings import Config
from relay.devtools.local_synapse import LocalSynapse, free_ports
from relay.store.revocation_feed import APPLICATION_NAME
from tests.harness.fixtures import RelayPorts, RelayRegistration, run_coroutine_in_thread

POSTGRES_URL = os.environ.get(
    "RELAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
BRIDGE_TOKEN = "bridge-token-" + "b" * 32
SIGNING_SECRET = "signing-secret-" + "s" * 32


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def listener_pids(db: Database) -> list[int]:
    """The backends of ``db``'s PostgreSQL that listen for revocations (one per feed)."""
    rows = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
        " AND datname = current_database()",
        APPLICATION_NAME,
    )
    return [int(r["pid"]) for r in rows]


@pytest.fixture(scope="session")
def postgres_available() -> None:
    """PostgreSQL must be there; in CI a missing server fails the run instead of skipping."""
    try:
        run_coroutine_in_thread(lambda: _admin("SELECT 1"))
    except Exception as e:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {POSTGRES_URL} is required in CI: {e}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {e}")


def _fresh_postgres_database() -> Iterator[str]:
    name = f"relay_test_{secrets.token_hex(6)}"
    run_coroutine_in_thread(lambda: _admin(f'CREATE DATABASE "{name}"'))
    base, _, _ = POSTGRES_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        run_coroutine_in_thread(lambda: _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using this runs twice: on a fresh SQLite file and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'relay.db'}"
        return
    request.getfixturevalue("postgres_available")
    yield from _fresh_postgres_database()


@pytest.fixture
def postgres_url(postgres_available: None) -> Iterator[str]:
    """A fresh PostgreSQL database for tests that need PostgreSQL specifically."""
    yield from _fresh_postgres_database()


def relay_config_dict(
    synapse: LocalSynapse,
    registration: RelayRegistration,
    ports: RelayPorts,
    workdir: Path,
    database: str,
) -> dict[str, Any]:
    return {
        "homeserver": {"address": synapse.base_url, "domain": registration.server_name},
        "appservice": {
            "id": registration.id,
            "bot_localpart": registration.bot_localpart,
            "as_token": registration.as_token,
            "hs_token": registration.hs_token,
            "hostname": "127.0.0.1",
            "port": ports.internal,
            "address": registration.url,
        },
        "public": {
            "url": f"http://127.0.0.1:{ports.public}/media/",
            "hostname": "127.0.0.1",
            "port": ports.public,
        },
        "database": database,
        "media": {"cache_dir": str(workdir / "cache"), "max_size": "20M", "not_found_ttl": 60},
        "signing": {"ttl": 3600, "keys": [{"id": "k1", "secret": SIGNING_SECRET}]},
        "bridges": [{"name": "testbridge", "token": BRIDGE_TOKEN, "ttl": 7200}],
        "logging": {"level": "DEBUG"},
    }


def write_config(path: Path, data: dict[str, Any]) -> Path:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with path.open("w", encoding="utf-8") as f:
        yaml.dump(data, f)
    return path


MakeConfig = Callable[..., Config]
StartRelay = Callable[..., Awaitable[Relay]]


@pytest.fixture
def make_config(
    synapse: LocalSynapse,
    relay_registration: RelayRegistration,
    relay_ports: RelayPorts,
    tmp_path: Path,
) -> MakeConfig:
    """Factory: a Config for the relay under test, written as YAML and loaded by the real loader."""

    def factory(database: str | None = None, **overrides: dict[str, Any]) -> Config:
        data = relay_config_dict(
            synapse,
            relay_registration,
            relay_ports,
            tmp_path,
            database or f"sqlite:{tmp_path / 'relay.db'}",
        )
        for section, values in overrides.items():
            if isinstance(data.get(section), dict) and isinstance(values, dict):
                data[section].update(values)
            else:
                data[section] = values
        return load(write_config(tmp_path / "config.yaml", data), environ={})

    return factory


@pytest_asyncio.fixture
async def start_relay(make_config: MakeConfig) -> AsyncIterator[StartRelay]:
    """Factory: ``relay = await start_relay()`` runs a relay; every one started is stopped after."""
    started: list[Relay] = []

    async def factory(config: Config | None = None) -> Relay:
        relay = Relay(config or make_config())
        await relay.start()
        started.append(relay)
        return relay

    yield factory
    for relay in reversed(started):
        await relay.stop()


async def second_relay(
    synapse: LocalSynapse,
    registration: RelayRegistration,
    database: str,
    start_relay: StartRelay,
    tmp_path: Path,
    **media: Any,
) -> Relay:
    """Another relay process's worth of state (own listeners, own cache unless ``media``
    names one) on the same database; ``media`` is laid over its ``media`` section."""
    workdir = tmp_path / "second"
    workdir.mkdir()
    ports = RelayPorts(*free_ports(2))
    data = relay_config_dict(synapse, registration, ports, workdir, database)
    data["media"].update(media)
    return await start_relay(load(write_config(workdir / "config.yaml", data), {}))


RelayPair = Callable[..., Awaitable[tuple[Relay, Relay]]]


@pytest.fixture
def relay_pair(
    synapse: LocalSynapse,
    relay_registration: RelayRegistration,
    postgres_url: str,
    make_config: MakeConfig,
    start_relay: StartRelay,
    tmp_path: Path,
) -> RelayPair:
    """Factory: ``first, second = await relay_pair(**media)``: the harness's relay and a
    second one on one fresh PostgreSQL, both with ``media`` laid over their ``media``
    section; ``share_cache=True`` gives the second the first's cache directory."""

    async def factory(*, share_cache: bool = False, **media: Any) -> tuple[Relay, Relay]:
        first = await start_relay(make_config(database=postgres_url, media=media))
        if share_cache:
            media = {**media, "cache_dir": str(first.config.media.cache_dir)}
        second = await second_relay(
            synapse, relay_registration, postgres_url, start_relay, tmp_path, **media
        )
        return first, second

    return factory


def on(relay: Relay, url: str, first: Relay) -> str:
    """The same link, served by ``relay`` instead of ``first``."""
    return url.replace(
        f"127.0.0.1:{first.config.public.port}", f"127.0.0.1:{relay.config.public.port}"
    )

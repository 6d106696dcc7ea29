"""Pytest plugin: a real Synapse with the relay's appservice registration, and test users.

Load it from ``tests/conftest.py`` with ``pytest_plugins = ["tests.harness.fixtures"]``.

The relay's registration must exist before Synapse starts (Synapse reads
``app_service_config_files`` only at start-up), so the chain is:
``harness_ports`` → ``relay_ports`` / ``relay_registration`` → ``synapse``.

Session fixtures here are synchronous on purpose: the Synapse process belongs to no
event loop (see :mod:`relay.devtools.local_synapse`) and its async start/stop run in a
private loop on a helper thread, so nothing couples them to pytest-asyncio's
per-test loops. Per-test helpers (:class:`MatrixUser`) are async and live in the
test's own loop.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import aiohttp
import pytest
import pytest_asyncio
from ruamel.yaml import YAML

from relay.devtools.local_synapse import LocalSynapse, free_ports
from tests.harness.matrix_client import MatrixUser

T = TypeVar("T")

SERVER_NAME = "localhost"
APPSERVICE_ID = "media-relay"
BOT_LOCALPART = "mediarelay"

MakeUser = Callable[..., Awaitable[MatrixUser]]


class HarnessPorts(NamedTuple):
    """Loopback ports chosen together, so they differ from each other."""

    relay_internal: int
    relay_public: int
    synapse: int


class RelayPorts(NamedTuple):
    internal: int
    public: int


@dataclass(frozen=True)
class RelayRegistration:
    """The appservice registration the harness gives Synapse for the relay under test."""

    path: Path
    id: str
    url: str
    as_token: str
    hs_token: str
    bot_localpart: str
    sender_localpart: str
    server_name: str
    rate_limited: bool = False

    @property
    def bot_user_id(self) -> str:
        return f"@{self.bot_localpart}:{self.server_name}"

    @property
    def user_regex(self) -> str:
        # Synapse matches namespaces with re.match, so anchor both ends.
        return "^" + re.escape(self.bot_user_id) + "$"

    def as_dict(self) -> dict[str, Any]:
        """The registration file's content (Application Service API "Registration")."""
        return {
            "id": self.id,
            "url": self.url,
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "sender_localpart": self.sender_localpart,
            "rate_limited": self.rate_limited,
            "namespaces": {
                "users": [{"exclusive": True, "regex": self.user_regex}],
                "aliases": [],
                "rooms": [],
            },
        }


def run_coroutine_in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion in a fresh event loop on a helper thread.

    Keeps synchronous session fixtures free of any event loop that pytest-asyncio
    owns (``asyncio.run`` on the main thread would replace its current loop).
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make()))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="harness-async")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


@pytest.fixture(scope="session")
def harness_ports() -> HarnessPorts:
    """Free loopback ports for the relay's two listeners and for Synapse."""
    return HarnessPorts(*free_ports(3))


@pytest.fixture(scope="session")
def relay_ports(harness_ports: HarnessPorts) -> RelayPorts:
    """(internal, public) loopback ports reserved for the relay under test."""
    return RelayPorts(harness_ports.relay_internal, harness_ports.relay_public)


@pytest.fixture(scope="session")
def synapse_server_name() -> str:
    """The Matrix server name of the test homeserver (independent of its port)."""
    return SERVER_NAME


@pytest.fixture(scope="session")
def relay_registration(
    tmp_path_factory: pytest.TempPathFactory, relay_ports: RelayPorts, synapse_server_name: str
) -> RelayRegistration:
    """The relay's appservice registration, written as YAML before Synapse starts."""
    directory = tmp_path_factory.mktemp("registration")
    registration = RelayRegistration(
        path=directory / "registration.yaml",
        id=APPSERVICE_ID,
        url=f"http://127.0.0.1:{relay_ports.internal}",
        as_token=secrets.token_urlsafe(32),
        hs_token=secrets.token_urlsafe(32),
        bot_localpart=BOT_LOCALPART,
        sender_localpart=BOT_LOCALPART,
        server_name=synapse_server_name,
    )
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with registration.path.open("w", encoding="utf-8") as out:
        yaml.dump(registration.as_dict(), out)
    return registration


@pytest.fixture(scope="session")
def synapse(
    tmp_path_factory: pytest.TempPathFactory,
    harness_ports: HarnessPorts,
    relay_registration: RelayRegistration,
    synapse_server_name: str,
) -> Iterator[LocalSynapse]:
    """A running Synapse for the whole session; errors (with the log tail) if it cannot start."""
    homeserver = LocalSynapse(
        workdir=tmp_path_factory.mktemp("synapse"),
        registration_files=[relay_registration.path],
        server_name=synapse_server_name,
        port=harness_ports.synapse,
    )
    run_coroutine_in_thread(homeserver.start)
    try:
        yield homeserver
    finally:
        run_coroutine_in_thread(homeserver.stop)


@pytest_asyncio.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp session in the test's own event loop, closed after the test."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest_asyncio.fixture
async def make_user(synapse: LocalSynapse, http_session: aiohttp.ClientSession) -> MakeUser:
    """Factory: ``await make_user("bob")`` registers a fresh user (random suffix) on Synapse."""

    async def factory(prefix: str = "user", admin: bool = False) -> MatrixUser:
        localpart = f"{prefix}-{secrets.token_hex(4)}"
        user_id, access_token = await synapse.register_user(localpart, admin=admin)
        return MatrixUser(synapse.base_url, user_id, access_token, http_session)

    return factory


@pytest_asyncio.fixture
async def alice(make_user: MakeUser) -> MatrixUser:
    """A freshly registered user for this test."""
    return await make_user("alice")


@pytest_asyncio.fixture
async def relay_bot(
    synapse: LocalSynapse,
    relay_registration: RelayRegistration,
    http_session: aiohttp.ClientSession,
) -> MatrixUser:
    """The appservice's own identity (its as_token), as the relay uses it."""
    return MatrixUser(
        synapse.base_url, relay_registration.bot_user_id, relay_registration.as_token, http_session
    )

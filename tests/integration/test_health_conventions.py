"""The mautrix bridges' health paths answer like the relay's own, on the internal listener only."""

from __future__ import annotations

import aiohttp
import pytest

from tests.harness.relay import StartRelay

pytestmark = pytest.mark.synapse

# (mautrix path, the relay's own path it mirrors)
PAIRS = [("/_matrix/mau/live", "/_relay/health"), ("/_matrix/mau/ready", "/_relay/ready")]


async def _answer(session: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with session.get(url) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(("mau", "own"), PAIRS)
async def test_mau_paths_match_the_relays_own(
    start_relay: StartRelay, http_session: aiohttp.ClientSession, mau: str, own: str
) -> None:
    """/_matrix/mau/live and /ready give the same status and body as /_relay/health and /ready."""
    relay = await start_relay()
    mine = await _answer(http_session, relay.internal_url + own)
    theirs = await _answer(http_session, relay.internal_url + mau)
    assert mine[0] == 200
    assert theirs == mine


async def test_mau_ready_reports_database_loss(
    start_relay: StartRelay, http_session: aiohttp.ClientSession
) -> None:
    """/_matrix/mau/ready turns 503 naming the database when it stops answering."""
    relay = await start_relay()
    assert relay.store is not None
    await relay.store.db.stop()
    status, body = await _answer(http_session, relay.internal_url + "/_matrix/mau/ready")
    assert status == 503
    assert isinstance(body, dict)
    assert body["status"] == "unavailable"
    assert [p.split(":")[0] for p in body["problems"]] == ["database"]


@pytest.mark.parametrize("path", [p for p, _ in PAIRS])
async def test_mau_paths_absent_from_public_listener(
    start_relay: StartRelay, http_session: aiohttp.ClientSession, path: str
) -> None:
    """The public listener serves no mautrix path: only signed links and its own health."""
    relay = await start_relay()
    status, body = await _answer(http_session, relay.public_url + path)
    assert status == 404
    assert isinstance(body, dict)
    assert body["errcode"] == "M_UNRECOGNIZED"

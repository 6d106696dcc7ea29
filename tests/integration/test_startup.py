"""The relay process against a real Synapse: start-up checks, listeners, ping, health, shutdown."""

from __future__ import annotations

import aiohttp
import pytest

from relay.core.exit_codes import EXIT_HOMESERVER, StartupError
from relay.upstream.homeserver import HomeserverClient
from tests.harness.relay import MakeConfig, StartRelay

pytestmark = pytest.mark.synapse


async def test_homeserver_ping_reaches_relay(start_relay: StartRelay) -> None:
    """POST /_matrix/client/v1/appservice/{id}/ping on Synapse makes it call the relay's ping."""
    relay = await start_relay()
    assert relay.homeserver is not None
    answer = await relay.homeserver.ping_appservice(relay.config.appservice.id)
    assert isinstance(answer.get("duration_ms"), int)


async def test_health_on_both_listeners(
    start_relay: StartRelay, http_session: aiohttp.ClientSession
) -> None:
    """GET /_relay/health answers 200 on the internal and the public listener."""
    relay = await start_relay()
    for base in (relay.internal_url, relay.public_url):
        async with http_session.get(base + "/_relay/health") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"


async def test_unknown_route_and_wrong_method(
    start_relay: StartRelay, http_session: aiohttp.ClientSession
) -> None:
    """Unknown routes answer 404 M_UNRECOGNIZED; a wrong method 405 M_UNRECOGNIZED."""
    relay = await start_relay()
    async with http_session.get(relay.public_url + "/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["errcode"] == "M_UNRECOGNIZED"
    async with http_session.post(relay.public_url + "/_relay/health") as resp:
        assert resp.status == 405
        assert (await resp.json())["errcode"] == "M_UNRECOGNIZED"


async def test_wrong_as_token_is_a_homeserver_exit(
    make_config: MakeConfig, start_relay: StartRelay
) -> None:
    """An as_token the homeserver rejects stops start-up with the homeserver exit code."""
    config = make_config(appservice={"as_token": "x" * 40})
    with pytest.raises(StartupError) as e:
        await start_relay(config)
    assert e.value.exit_code == EXIT_HOMESERVER
    assert "as_token" in str(e.value)


async def test_unreachable_homeserver_is_a_homeserver_exit(
    make_config: MakeConfig, start_relay: StartRelay
) -> None:
    """A homeserver that does not answer stops start-up with the homeserver exit code."""
    config = make_config(homeserver={"address": "http://127.0.0.1:9"})
    with pytest.raises(StartupError) as e:
        await start_relay(config)
    assert e.value.exit_code == EXIT_HOMESERVER
    assert "unreachable" in str(e.value)


async def test_bot_identity_is_the_sender_localpart(start_relay: StartRelay) -> None:
    """whoami with the as_token is the registration's sender_localpart."""
    relay = await start_relay()
    assert isinstance(relay.homeserver, HomeserverClient)
    assert await relay.homeserver.whoami() == relay.config.bot_user_id


async def test_metrics_only_on_internal_listener(
    start_relay: StartRelay, http_session: aiohttp.ClientSession
) -> None:
    """GET /metrics is Prometheus text on the internal listener and absent from the public one."""
    relay = await start_relay()
    headers = {"Authorization": f"Bearer {relay.config.appservice.hs_token}"}
    async with http_session.put(
        relay.internal_url + "/_matrix/app/v1/transactions/metrics-test",
        json={"events": []},
        headers=headers,
    ) as resp:
        assert resp.status == 200
    async with http_session.get(relay.internal_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    assert 'relay_transactions_total{outcome="processed"} 1.0' in text
    async with http_session.get(relay.public_url + "/metrics") as resp:
        assert resp.status == 404
        assert (await resp.json())["errcode"] == "M_UNRECOGNIZED"


async def test_ready_reports_database_loss(
    start_relay: StartRelay, http_session: aiohttp.ClientSession
) -> None:
    """GET /_relay/ready turns 503 naming the database when it stops answering."""
    relay = await start_relay()
    async with http_session.get(relay.internal_url + "/_relay/ready") as resp:
        assert resp.status == 200
    assert relay.store is not None
    await relay.store.db.stop()
    async with http_session.get(relay.internal_url + "/_relay/ready") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["status"] == "unavailable"
    assert [p.split(":")[0] for p in body["problems"]] == ["database"]

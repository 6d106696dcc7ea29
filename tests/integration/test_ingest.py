"""The Application Service API of a running relay: tokens, body checks, idempotency, durability.

Transactions here are pushed straight at the relay (as a homeserver would), so that
edge cases a real homeserver will not produce on demand can be shown; the real
Synapse flows are in test_ingest_synapse.py.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import aiohttp
import pytest

from relay.app import Relay
from relay.core.mxc import MediaId
from tests.harness.events import image_event as pushed_image
from tests.harness.relay import MakeConfig, StartRelay

pytestmark = pytest.mark.synapse

ROOM = "!direct:localhost"
# With a room namespace the relay serves ROOM without an invite.
NAMESPACE = {"room_namespace": [r"!direct:localhost"]}


def image_event(event_id: str, media_id: str, room_id: str = ROOM) -> dict[str, Any]:
    return pushed_image(event_id, media_id, room_id)


def new_id() -> str:
    return secrets.token_hex(8)


async def push(
    session: aiohttp.ClientSession,
    relay: Relay,
    txn_id: str,
    body: object,
    *,
    token: str | None = None,
    raw: bytes | None = None,
    query: str = "",
    prefix: str = "/_matrix/app/v1",
) -> tuple[int, dict[str, Any]]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    url = f"{relay.internal_url}{prefix}/transactions/{txn_id}{query}"
    async with session.put(url, data=data, headers=headers) as resp:
        return resp.status, await resp.json()


@pytest.fixture
async def relay(make_config: MakeConfig, start_relay: StartRelay) -> Relay:
    return await start_relay(make_config(appservice=NAMESPACE))


def hs_token(relay: Relay) -> str:
    return relay.config.appservice.hs_token


async def recorded(relay: Relay, media_id: str) -> bool:
    assert relay.store is not None
    return await relay.store.media_record(MediaId("localhost", media_id)) is not None


async def test_transaction_records_media(relay: Relay, http_session: aiohttp.ClientSession) -> None:
    """A pushed m.image is acknowledged with 200 {} and recorded with its metadata."""
    media_id = new_id()
    status, body = await push(
        http_session,
        relay,
        new_id(),
        {"events": [image_event("$e1" + new_id(), media_id)]},
        token=hs_token(relay),
    )
    assert (status, body) == (200, {})
    assert relay.store is not None
    record = await relay.store.media_record(MediaId("localhost", media_id))
    assert record is not None
    assert (record.mimetype, record.size, record.filename) == ("image/png", 1234, "cat.png")
    assert record.room_id == ROOM


@pytest.mark.parametrize(
    ("token", "query", "status", "errcode"),
    [
        (None, "", 401, "M_MISSING_TOKEN"),
        ("wrong-token", "", 403, "M_FORBIDDEN"),
        (None, "?access_token=wrong", 403, "M_FORBIDDEN"),
        ("", "", 403, "M_FORBIDDEN"),
    ],
)
async def test_bad_token_is_refused_and_stores_nothing(
    relay: Relay,
    http_session: aiohttp.ClientSession,
    token: str | None,
    query: str,
    status: int,
    errcode: str,
) -> None:
    """Missing → 401 M_MISSING_TOKEN, wrong → 403 M_FORBIDDEN, and nothing is stored."""
    media_id, txn_id = new_id(), new_id()
    got_status, body = await push(
        http_session,
        relay,
        txn_id,
        {"events": [image_event("$" + new_id(), media_id)]},
        token=token,
        query=query,
    )
    assert (got_status, body["errcode"]) == (status, errcode)
    assert relay.store is not None
    assert not await relay.store.transaction_seen(txn_id)
    assert not await recorded(relay, media_id)


async def test_query_token_must_match_header(
    relay: Relay, http_session: aiohttp.ClientSession
) -> None:
    """The deprecated access_token parameter works alone, but must match a header sent with it."""
    body = {"events": []}
    ok = await push(http_session, relay, new_id(), body, query=f"?access_token={hs_token(relay)}")
    assert ok == (200, {})
    status, err = await push(
        http_session, relay, new_id(), body, token=hs_token(relay), query="?access_token=nope"
    )
    assert (status, err["errcode"]) == (403, "M_FORBIDDEN")


async def test_legacy_unprefixed_path(relay: Relay, http_session: aiohttp.ClientSession) -> None:
    """The legacy /transactions/{txnId} path works like the v1 one."""
    media_id = new_id()
    result = await push(
        http_session,
        relay,
        new_id(),
        {"events": [image_event("$" + new_id(), media_id)]},
        token=hs_token(relay),
        prefix="",
    )
    assert result == (200, {})
    assert await recorded(relay, media_id)


@pytest.mark.parametrize(
    ("raw", "errcode"),
    [
        (b"{not json", "M_NOT_JSON"),
        (b"\xff\xfe", "M_NOT_JSON"),
        (b"[]", "M_BAD_JSON"),
        (b"{}", "M_BAD_JSON"),
        (b'{"events": {}}', "M_BAD_JSON"),
    ],
)
async def test_bad_body_is_400(
    relay: Relay, http_session: aiohttp.ClientSession, raw: bytes, errcode: str
) -> None:
    """A body that is not JSON → M_NOT_JSON; JSON without an events list → M_BAD_JSON."""
    txn_id = new_id()
    status, body = await push(http_session, relay, txn_id, None, raw=raw, token=hs_token(relay))
    assert (status, body["errcode"]) == (400, errcode)
    assert relay.store is not None
    assert not await relay.store.transaction_seen(txn_id)


async def test_oversized_body_is_413(
    make_config: MakeConfig, start_relay: StartRelay, http_session: aiohttp.ClientSession
) -> None:
    """A body over appservice.max_transaction_size → 413 M_TOO_LARGE, nothing stored."""
    relay = await start_relay(make_config(appservice={**NAMESPACE, "max_transaction_size": "4K"}))
    events = [image_event("$" + new_id(), new_id()) for _ in range(40)]
    txn_id = new_id()
    status, body = await push(
        http_session, relay, txn_id, {"events": events}, token=hs_token(relay)
    )
    assert (status, body["errcode"]) == (413, "M_TOO_LARGE")
    assert relay.store is not None
    assert not await relay.store.transaction_seen(txn_id)


async def test_duplicate_transaction_processed_once(
    relay: Relay, http_session: aiohttp.ClientSession
) -> None:
    """The same txn id sent twice is answered 200 both times and processed once."""
    txn_id = new_id()
    body = {"events": [image_event("$" + new_id(), new_id())]}
    for _ in range(2):
        assert await push(http_session, relay, txn_id, body, token=hs_token(relay)) == (200, {})
    assert relay.metrics.value("relay_transactions", {"outcome": "processed"}) == 1
    assert relay.metrics.value("relay_transactions", {"outcome": "duplicate"}) == 1
    assert relay.metrics.value("relay_media_references", {"role": "content"}) == 1


async def test_racing_duplicates_processed_once(
    relay: Relay, http_session: aiohttp.ClientSession
) -> None:
    """Ten concurrent deliveries of one txn id: all answered 200, exactly one processed."""
    txn_id = new_id()
    body = {"events": [image_event("$" + new_id(), new_id())]}
    results = await asyncio.gather(
        *(push(http_session, relay, txn_id, body, token=hs_token(relay)) for _ in range(10))
    )
    assert results == [(200, {})] * 10
    assert relay.metrics.value("relay_transactions", {"outcome": "processed"}) == 1
    assert relay.metrics.value("relay_transactions", {"outcome": "duplicate"}) == 9


async def test_duplicate_survives_restart(
    make_config: MakeConfig, start_relay: StartRelay, http_session: aiohttp.ClientSession
) -> None:
    """A txn id committed before a restart is still recognised as a duplicate after it."""
    config = make_config(appservice=NAMESPACE)
    first = await start_relay(config)
    txn_id = new_id()
    body = {"events": [image_event("$" + new_id(), new_id())]}
    assert await push(http_session, first, txn_id, body, token=hs_token(first)) == (200, {})
    await first.stop()
    second = await start_relay(config)
    assert await push(http_session, second, txn_id, body, token=hs_token(second)) == (200, {})
    assert second.metrics.value("relay_transactions", {"outcome": "duplicate"}) == 1
    assert second.metrics.value("relay_transactions", {"outcome": "processed"}) == 0


async def test_malformed_event_is_skipped_rest_kept(
    relay: Relay, http_session: aiohttp.ClientSession
) -> None:
    """A malformed event and an invalid mxc are counted and skipped; the good event is kept."""
    good, bad_mxc = new_id(), "../../v3/joined_rooms"
    events: list[Any] = [
        "not an object",
        {"type": "m.room.message", "room_id": ROOM},  # no event_id, sender, content
        image_event("$" + new_id(), bad_mxc),
        image_event("$" + new_id(), good),
    ]
    status, _ = await push(http_session, relay, new_id(), {"events": events}, token=hs_token(relay))
    assert status == 200
    assert await recorded(relay, good)
    assert relay.metrics.value("relay_events", {"outcome": "rejected"}) == 2
    assert relay.metrics.value("relay_invalid_mxc") == 1
    assert relay.metrics.value("relay_media_references", {"role": "content"}) == 1


async def test_media_outside_served_rooms_is_ignored(
    relay: Relay, http_session: aiohttp.ClientSession
) -> None:
    """Media in a room the relay was not invited to (and not in its namespace) is not recorded."""
    media_id = new_id()
    event = image_event("$" + new_id(), media_id, room_id="!elsewhere:localhost")
    result = await push(http_session, relay, new_id(), {"events": [event]}, token=hs_token(relay))
    assert result == (200, {})
    assert not await recorded(relay, media_id)


async def test_redaction_revokes_in_either_order(
    relay: Relay, http_session: aiohttp.ClientSession
) -> None:
    """A redaction revokes the event's media, whether it arrives after or before the event."""
    assert relay.store is not None
    for redaction_first in (False, True):
        event_id, media_id = "$" + new_id(), new_id()
        redaction = {
            "type": "m.room.redaction",
            "room_id": ROOM,
            "event_id": "$r" + new_id(),
            "sender": "@someone:localhost",
            "origin_server_ts": 1,
            "content": {"redacts": event_id},
        }
        batches = [[image_event(event_id, media_id)], [redaction]]
        if redaction_first:
            batches.reverse()
        for events in batches:
            result = await push(
                http_session, relay, new_id(), {"events": events}, token=hs_token(relay)
            )
            assert result == (200, {})
        assert await relay.store.is_revoked(MediaId("localhost", media_id))
    assert relay.metrics.value("relay_revocations") == 2


async def test_database_failure_is_500_and_retry_succeeds(
    relay: Relay,
    http_session: aiohttp.ClientSession,
    make_config: MakeConfig,
    start_relay: StartRelay,
) -> None:
    """With the database gone a transaction gets 500 (the homeserver retries) and is not lost."""
    assert relay.store is not None
    txn_id, media_id = new_id(), new_id()
    body = {"events": [image_event("$" + new_id(), media_id)]}
    await relay.store.db.stop()
    status, err = await push(http_session, relay, txn_id, body, token=hs_token(relay))
    assert (status, err["errcode"]) == (500, "M_UNKNOWN")
    assert relay.metrics.value("relay_transactions", {"outcome": "failed"}) == 1
    await relay.stop()
    # The homeserver retries the same id against the restarted relay: now it is stored.
    again = await start_relay(make_config(appservice=NAMESPACE))
    assert await push(http_session, again, txn_id, body, token=hs_token(again)) == (200, {})
    assert await recorded(again, media_id)


@pytest.mark.parametrize(
    ("path", "status", "expected"),
    [
        ("/_matrix/app/v1/users/@nobody:localhost", 404, "M_NOT_FOUND"),
        ("/users/@nobody:localhost", 404, "M_NOT_FOUND"),
        ("/_matrix/app/v1/rooms/%23alias:localhost", 404, "M_NOT_FOUND"),
        ("/_matrix/app/v1/thirdparty/protocol/irc", 404, "M_NOT_FOUND"),
        ("/_matrix/app/v1/thirdparty/user/irc", 200, []),
        ("/_matrix/app/v1/thirdparty/location", 200, []),
        ("/_matrix/app/unstable/thirdparty/user", 200, []),
    ],
)
async def test_queries(
    relay: Relay, http_session: aiohttp.ClientSession, path: str, status: int, expected: object
) -> None:
    """User/alias queries answer 404 M_NOT_FOUND and third-party lookups an empty list."""
    headers = {"Authorization": f"Bearer {hs_token(relay)}"}
    async with http_session.get(relay.internal_url + path, headers=headers) as resp:
        assert resp.status == status
        body = await resp.json()
    assert (body["errcode"] if status != 200 else body) == expected


async def test_queries_need_the_token(relay: Relay, http_session: aiohttp.ClientSession) -> None:
    """Every AS API endpoint checks the hs_token, not only transactions."""
    async with http_session.post(relay.internal_url + "/_matrix/app/v1/ping", json={}) as resp:
        assert resp.status == 401
        assert (await resp.json())["errcode"] == "M_MISSING_TOKEN"
    async with http_session.get(
        relay.internal_url + "/_matrix/app/v1/thirdparty/location",
        headers={"Authorization": "Bearer wrong"},
    ) as resp:
        assert resp.status == 403
        assert (await resp.json())["errcode"] == "M_FORBIDDEN"


async def test_wrong_method_is_405(relay: Relay, http_session: aiohttp.ClientSession) -> None:
    """GET on the transactions route → 405 M_UNRECOGNIZED."""
    async with http_session.get(relay.internal_url + "/_matrix/app/v1/transactions/1") as resp:
        assert resp.status == 405
        assert (await resp.json())["errcode"] == "M_UNRECOGNIZED"

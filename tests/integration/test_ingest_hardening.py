"""Hostile input on the internal listener: nothing an event or a client sends stalls or crashes.

Transactions are pushed straight at a running relay (as a homeserver would), on SQLite
and PostgreSQL: PostgreSQL refuses what SQLite stores (NUL, 32-bit overflow), so both
must answer 200 and keep the other events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any

import aiohttp
import pytest

from relay.app import Relay
from relay.core.mxc import MediaId
from tests.harness.events import image_event as pushed_image
from tests.harness.relay import BRIDGE_TOKEN, MakeConfig, StartRelay

pytestmark = pytest.mark.synapse

ROOM = "!hardening:localhost"
NAMESPACE = {"room_namespace": [r"!hardening:localhost"]}


def new_id() -> str:
    return secrets.token_hex(8)


def image_event(media_id: str, **content: Any) -> dict[str, Any]:
    return pushed_image("$" + new_id(), media_id, ROOM, **content)


@pytest.fixture
async def relay(make_config: MakeConfig, start_relay: StartRelay, database_url: str) -> Relay:
    return await start_relay(make_config(database=database_url, appservice=NAMESPACE))


async def put(
    session: aiohttp.ClientSession, relay: Relay, raw: bytes, txn_id: str | None = None
) -> tuple[int, dict[str, Any]]:
    url = f"{relay.internal_url}/_matrix/app/v1/transactions/{txn_id or new_id()}"
    headers = {"Authorization": f"Bearer {relay.config.appservice.hs_token}"}
    async with session.put(url, data=raw, headers=headers) as resp:
        return resp.status, await resp.json()


async def record(relay: Relay, media_id: str) -> Any:
    assert relay.store is not None
    return await relay.store.media_record(MediaId("localhost", media_id))


async def test_unstorable_fields_do_not_stall_ingest(
    relay: Relay, http_session: aiohttp.ClientSession
) -> None:
    """w: 2**31, NUL in body/mimetype/filename, a NUL sender: 200, the rest recorded, counted."""
    ok, wide, nul_body, nul_type, nul_name = (new_id() for _ in range(5))
    bad_sender = image_event(new_id())
    bad_sender["sender"] = "@a\x00b:localhost"
    events = [
        image_event(wide, info={"mimetype": "image/png", "w": 2**31, "h": 2**31 - 1}),
        image_event(nul_body, body="a\x00.png"),
        image_event(nul_type, info={"mimetype": "image/png\x00"}),
        image_event(nul_name, filename="x\x00.png", body="caption"),
        {**image_event(new_id()), "origin_server_ts": 2**64},
        bad_sender,
        image_event(ok),
    ]
    status, body = await put(http_session, relay, json.dumps({"events": events}).encode())
    assert (status, body) == (200, {})
    assert (await record(relay, ok)).filename == "cat.png"
    assert (await record(relay, wide)).mimetype == "image/png"
    assert (await record(relay, nul_body)).filename is None
    assert (await record(relay, nul_type)).mimetype is None
    assert (await record(relay, nul_name)).filename is None
    assert relay.metrics.value("relay_events", {"outcome": "trimmed"}) == 4
    assert relay.metrics.value("relay_events", {"outcome": "rejected"}) == 1


async def test_deeply_nested_event_is_dropped_not_retried_forever(
    relay: Relay, http_session: aiohttp.ClientSession
) -> None:
    """A transaction ~990 levels deep: 200, the deep event dropped and counted, the rest kept."""
    kept, txn_id = new_id(), new_id()
    deep = json.dumps(image_event(new_id())).replace(
        '"info": {', '"deep": ' + "[" * 990 + "]" * 990 + ', "info": {', 1
    )
    raw = ('{"events": [' + deep + ", " + json.dumps(image_event(kept)) + "]}").encode()
    status, body = await put(http_session, relay, raw, txn_id)
    assert (status, body) == (200, {})
    assert await record(relay, kept) is not None
    assert relay.store is not None and await relay.store.transaction_seen(txn_id)
    assert relay.metrics.value("relay_events", {"outcome": "rejected"}) == 1


async def test_transaction_id_with_nul_is_refused(
    relay: Relay, http_session: aiohttp.ClientSession
) -> None:
    """A transaction id no text column can hold: 400 M_INVALID_PARAM, not a 500 per retry."""
    media_id = new_id()
    status, body = await put(
        http_session, relay, json.dumps({"events": [image_event(media_id)]}).encode(), "a%00b"
    )
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")
    assert await record(relay, media_id) is None


async def raw_request(relay: Relay, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (aiohttp's client refuses non-ASCII headers)."""
    host, port = relay.internal_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        length = f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        writer.write(head + length + body)
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        (b"PUT", b"/_matrix/app/v1/transactions/t1", b'{"events": []}'),
        (b"POST", b"/_matrix/app/v1/ping", b"{}"),
        (b"GET", b"/_matrix/app/v1/users/@x:localhost", b""),
        (b"POST", b"/_relay/v1/sign", b'{"mxc": "mxc://localhost/x"}'),
    ],
)
async def test_undecodable_bearer_token_is_403(
    relay: Relay, caplog: pytest.LogCaptureFixture, method: bytes, path: bytes, body: bytes
) -> None:
    """A token that is not UTF-8: 403 M_FORBIDDEN on the AS and bridge APIs, no traceback."""
    head = method + b" " + path + b" HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer \xff\xfe\r\n"
    with caplog.at_level(logging.ERROR):
        status, answer = await raw_request(relay, head, body)
    assert (status, json.loads(answer)["errcode"]) == (403, "M_FORBIDDEN")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/_matrix/app/v1/transactions/1", "PUT"),
        ("GET", "/_relay/v1/sign", "POST"),
        ("DELETE", "/_matrix/app/v1/ping", "POST"),
    ],
)
async def test_405_names_the_allowed_methods(
    relay: Relay, http_session: aiohttp.ClientSession, method: str, path: str, allow: str
) -> None:
    """RFC 9110 section 15.5.6: a 405 carries Allow (and the Matrix body M_UNRECOGNIZED)."""
    async with http_session.request(method, relay.internal_url + path) as resp:
        assert resp.status == 405
        assert allow in resp.headers["Allow"].replace(" ", "").split(",")
        assert (await resp.json())["errcode"] == "M_UNRECOGNIZED"


async def test_ping_without_a_body(relay: Relay, http_session: aiohttp.ClientSession) -> None:
    """POST /_matrix/app/v1/ping without a body is 200 {} (the spec's body is optional)."""
    headers = {"Authorization": f"Bearer {relay.config.appservice.hs_token}"}
    async with http_session.post(relay.internal_url + "/_matrix/app/v1/ping", headers=headers) as r:
        assert (r.status, await r.json()) == (200, {})


@pytest.mark.parametrize("path", ["/_relay/v1/sign", "/_relay/v1/rewrite"])
async def test_bridge_body_nested_too_deep_is_400(
    relay: Relay, http_session: aiohttp.ClientSession, path: str
) -> None:
    """The bridge API reads bodies with the same reader: too deep → 400 M_BAD_JSON, not 500."""
    deep = '{"content": {"x": ' + "[" * 990 + "]" * 990 + "}}"
    headers = {"Authorization": f"Bearer {BRIDGE_TOKEN}"}
    async with http_session.post(relay.internal_url + path, data=deep, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["errcode"] == "M_BAD_JSON"

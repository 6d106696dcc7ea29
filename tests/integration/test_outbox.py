"""Follow-ups survive a crash between commit and reply (issue 13, finding 13a).

The outbox rows are written in the transaction's own commit (SQLite and PostgreSQL),
a v4 database gains the table on upgrade, and a follow-up left behind by a crash (the
relay stopped after the commit, before the purge or decline) is done at the next start;
one that failed (the homeserver unreachable) is retried after a later commit.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from relay.app import Relay
from relay.core.ingest_plan import RoomPolicy, plan_transaction
from relay.core.mxc import MediaId, parse_mxc
from relay.devtools.local_synapse import LocalSynapse
from relay.store import Store, open_database
from relay.store.outbox import FollowUp, Kind, Outbox
from tests.harness.links import errcode, fetch, post_media, sign
from tests.harness.matrix_client import MatrixUser
from tests.harness.relay import MakeConfig, StartRelay
from tests.harness.tcp_proxy import TcpProxy
from tests.harness.waiting import eventually

BOT = "@mediarelay:example.org"
POLICY = RoomPolicy.build(BOT, ["example.org"], [])


def event(kind: str, room_id: str, sender: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "room_id": room_id,
        "event_id": "$" + secrets.token_hex(8),
        "sender": sender,
        "origin_server_ts": 1,
        **fields,
    }


def invite(room_id: str, sender: str, bot: str = BOT) -> dict[str, Any]:
    return event("m.room.member", room_id, sender, state_key=bot, content={"membership": "invite"})


def image(room_id: str, event_id: str, media_id: str) -> dict[str, Any]:
    return {
        **event("m.room.message", room_id, "@alice:example.org"),
        "event_id": event_id,
        "content": {"msgtype": "m.image", "body": "x", "url": f"mxc://example.org/{media_id}"},
    }


def redaction(room_id: str, target: str, sender: str = "@alice:example.org") -> dict[str, Any]:
    return event("m.room.redaction", room_id, sender, redacts=target, content={"redacts": target})


async def commit(store: Store, events: list[dict[str, Any]], policy: RoomPolicy = POLICY) -> None:
    rooms = {e["room_id"] for e in events}
    served = await store.served_rooms(rooms)
    plan = plan_transaction(events, served, policy, await store.power_levels(rooms))
    assert await store.commit_transaction(secrets.token_hex(8), plan) is not None


async def test_followups_are_committed_with_the_transaction(database_url: str) -> None:
    """A declined invite and a revocation leave outbox rows in the same commit; done() clears."""
    db = await open_database(database_url)
    try:
        store, outbox = Store(db), Outbox(db)
        await commit(store, [invite("!served:example.org", "@admin:example.org")])
        await commit(store, [image("!served:example.org", "$img", "gone")])
        assert await outbox.pending() == []  # nothing to follow up yet
        await commit(
            store,
            [
                invite("!spam:elsewhere.example", "@stranger:elsewhere.example"),
                redaction("!served:example.org", "$img"),
            ],
        )
        expected = [
            FollowUp(Kind.DECLINE, "!spam:elsewhere.example"),
            FollowUp(Kind.PURGE, "mxc://example.org/gone"),
        ]
        assert sorted(await outbox.pending()) == expected
        # A retried transaction id writes nothing, in the outbox neither.
        plan = plan_transaction([], set(), POLICY)
        assert await store.commit_transaction("again", plan) is not None
        assert await store.commit_transaction("again", plan) is None
        for f in expected:
            await outbox.done(f)
        assert await outbox.pending() == []
    finally:
        await db.stop()


async def test_v4_database_gains_an_empty_outbox(database_url: str) -> None:
    """Upgrading a v4 database adds the outbox table and keeps the rows it had."""
    from mautrix.util.async_db import Database, UpgradeTable

    from relay.store.migrations import upgrade_table

    v4_only = UpgradeTable(version_table_name="relay_schema_version", database_name="relay")
    v4_only.upgrades.extend(upgrade_table.upgrades[:4])
    url = database_url.replace("postgresql://", "postgres://", 1)
    old = Database.create(url, upgrade_table=v4_only)
    await old.start()
    await old.execute(
        "INSERT INTO revoked_media (server_name, media_id, event_id, revoked_at, source)"
        " VALUES ('example.org', 'old', '$old', 1, 'operator')"
    )
    await old.stop()

    db = await open_database(database_url)
    try:
        assert await db.fetchval("SELECT version FROM relay_schema_version") == len(
            upgrade_table.upgrades
        )
        assert len(upgrade_table.upgrades) >= 5
        assert await Store(db).is_revoked(MediaId("example.org", "old"))
        assert await Outbox(db).pending() == []
        await commit(Store(db), [invite("!x:elsewhere.example", "@s:elsewhere.example")])
        assert await Outbox(db).pending() == [FollowUp(Kind.DECLINE, "!x:elsewhere.example")]
    finally:
        await db.stop()


def cached_files(cache_dir: Path) -> list[str]:
    """Entries and sidecars in the cache's shards (os.walk: files may vanish meanwhile)."""
    return sorted(
        name
        for directory, _, names in os.walk(cache_dir)
        if Path(directory).parent == cache_dir and Path(directory).name != "tmp"
        for name in names
    )


@pytest.mark.synapse
async def test_followups_left_by_a_crash_are_done_at_the_next_start(
    database_url: str,
    make_config: MakeConfig,
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
) -> None:
    """Committed, then the relay died: the next start purges the cache and declines the invite."""
    config = make_config(database=database_url)
    relay = await start_relay(config)
    room_id, mxc, event_id = await post_media(
        relay, alice, secrets.token_bytes(2048), "application/octet-stream", "f.bin"
    )
    link = await sign(http_session, relay, mxc)
    assert (await fetch(http_session, link["url"]))[0] == 200
    cache_dir = Path(config.media.cache_dir)

    async def cached() -> bool:
        return bool(cached_files(cache_dir))

    await eventually(cached)  # (the download is committed to the cache just after)
    await relay.stop()

    # What the AS API does for a transaction, up to the commit; then the process dies.
    db = await open_database(config.database)
    try:
        store = Store(db)
        policy = RoomPolicy.build(
            config.bot_user_id, config.appservice.allowed_inviters, config.appservice.room_namespace
        )
        await commit(
            store,
            [
                redaction(room_id, event_id, alice.user_id),
                invite("!never:elsewhere.example", "@x:elsewhere.example", config.bot_user_id),
            ],
            policy,
        )
        pending = await Outbox(db).pending()
        assert FollowUp(Kind.PURGE, str(parse_mxc(mxc))) in pending
        assert FollowUp(Kind.DECLINE, "!never:elsewhere.example") in pending
    finally:
        await db.stop()
    assert cached_files(cache_dir), "nothing was purged before the crash"

    relay = await start_relay(config)
    assert relay.store is not None
    outbox = Outbox(relay.store.db)

    async def all_done() -> bool:
        return not cached_files(cache_dir) and not await outbox.pending()

    await eventually(all_done, within=20)
    status, _, body = await fetch(http_session, link["url"])
    assert status == 410 and errcode(body) == "M_NOT_FOUND"


@pytest.mark.synapse
async def test_followups_done_after_commit_leave_no_row(
    make_config: MakeConfig,
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
) -> None:
    """Without a crash the follow-up runs right after the commit and its row is deleted."""
    relay = await start_relay()
    room_id, mxc, event_id = await post_media(
        relay, alice, secrets.token_bytes(1024), "application/octet-stream", "g.bin"
    )
    link = await sign(http_session, relay, mxc)
    assert (await fetch(http_session, link["url"]))[0] == 200
    await alice.redact(room_id, event_id)
    assert relay.store is not None
    outbox = Outbox(relay.store.db)
    cache_dir = Path(relay.config.media.cache_dir)

    async def purged() -> bool:
        return (
            (await fetch(http_session, link["url"]))[0] == 410
            and not cached_files(cache_dir)
            and not await outbox.pending()
        )

    await eventually(purged, within=20)


async def put_transaction(
    session: aiohttp.ClientSession, relay: Relay, events: list[dict[str, Any]]
) -> None:
    async with session.put(
        f"{relay.internal_url}/_matrix/app/v1/transactions/{secrets.token_hex(8)}",
        json={"events": events},
        headers={"Authorization": f"Bearer {relay.config.appservice.hs_token}"},
    ) as response:
        assert response.status == 200, await response.text()


@pytest.mark.synapse
async def test_a_followup_that_failed_is_retried_after_a_later_commit(
    synapse: LocalSynapse,
    make_config: MakeConfig,
    start_relay: StartRelay,
    http_session: aiohttp.ClientSession,
) -> None:
    """A decline that met an unreachable homeserver stays in the outbox; a later commit retries."""
    target = urlsplit(synapse.base_url)
    assert target.hostname is not None and target.port is not None
    proxy = TcpProxy(target.hostname, target.port)
    await proxy.up()
    try:
        relay = await start_relay(make_config(homeserver={"address": proxy.url}))
        assert relay.store is not None
        outbox = Outbox(relay.store.db)
        bot = relay.config.bot_user_id
        declined = FollowUp(Kind.DECLINE, "!retry:elsewhere.example")

        await proxy.down()
        await put_transaction(
            http_session, relay, [invite(declined.subject, "@x:elsewhere.example", bot)]
        )
        await asyncio.sleep(1)  # the decline runs, and meets a refused connection
        assert await outbox.pending() == [declined]

        await proxy.up()

        async def retried() -> bool:
            # Any commit retries it (an empty transaction is one); the homeserver then
            # answers (the bot was never invited there: refused), which settles it.
            await put_transaction(http_session, relay, [])
            await asyncio.sleep(0.3)
            return not await outbox.pending()

        await eventually(retried, within=15, interval=0.5)
    finally:
        await proxy.down()

"""Revocations across processes on one database: pushed on PostgreSQL, polled on SQLite.

Each "process" is its own database pool (and, on PostgreSQL, its own listening
connection), as two relay processes on one database have.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from dataclasses import dataclass, field

from mautrix.util.async_db import Database, UpgradeTable

from relay.core.mxc import MediaId
from relay.media.revocation import RevocationCheck
from relay.store import Store, open_database
from relay.store.migrations import upgrade_table
from relay.store.revocation_feed import (
    RECONNECT_DELAYS,
    ListeningFeed,
    RevocationFeed,
    revocation_feed,
)
from relay.store.takedown import HOMESERVER, OPERATOR, REDACTION, Takedowns
from tests.harness.relay import listener_pids
from tests.harness.store_events import commit, image, invite, redaction

ROOM = "!feed:example.org"
# Long enough that only a notification (or a reconnection's catch-up) can be in time.
NO_SAFETY_POLL = 60.0


def media(media_id: str) -> MediaId:
    return MediaId("example.org", media_id)


@dataclass
class Watcher:
    """Another process's RevocationCheck following the feed; when it heard of each item."""

    db: Database
    feed: RevocationFeed
    check: RevocationCheck = field(init=False)
    heard: dict[MediaId, float] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async def discovered(item: MediaId) -> None:
            self.heard.setdefault(item, time.monotonic())

        self.check = RevocationCheck(Store(self.db), on_discovered=discovered)
        await self.feed.start()
        self.task = asyncio.create_task(self.check.watch(self.feed))
        # The watch starts from the newest revocation: let it read that first.
        await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.feed.close()
        await self.db.stop()

    async def heard_of(self, item: MediaId, within: float) -> float:
        """Seconds from now until this process applied the revocation of ``item``."""
        deadline = time.monotonic() + within
        while item not in self.heard:
            assert time.monotonic() < deadline, f"{item} not heard of within {within} s"
            await asyncio.sleep(0.001)
        return self.heard[item]


async def listening(
    url: str, *, interval: float, reconnect_delays: tuple[float, ...] = RECONNECT_DELAYS
) -> Watcher:
    db = await open_database(url)
    feed = ListeningFeed(db, str(db.url), interval=interval, reconnect_delays=reconnect_delays)
    watcher = Watcher(db, feed)
    await watcher.start()
    return watcher


async def revoke_by(writer: Database, source: str) -> MediaId:
    """Revoke a fresh item as ``source`` would (a redaction goes through ingest's commit)."""
    item = media(secrets.token_hex(6))
    if source == REDACTION:
        store = Store(writer)
        event_id = "$" + secrets.token_hex(6)
        await commit(store, [invite(ROOM), image(ROOM, event_id, item.media_id)])
        await commit(store, [redaction(ROOM, event_id)])
    else:
        assert (await Takedowns(writer).revoke(item, source)).newly
    return item


async def test_revocations_are_pushed_to_another_process(postgres_url: str) -> None:
    """Each of 21 revocations (every source) reaches the other process in < 1 s by NOTIFY."""
    writer = await open_database(postgres_url)
    other = await listening(postgres_url, interval=NO_SAFETY_POLL)
    try:
        latencies = []
        for trial in range(21):
            source = (REDACTION, OPERATOR, HOMESERVER)[trial % 3]
            started = time.monotonic()
            item = await revoke_by(writer, source)
            latencies.append(await other.heard_of(item, within=1.0) - started)
            assert other.check.remembered(item) is True
        assert max(latencies) < 1.0, latencies
        # (bench/revocation_latency.py measures the median; this only shows it is pushed.)
        assert statistics.median(latencies) < 0.5, latencies
    finally:
        await other.stop()
        await writer.stop()


async def test_a_lost_listener_catches_up_from_its_cursor(postgres_url: str) -> None:
    """Listener terminated, revocations committed meanwhile: read from the cursor on return."""
    writer = await open_database(postgres_url)
    other = await listening(postgres_url, interval=NO_SAFETY_POLL, reconnect_delays=(0.3,))
    try:
        (before,) = await listener_pids(writer)
        await writer.execute("SELECT pg_terminate_backend($1)", before)
        # Committed while nobody listens: their notifications reach no one.
        # (Reconnecting waits 0.3 s: far longer than these take.)
        missed = [await revoke_by(writer, OPERATOR), await revoke_by(writer, REDACTION)]
        for item in missed:
            await other.heard_of(item, within=1.5)
        assert await listener_pids(writer) not in ([], [before])  # it reconnected
        # Listening again: the next one is pushed as before.
        started = time.monotonic()
        item = await revoke_by(writer, OPERATOR)
        assert await other.heard_of(item, within=1.0) - started < 1.0
    finally:
        await other.stop()
        await writer.stop()


async def test_concurrent_revocations_are_none_skipped(postgres_url: str) -> None:
    """40 revocations committed at once over 10 connections: the cursor passes none by."""
    writer = await open_database(postgres_url)
    other = await listening(postgres_url, interval=NO_SAFETY_POLL)
    try:
        items = await asyncio.gather(*(revoke_by(writer, OPERATOR) for _ in range(40)))
        for item in items:
            await other.heard_of(item, within=2.0)
    finally:
        await other.stop()
        await writer.stop()


async def test_every_database_reaches_the_other_process(database_url: str) -> None:
    """The feed each database gets (polling on SQLite) applies a revocation within a second."""
    writer = await open_database(database_url)
    db = await open_database(database_url)
    other = Watcher(db, revocation_feed(db))
    await other.start()
    try:
        for source in (REDACTION, OPERATOR, HOMESERVER):
            started = time.monotonic()
            item = await revoke_by(writer, source)
            assert await other.heard_of(item, within=1.0) - started < 1.0
    finally:
        await other.stop()
        await writer.stop()


async def test_v5_database_upgrades_to_v6(database_url: str) -> None:
    """Old revocations keep source and time, numbered by time; new ones follow them."""
    v5_only = UpgradeTable(version_table_name="relay_schema_version", database_name="relay")
    v5_only.upgrades.extend(upgrade_table.upgrades[:5])
    url = database_url.replace("postgresql://", "postgres://", 1)
    old = Database.create(url, upgrade_table=v5_only)
    await old.start()
    await old.execute(
        "INSERT INTO revoked_media (server_name, media_id, event_id, revoked_at, source)"
        " VALUES ('example.org', 'late', '$l', 30, 'operator'),"
        " ('example.org', 'early', '$e', 10, 'redaction'),"
        " ('example.org', 'middle', '', 20, 'homeserver')"
    )
    await old.stop()

    db = await open_database(database_url)
    try:
        assert await db.fetchval("SELECT version FROM relay_schema_version") == len(
            upgrade_table.upgrades
        )
        feed = RevocationFeed(db)
        rows = await feed.after(0)
        assert [m.media_id for _, m in rows] == ["early", "middle", "late"]
        takedowns = Takedowns(db)
        assert await takedowns.source(media("middle")) == HOMESERVER
        assert not (await takedowns.revoke(media("late"))).newly
        assert (await takedowns.revoke(media("new"))).newly
        newest = await feed.head()
        assert await feed.after(rows[-1][0]) == [(newest, media("new"))]
        assert await Store(db).is_revoked(media("early"))
    finally:
        await db.stop()

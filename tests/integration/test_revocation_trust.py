"""The long "not revoked" trust against real databases: another process's revocation
still lands within the feed's latency, and a lost feed ends the trust.

Each "process" is its own database pool (and, on PostgreSQL, its own listening
connection), as two relay processes on one database have. The trusting process's
memories run on a clock the test moves, so "past the short ttl" needs no sleeping.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest_asyncio
from mautrix.util.async_db import Database

from relay.core.mxc import MediaId
from relay.media.revocation import DEFAULT_TTL, RevocationCheck
from relay.store import Store, open_database
from relay.store.revocation_feed import RevocationFeed, revocation_feed
from relay.store.takedown import OPERATOR, Takedowns
from tests.harness.relay import listener_pids
from tests.harness.waiting import eventually


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore:
    """The real store's answer, counting the queries."""

    def __init__(self, db: Database) -> None:
        self._store = Store(db)
        self.queries = 0

    async def is_revoked(self, media: MediaId) -> bool:
        self.queries += 1
        return await self._store.is_revoked(media)


@dataclass
class Trusting:
    """The other process: its RevocationCheck follows its own feed."""

    db: Database
    feed: RevocationFeed
    store: CountingStore
    check: RevocationCheck
    clock: Clock
    task: asyncio.Task[None]

    async def until_trusting(self, within: float = 15.0) -> None:
        async def trusting() -> bool:
            return self.check.trusting

        await eventually(trusting, within=within, interval=0.005)


async def start_trusting(url: str) -> Trusting:
    db = await open_database(url)
    feed = revocation_feed(db)
    await feed.start()
    store, clock = CountingStore(db), Clock()
    check = RevocationCheck(store, clock=clock)
    task = asyncio.create_task(check.watch(feed))
    other = Trusting(db, feed, store, check, clock, task)
    await other.until_trusting()
    return other


async def stop_trusting(other: Trusting) -> None:
    other.task.cancel()
    await asyncio.gather(other.task, return_exceptions=True)
    await other.feed.close()
    await other.db.stop()


@pytest_asyncio.fixture
async def writer(database_url: str) -> AsyncIterator[Database]:
    db = await open_database(database_url)
    yield db
    await db.stop()


def fresh() -> MediaId:
    return MediaId("example.org", secrets.token_hex(6))


async def honoured(other: Trusting, item: MediaId, within: float) -> float:
    """Seconds until ``other`` refuses ``item`` without asking its database."""
    started = time.monotonic()

    async def refused() -> bool:
        return other.check.remembered(item) is True

    await eventually(refused, within=within, interval=0.001)
    return time.monotonic() - started


async def test_a_revocation_elsewhere_ends_a_long_trusted_answer(
    database_url: str, writer: Database
) -> None:
    """ "Not revoked" is kept past the short ttl (no query), and a revocation committed by
    another process is honoured < 1 s later (pushed on PostgreSQL, polled on SQLite)."""
    other = await start_trusting(database_url)
    try:
        items = [fresh() for _ in range(3)]
        for item in items:
            assert await other.check.is_revoked(item) is False
        queries = other.store.queries
        other.clock.now += DEFAULT_TTL * 20
        for item in items:
            assert await other.check.is_revoked(item) is False
        assert other.store.queries == queries  # trusted: no database round trip
        for item in items:
            assert (await Takedowns(writer).revoke(item, OPERATOR)).newly
            assert await honoured(other, item, within=1.0) < 1.0
            assert await other.check.is_revoked(item) is True
    finally:
        await stop_trusting(other)


async def test_a_lost_listening_connection_ends_the_trust(postgres_url: str) -> None:
    """PostgreSQL: the listening connection killed, trusted answers are forgotten (the
    database is asked again, answers kept for the short ttl); a revocation committed
    meanwhile is honoured, and the trust returns once it listens again."""
    writer = await open_database(postgres_url)
    other = await start_trusting(postgres_url)
    try:
        item, missed = fresh(), fresh()
        assert await other.check.is_revoked(item) is False
        assert await other.check.is_revoked(missed) is False
        (listener,) = await listener_pids(writer)
        await writer.execute("SELECT pg_terminate_backend($1)", listener)

        async def distrusting() -> bool:
            return not other.check.trusting

        await eventually(distrusting, within=5, interval=0.005)
        assert other.check.remembered(item) is None
        queries = other.store.queries
        assert await other.check.is_revoked(item) is False
        assert other.store.queries == queries + 1
        # Committed while nobody listened: no notification reaches anyone.
        assert (await Takedowns(writer).revoke(missed, OPERATOR)).newly
        await other.until_trusting()
        assert await listener_pids(writer) not in ([], [listener])
        # Read from the cursor on reconnecting (or pushed, had it listened again first).
        assert await honoured(other, missed, within=1.5) < 1.5
    finally:
        await stop_trusting(other)
        await writer.stop()

"""RevocationCheck's long trust: "not revoked" kept for trusted_ttl only while the feed is
followed and live, and dropped the moment it is not.

A fake store and feed in one (revoked rows with a cursor), a fake clock for the
memories; the watch runs for real on the test's loop. The same against real databases
and processes is in tests/integration/test_revocation_trust.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from relay.core.mxc import MediaId
from relay.media.revocation import RevocationCheck
from tests.harness.waiting import eventually

CAT = MediaId("example.org", "cat")
DOG = MediaId("example.org", "dog")
TTL = 0.5
TRUSTED = 60.0
POLL = 0.05
STALL = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Database:
    """is_revoked (counting queries) and a feed over the same rows, nudged by hand."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, MediaId]] = []
        self.queries = 0
        self.fail_reads = 0
        self.reads = 0
        self.period: int | None = 1
        self.nudge = asyncio.Event()
        self.hang = asyncio.Event()  # set: wait() never returns (a stuck feed)
        self.query_gate: asyncio.Event | None = None

    def revoke(self, media: MediaId) -> None:
        self.rows.append((len(self.rows) + 1, media))
        self.nudge.set()

    async def is_revoked(self, media: MediaId) -> bool:
        self.queries += 1
        if self.query_gate is not None:
            await self.query_gate.wait()
        return any(m == media for _, m in self.rows)

    async def head(self) -> int:
        return len(self.rows)

    async def after(self, cursor: int) -> list[tuple[int, MediaId]]:
        self.reads += 1
        if self.fail_reads:
            self.fail_reads -= 1
            raise ConnectionError("database down")
        return self.rows[cursor:]

    async def wait(self) -> None:
        """Like a polling feed: a nudge, or the interval."""
        if self.hang.is_set():
            await asyncio.Event().wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.nudge.wait(), POLL)
        self.nudge.clear()

    def live_period(self) -> int | None:
        return self.period


class World:
    def __init__(self, db: Database, check: RevocationCheck, clock: Clock) -> None:
        self.db, self.check, self.clock = db, check, clock

    async def answer_counts_queries(self, media: MediaId) -> tuple[bool, int]:
        before = self.db.queries
        revoked = await self.check.is_revoked(media)
        return revoked, self.db.queries - before


@pytest_asyncio.fixture
async def world() -> AsyncIterator[World]:
    db, clock = Database(), Clock()
    check = RevocationCheck(db, ttl=TTL, trusted_ttl=TRUSTED, clock=clock)
    watcher = asyncio.create_task(check.watch(db, retry_delay=0.01, stall_after=STALL))

    async def following() -> bool:
        return check.trusting

    await eventually(following, within=5, interval=0.005)
    yield World(db, check, clock)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)


async def test_not_revoked_is_trusted_long_while_the_feed_is_followed(world: World) -> None:
    """One query, then the answer holds past ttl (until trusted_ttl) without asking again."""
    assert await world.answer_counts_queries(CAT) == (False, 1)
    world.clock.now += 30.0
    assert await world.answer_counts_queries(CAT) == (False, 0)
    world.clock.now += TRUSTED
    assert await world.answer_counts_queries(CAT) == (False, 1)


async def test_a_revocation_elsewhere_ends_the_trusted_answer_by_the_feed(world: World) -> None:
    """Another process revokes a long-trusted item: refused as soon as the feed delivers it."""
    assert await world.answer_counts_queries(CAT) == (False, 1)
    world.db.revoke(CAT)

    async def refused() -> bool:
        return world.check.remembered(CAT) is True

    await eventually(refused, within=5, interval=0.005)
    assert await world.answer_counts_queries(CAT) == (True, 0)


async def test_a_failed_read_of_the_feed_drops_the_long_trust(world: World) -> None:
    """After a failing read, trusted answers are gone: the next lookup asks the database,
    and its answer is kept for ttl only until the watch has read the feed again."""
    assert await world.answer_counts_queries(CAT) == (False, 1)
    world.db.fail_reads = 10**6  # down until said otherwise
    world.db.nudge.set()

    async def distrusted() -> bool:
        return not world.check.trusting

    await eventually(distrusted, within=5, interval=0.005)
    assert world.check.remembered(CAT) is None
    assert await world.answer_counts_queries(CAT) == (False, 1)
    world.clock.now += TTL
    assert await world.answer_counts_queries(CAT) == (False, 1)
    # Back: the watch reads from its cursor (nothing missed), then trusts again.
    world.db.fail_reads = 0

    async def trusting() -> bool:
        return world.check.trusting

    await eventually(trusting, within=5, interval=0.005)


async def test_a_revocation_while_the_feed_was_down_is_read_before_trust_returns(
    world: World,
) -> None:
    """Revoked while reads fail: once they work again the revocation is applied first."""
    assert await world.answer_counts_queries(CAT) == (False, 1)
    world.db.fail_reads = 10**6
    world.db.nudge.set()

    async def distrusted() -> bool:
        return not world.check.trusting

    await eventually(distrusted, within=5, interval=0.005)
    world.db.revoke(CAT)
    world.db.fail_reads = 0

    async def trusting() -> bool:
        return world.check.trusting

    await eventually(trusting, within=5, interval=0.005)
    assert world.check.remembered(CAT) is True


@pytest.mark.parametrize("period", [None, 2])
async def test_a_feed_that_is_not_live_or_reconnected_gives_no_long_trust(
    world: World, period: int | None
) -> None:
    """Listening connection down (None) or a new one not yet read from (2): the trusted
    answers are forgotten at the next lookup and the database is asked again."""
    assert await world.answer_counts_queries(CAT) == (False, 1)
    world.db.period = period
    assert world.check.remembered(CAT) is None
    assert await world.answer_counts_queries(CAT) == (False, 1)
    world.clock.now += TTL
    assert await world.answer_counts_queries(CAT) == (False, 1)
    if period is not None:
        # A read in the new period (here the reconnection's nudge) restores the trust.
        world.db.nudge.set()

        async def trusting() -> bool:
            return world.check.trusting

        await eventually(trusting, within=5, interval=0.005)


async def test_a_query_begun_before_the_trust_ended_gets_the_short_ttl(world: World) -> None:
    """An answer whose query straddled a failure of the feed is kept for ttl, not longer."""
    world.db.query_gate = asyncio.Event()
    lookup = asyncio.create_task(world.check.is_revoked(DOG))
    await eventually(lambda: _now(world.db.queries == 1), within=5, interval=0.005)
    world.db.period = None
    assert not world.check.trusting
    world.db.period = 1
    world.db.nudge.set()

    async def trusting() -> bool:
        return world.check.trusting

    await eventually(trusting, within=5, interval=0.005)
    world.db.query_gate.set()
    assert await lookup is False
    world.db.query_gate = None
    world.clock.now += TTL
    assert await world.answer_counts_queries(DOG) == (False, 1)


async def test_a_stuck_feed_drops_the_long_trust(world: World) -> None:
    """A read cycle longer than stall_after counts as a failure of the feed."""
    assert await world.answer_counts_queries(CAT) == (False, 1)
    world.db.hang.set()  # the current wait returns within POLL; the next one hangs

    async def distrusted() -> bool:
        return not world.check.trusting

    await eventually(distrusted, within=5, interval=0.01)
    assert world.check.remembered(CAT) is None


async def _now(value: bool) -> bool:
    return value

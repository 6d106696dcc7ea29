"""RevocationCheck: how long answers are trusted, local marks, shared lookups, discovery hook.

The store is a fake here (a set of revoked items and a query counter): the real
database behaviour, several processes included, is in tests/integration/test_serve.py.
"""

from __future__ import annotations

import asyncio

import pytest

from relay.core.mxc import MediaId
from relay.media.revocation import RevocationCheck

CAT = MediaId("example.org", "cat")
DOG = MediaId("example.org", "dog")


class FakeStore:
    def __init__(self) -> None:
        self.revoked: set[MediaId] = set()
        self.queries = 0
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None

    async def is_revoked(self, media: MediaId) -> bool:
        self.queries += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return media in self.revoked


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.mark.parametrize(
    ("elapsed", "sees_revocation"),
    [(0.0, False), (0.49, False), (0.5, True), (3.0, True)],
)
async def test_not_revoked_is_trusted_for_ttl_only(
    store: FakeStore, clock: Clock, elapsed: float, sees_revocation: bool
) -> None:
    """A "not revoked" answer is reused for ttl seconds, then the store is asked again."""
    check = RevocationCheck(store, ttl=0.5, clock=clock)
    assert not await check.is_revoked(CAT)
    store.revoked.add(CAT)  # another process commits a redaction
    clock.now += elapsed
    assert await check.is_revoked(CAT) is sees_revocation
    assert store.queries == (2 if sees_revocation else 1)


async def test_revoked_is_remembered_without_queries(store: FakeStore, clock: Clock) -> None:
    """Once revoked, always revoked: later checks do not query the store."""
    store.revoked.add(CAT)
    check = RevocationCheck(store, ttl=0.5, clock=clock)
    assert await check.is_revoked(CAT)
    clock.now += 3600
    assert await check.is_revoked(CAT)
    assert store.queries == 1


async def test_mark_revoked_is_immediate(store: FakeStore, clock: Clock) -> None:
    """mark_revoked overrides a fresh "not revoked" answer at once, without a query."""
    check = RevocationCheck(store, ttl=60, clock=clock)
    assert not await check.is_revoked(CAT)
    check.mark_revoked(CAT)
    assert await check.is_revoked(CAT)
    assert not await check.is_revoked(DOG)
    assert store.queries == 2


async def test_local_mark_wins_over_a_query_in_flight(store: FakeStore, clock: Clock) -> None:
    """A "not revoked" answer arriving after mark_revoked neither unmarks it nor is returned."""
    store.gate = asyncio.Event()
    check = RevocationCheck(store, ttl=60, clock=clock)
    waiter = asyncio.create_task(check.is_revoked(CAT))
    await asyncio.sleep(0)
    check.mark_revoked(CAT)  # the redaction commits while the query is under way
    store.gate.set()
    assert await waiter is True
    assert await check.is_revoked(CAT) is True
    assert store.queries == 1


async def test_remembered_answers_without_a_query(store: FakeStore, clock: Clock) -> None:
    """remembered() gives the cached answer, or None once it must be asked again."""
    store.revoked.add(DOG)
    check = RevocationCheck(store, ttl=0.5, clock=clock)
    assert check.remembered(CAT) is None
    assert not await check.is_revoked(CAT)
    assert await check.is_revoked(DOG)
    assert (check.remembered(CAT), check.remembered(DOG)) == (False, True)
    clock.now += 0.5
    assert (check.remembered(CAT), check.remembered(DOG)) == (None, True)
    assert store.queries == 2


async def test_concurrent_lookups_share_one_query(store: FakeStore, clock: Clock) -> None:
    """Many requests for one item at once cause one store query, and all get its answer."""
    store.revoked.add(CAT)
    store.gate = asyncio.Event()
    check = RevocationCheck(store, clock=clock)
    waiters = [asyncio.create_task(check.is_revoked(CAT)) for _ in range(20)]
    await asyncio.sleep(0)
    store.gate.set()
    assert await asyncio.gather(*waiters) == [True] * 20
    assert store.queries == 1


async def test_cancelled_caller_does_not_cancel_the_shared_query(
    store: FakeStore, clock: Clock
) -> None:
    """A caller that gives up (client gone) leaves the others their answer."""
    store.gate = asyncio.Event()
    check = RevocationCheck(store, clock=clock)
    first = asyncio.create_task(check.is_revoked(CAT))
    second = asyncio.create_task(check.is_revoked(CAT))
    await asyncio.sleep(0)
    first.cancel()
    store.gate.set()
    assert await second is False
    assert first.cancelled()
    assert store.queries == 1


async def test_store_error_propagates_and_is_not_remembered(store: FakeStore, clock: Clock) -> None:
    """A database error reaches the caller; the next check asks the store again."""
    store.error = ConnectionError("database down")
    check = RevocationCheck(store, clock=clock)
    with pytest.raises(ConnectionError):
        await check.is_revoked(CAT)
    store.error = None
    store.revoked.add(CAT)
    assert await check.is_revoked(CAT)
    assert store.queries == 2


async def test_discovery_hook_runs_once_for_foreign_revocations(
    store: FakeStore, clock: Clock
) -> None:
    """A revocation learnt from the store (not marked locally) runs the hook once."""
    discovered: list[MediaId] = []

    async def on_discovered(media: MediaId) -> None:
        discovered.append(media)

    check = RevocationCheck(store, ttl=0, clock=clock, on_discovered=on_discovered)
    store.revoked |= {CAT, DOG}
    check.mark_revoked(DOG)
    for _ in range(3):
        assert await check.is_revoked(CAT)
        assert await check.is_revoked(DOG)
    assert discovered == [CAT]


async def test_failing_discovery_hook_still_refuses(store: FakeStore, clock: Clock) -> None:
    """If the clean-up hook fails, the media still counts as revoked."""

    async def on_discovered(media: MediaId) -> None:
        raise OSError("disk gone")

    check = RevocationCheck(store, clock=clock, on_discovered=on_discovered)
    store.revoked.add(CAT)
    assert await check.is_revoked(CAT)
    assert await check.is_revoked(CAT)


async def test_memory_is_bounded(store: FakeStore, clock: Clock) -> None:
    """At most max_entries answers are kept; forgotten ones are asked again."""
    check = RevocationCheck(store, ttl=60, max_entries=2, clock=clock)
    items = [MediaId("example.org", f"m{i}") for i in range(3)]
    for item in items:
        assert not await check.is_revoked(item)
    assert store.queries == 3
    assert not await check.is_revoked(items[2])  # still remembered
    assert store.queries == 3
    assert not await check.is_revoked(items[0])  # evicted: asked again
    assert store.queries == 4


@pytest.mark.parametrize(("ttl", "max_entries"), [(-1, 10), (0.5, 0)])
def test_bad_parameters_are_refused(store: FakeStore, ttl: float, max_entries: int) -> None:
    """A negative ttl or an empty memory is a programming error, refused at construction."""
    with pytest.raises(ValueError):
        RevocationCheck(store, ttl=ttl, max_entries=max_entries)

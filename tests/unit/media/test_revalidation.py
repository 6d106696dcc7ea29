"""Revalidation policy with a scripted homeserver answer and a hand-driven clock."""

from __future__ import annotations

import asyncio

import pytest

from relay.core.errors import MatrixError
from relay.core.mxc import MediaId
from relay.media.revalidation import Revalidator
from relay.support.metrics import Metrics
from relay.upstream.errors import UpstreamError

CAT = MediaId("example.org", "cat")
INTERVAL = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Homeserver:
    """Answers still_served from a script: True, False or an exception to raise."""

    def __init__(self) -> None:
        self.answer: bool | Exception = True
        self.calls = 0
        self.delay = 0.0

    async def still_served(self, media: MediaId) -> bool:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def homeserver() -> Homeserver:
    return Homeserver()


@pytest.fixture
def gone() -> list[MediaId]:
    return []


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def revalidator(
    homeserver: Homeserver, gone: list[MediaId], metrics: Metrics, clock: Clock
) -> Revalidator:
    async def on_gone(media: MediaId) -> None:
        gone.append(media)

    return Revalidator(homeserver, on_gone, metrics, interval=INTERVAL, clock=clock)


async def test_fresh_entries_cost_nothing(
    revalidator: Revalidator, homeserver: Homeserver, clock: Clock
) -> None:
    """Within the interval of the entry's creation no request is made; nothing cached, none."""
    await revalidator.ensure_served(CAT, clock.now - INTERVAL + 1)
    await revalidator.ensure_served(MediaId("example.org", "uncached"), None)
    assert homeserver.calls == 0


async def test_one_check_per_interval(
    revalidator: Revalidator, homeserver: Homeserver, clock: Clock, metrics: Metrics
) -> None:
    """A stream of hits makes one request per interval, however many hits there are."""
    created = clock.now
    for _ in range(35):  # 35 s of hits, 10 a second
        for _ in range(10):
            await revalidator.ensure_served(CAT, created)
        clock.now += 1
    assert homeserver.calls == 3
    assert metrics.value("relay_revalidations", {"outcome": "present"}) == 3


async def test_concurrent_hits_share_one_check(
    revalidator: Revalidator, homeserver: Homeserver, clock: Clock
) -> None:
    """Requests arriving while a check runs wait for it rather than asking again."""
    homeserver.delay = 0.05
    stale = clock.now - INTERVAL
    await asyncio.gather(*(revalidator.ensure_served(CAT, stale) for _ in range(20)))
    assert homeserver.calls == 1


async def test_gone_is_404_and_purged(
    revalidator: Revalidator,
    homeserver: Homeserver,
    clock: Clock,
    gone: list[MediaId],
    metrics: Metrics,
) -> None:
    """A 404 upstream: this request is a 404, on_gone ran, removal counted."""
    homeserver.answer = False
    with pytest.raises(MatrixError) as caught:
        await revalidator.ensure_served(CAT, clock.now - INTERVAL)
    assert (caught.value.status, caught.value.errcode) == (404, "M_NOT_FOUND")
    assert gone == [CAT]
    assert metrics.value("relay_upstream_removals") == 1
    assert metrics.value("relay_revalidations", {"outcome": "gone"}) == 1


async def test_trouble_serves_for_the_grace_then_503(
    revalidator: Revalidator, homeserver: Homeserver, clock: Clock, gone: list[MediaId]
) -> None:
    """5xx/timeouts: served on, asked once per interval, 503 past 3 intervals, then recovers."""
    created = clock.now
    clock.now += INTERVAL
    homeserver.answer = UpstreamError("homeserver answered 502")
    served = 0
    for _ in range(20):  # from 1 to 3 intervals after the last good answer
        await revalidator.ensure_served(CAT, created)
        served += 1
        clock.now += 1
    assert served == 20 and homeserver.calls == 2
    clock.now = created + 3 * INTERVAL + 1
    with pytest.raises(MatrixError) as caught:
        await revalidator.ensure_served(CAT, created)
    assert caught.value.status == 503
    assert caught.value.headers["Retry-After"] == "10"
    assert gone == []
    homeserver.answer = True
    clock.now += INTERVAL
    await revalidator.ensure_served(CAT, created)  # answered: fresh again


async def test_forget_starts_again_from_the_cache_entry(
    revalidator: Revalidator, homeserver: Homeserver, clock: Clock
) -> None:
    """After a purge the state is gone: a new entry's created_at seeds it."""
    await revalidator.ensure_served(CAT, clock.now - INTERVAL)
    assert homeserver.calls == 1
    revalidator.forget(CAT)
    await revalidator.ensure_served(CAT, clock.now)
    assert homeserver.calls == 1

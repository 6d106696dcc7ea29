"""RevocationCheck.watch: revocations committed elsewhere are applied once each, in order."""

from __future__ import annotations

import asyncio

from relay.core.mxc import MediaId
from relay.media.revocation import RevocationCheck

CAT = MediaId("example.org", "cat")
DOG = MediaId("example.org", "dog")
EMU = MediaId("example.org", "emu")
OLD = MediaId("example.org", "old")


class Feed:
    """is_revoked for RevocationCheck, and a feed the test nudges by hand."""

    def __init__(self, batch: int = 10) -> None:
        self.rows: list[tuple[int, MediaId]] = []
        self.asked: list[int] = []
        self.fail = 0
        self.batch = batch
        self.nudge = asyncio.Event()
        self.period: int | None = 0

    async def is_revoked(self, media: MediaId) -> bool:
        return any(m == media for _, m in self.rows)

    async def head(self) -> int:
        return max((seq for seq, _ in self.rows), default=0)

    async def after(self, cursor: int) -> list[tuple[int, MediaId]]:
        self.asked.append(cursor)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("database down")
        return [(s, m) for s, m in self.rows if s > cursor][: self.batch]

    async def wait(self) -> None:
        await self.nudge.wait()
        self.nudge.clear()

    def live_period(self) -> int | None:
        return self.period


async def until(condition: object, *, within: float = 1.0) -> None:
    for _ in range(int(within / 0.005)):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def test_watch_applies_each_revocation_once_and_survives_errors() -> None:
    """Rows past the start are marked and discovered once; a database error is retried."""
    feed = Feed(batch=1)
    feed.rows = [(3, OLD)]  # before the watch began: found by is_revoked, not discovered
    discovered: list[MediaId] = []

    async def on_discovered(media: MediaId) -> None:
        discovered.append(media)

    check = RevocationCheck(feed, on_discovered=on_discovered)
    check.mark_revoked(DOG)  # revoked here already: not discovered again
    watcher = asyncio.create_task(check.watch(feed, retry_delay=0.01))
    try:
        await asyncio.sleep(0.02)
        feed.rows += [(7, CAT), (9, DOG), (12, EMU)]
        feed.fail = 1
        feed.nudge.set()
        await until(lambda: EMU in discovered)
        assert discovered == [CAT, EMU]
        assert check.remembered(CAT) is True and check.remembered(OLD) is None
        # From the head, past each batch; the failed read is asked again from where it was.
        assert feed.asked[:2] == [3, 3]
        assert feed.asked[2:] == [7, 9, 12]
    finally:
        watcher.cancel()


async def test_nothing_is_read_until_the_feed_says_so() -> None:
    """The watcher reads only when the feed's wait returns (a push, or the poll's interval)."""
    feed = Feed()
    check = RevocationCheck(feed)
    watcher = asyncio.create_task(check.watch(feed))
    try:
        await asyncio.sleep(0.01)  # the watch starts from the head (0)
        feed.rows = [(1, CAT)]
        await asyncio.sleep(0.05)
        assert feed.asked == [] and check.remembered(CAT) is None
        feed.nudge.set()
        await until(lambda: check.remembered(CAT) is True)
    finally:
        watcher.cancel()

"""RevocationCheck.watch: revocations committed elsewhere are applied once each."""

from __future__ import annotations

import asyncio

from relay.core.mxc import MediaId
from relay.media.revocation import CLOCK_MARGIN_MS, RevocationCheck

CAT = MediaId("example.org", "cat")
DOG = MediaId("example.org", "dog")
NOW_MS = 1_000_000


class Store:
    """is_revoked for RevocationCheck, and the revocation log the watcher reads."""

    def __init__(self) -> None:
        self.rows: list[tuple[MediaId, int]] = []
        self.asked: list[int] = []
        self.fail = 0

    async def is_revoked(self, media: MediaId) -> bool:
        return any(m == media for m, _ in self.rows)

    async def revoked_since(self, since_ms: int) -> list[tuple[MediaId, int]]:
        self.asked.append(since_ms)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("database down")
        return [(m, t) for m, t in self.rows if t >= since_ms]


async def test_watch_applies_each_revocation_once_and_survives_errors() -> None:
    """New rows are marked revoked and discovered once; a database error is retried."""
    store = Store()
    discovered: list[MediaId] = []

    async def on_discovered(media: MediaId) -> None:
        discovered.append(media)

    check = RevocationCheck(store, on_discovered=on_discovered)
    check.mark_revoked(DOG)  # revoked here already: not discovered again
    store.rows = [(CAT, NOW_MS + 10), (DOG, NOW_MS + 20)]
    store.fail = 1
    watcher = asyncio.create_task(check.watch(store, interval=0.01, wall=lambda: NOW_MS / 1000))
    try:
        for _ in range(100):
            if len(store.asked) >= 4:
                break
            await asyncio.sleep(0.01)
    finally:
        watcher.cancel()
    assert discovered == [CAT]
    assert check.remembered(CAT) is True
    # Looks back by the clock margin from the newest revocation seen.
    assert store.asked[0] == NOW_MS - CLOCK_MARGIN_MS
    assert store.asked[-1] == NOW_MS + 20 - CLOCK_MARGIN_MS

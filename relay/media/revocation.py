"""Is this media revoked? A memory in front of the database's answer.

A redaction revokes media for good (``revoked_media`` rows are never deleted), so a
"revoked" answer is kept until pushed out of the bounded memory.
The process that ingested the redaction calls :meth:`RevocationCheck.mark_revoked`
and stops at once. Revocations committed elsewhere (another process, ``media-relay
revoke``, a removal found upstream) reach :meth:`RevocationCheck.watch` through a
:class:`RevocationFeed` (pushed on PostgreSQL, polled on SQLite:
:mod:`relay.store.revocation_feed`), so every process refuses the media, purges its
copy and cuts its responses under way without waiting for a request.

A "not revoked" answer is trusted for ``ttl`` seconds (0.5) on its own, and for
``trusted_ttl`` (a minute) while the feed is followed: every revocation committed
after the watch's starting cursor reaches the memory within the feed's latency,
which is what expiring the answer would otherwise find out. So a hot link costs
one database query a minute, not two a second. The long trust only covers answers
whose query began after the watch had its cursor and while it was following the
feed, and it ends, all long-trusted answers forgotten, as soon as a read of the feed
fails, a read cycle stalls past ``stall_after`` (10 s), or the feed says it is not
live (PostgreSQL: its listening connection is down): safety never rests on a broken
feed. After the feed is back, the watch first reads from its cursor, so what was
committed meanwhile is applied, and gives long trust again only after a whole cycle
(the feed woke it, it read) within one live period of the feed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from relay.core.mxc import MediaId
from relay.support.memo import TTLCache
from relay.support.singleflight import Call, SingleFlight

log = logging.getLogger(__name__)

DEFAULT_TTL = 0.5
# "Not revoked", while the feed is followed (see the module docstring).
TRUSTED_TTL = 60.0
DEFAULT_MAX_ENTRIES = 100_000
# After a failed read of the feed, wait this long before trying again.
RETRY_DELAY = 0.5
# A feed's wait returns within its poll interval (5 s at most); a cycle this long is stuck.
STALL_AFTER = 10.0


class RevocationStore(Protocol):
    """The database's answer (``relay.store.Store`` provides it)."""

    async def is_revoked(self, media: MediaId) -> bool: ...


class RevocationFeed(Protocol):
    """Revocations in commit order past a cursor (``relay.store.revocation_feed``)."""

    async def head(self) -> int: ...

    async def after(self, cursor: int) -> list[tuple[int, MediaId]]: ...

    async def wait(self) -> None:
        """Return when there may be revocations past the cursor (pushed or polled)."""

    def live_period(self) -> int | None:
        """None while a revocation committed now might not be read within the feed's
        latency (PostgreSQL: not listening); else a number that changes whenever the
        feed was not live in between (a new listening connection)."""


class RevocationCheck:
    """Answers ``is_revoked(media)`` from a bounded TTL memory backed by the store.

    ``on_discovered`` is awaited once when the store reports a revocation this process
    did not know of (another process ingested the redaction), so the local cache can
    be purged here too. Concurrent lookups of one item share one database query.
    """

    def __init__(
        self,
        store: RevocationStore,
        *,
        ttl: float = DEFAULT_TTL,
        trusted_ttl: float = TRUSTED_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        on_discovered: Callable[[MediaId], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self.ttl = ttl
        self.max_entries = max_entries
        self._on_discovered = on_discovered
        # media → the store's answer: True for good (forgetting it is safe: the next
        # lookup asks again), False for ``ttl`` seconds. Raises ValueError on bad limits.
        self._answers: TTLCache[MediaId, bool] = TTLCache(ttl, max_entries, clock=clock)
        # "Not revoked" answers given while the feed was followed, for ``trusted_ttl``;
        # forgotten whenever the feed fails (module docstring).
        self._cleared: TTLCache[MediaId, bool] = TTLCache(trusted_ttl, max_entries, clock=clock)
        self._queries: SingleFlight[MediaId, Call[bool]] = SingleFlight("is_revoked")
        self._feed: RevocationFeed | None = None
        # The feed's live period the long trust rests on (None: no long trust), and a
        # number bumped whenever the trust ends or begins: a query that began under
        # another gives no long trust.
        self._period: int | None = None
        self._epoch = 0

    def mark_revoked(self, media: MediaId) -> None:
        """Record a revocation this process committed: effective immediately."""
        self._answers.put(media, True, ttl=math.inf)
        self._cleared.discard(media)

    @property
    def trusting(self) -> bool:
        """Whether "not revoked" answers are trusted for ``trusted_ttl`` right now."""
        period = self._period
        if period is None:
            return False
        feed = self._feed
        if feed is not None and feed.live_period() == period:
            return True
        self._distrust()
        return False

    def remembered(self, media: MediaId) -> bool | None:
        """The answer :meth:`is_revoked` would give without a query, or None (no I/O)."""
        known = self._answers.get(media)
        if known is None and self._period is not None and self.trusting:
            return self._cleared.get(media)
        return known

    async def is_revoked(self, media: MediaId) -> bool:
        """Whether links to ``media`` must stop working (database errors propagate)."""
        known = self.remembered(media)
        if known is not None:
            return known
        # Shared: concurrent lookups of one item make one query, and a caller that
        # gives up (client gone) never cancels the one the others wait for.
        return await self._queries.join(media, lambda: Call(lambda: self._query(media))).result()

    async def _query(self, media: MediaId) -> bool:
        epoch = self._epoch if self.trusting else None
        revoked = await self._store.is_revoked(media)
        if self._answers.get(media) is True:
            # Marked revoked here while the query ran: that answer is the newer one.
            return True
        if revoked:
            # Another process ingested the redaction: clean up here too.
            self.mark_revoked(media)
            await self._discovered(media)
        elif epoch is not None and epoch == self._epoch and self.trusting:
            # Followed throughout the query: a revocation after it reaches us by the feed.
            self._cleared.put(media, False)
        else:
            self._answers.put(media, False)
        return revoked

    def _distrust(self, *, quietly: bool = False) -> None:
        """End the long trust: forget every answer that relied on it."""
        if self._period is not None and not quietly:
            log.warning("revocation feed not live: 'not revoked' trusted for %.1f s", self.ttl)
        self._period = None
        self._epoch += 1
        self._cleared.clear()

    def _follow(self, before: int | None, after: int | None) -> None:
        """A read of the feed succeeded, live from ``before`` it to ``after``: trust."""
        if before is not None and before == after and self._period != after:
            self._period = after
            self._epoch += 1

    async def watch(
        self,
        feed: RevocationFeed,
        *,
        retry_delay: float = RETRY_DELAY,
        stall_after: float = STALL_AFTER,
    ) -> None:
        """Forever: apply revocations committed elsewhere (``on_discovered`` once each).

        Follows the feed's cursor from the newest revocation at start: older ones are
        found by :meth:`is_revoked` when asked. Database errors are logged and retried.
        While it follows the feed, "not revoked" answers are trusted longer (module
        docstring).
        """
        self._feed = feed
        cursor: int | None = None
        behind = False  # a read failed: read again without waiting for the feed
        try:
            loop = asyncio.get_running_loop()
            while True:
                # A cycle that stalls drops the trust when it passes stall_after, but is
                # not cancelled: cancelling a query midway can leave its connection
                # unusable (asyncpg's "another operation is in progress").
                stalled = loop.call_later(stall_after, self._distrust)
                try:
                    waited = cursor is not None and not behind
                    if waited:
                        await feed.wait()
                    # Live from before this read to after it: nothing committed
                    # since the read's snapshot can be missed (module docstring).
                    before = feed.live_period()
                    # Shielded: cancelling the watch (at shutdown) must not cancel a
                    # query midway, which can leave its pooled asyncpg connection broken
                    # ("another operation is in progress") and the pool unable to close.
                    if cursor is None:
                        cursor = await asyncio.shield(feed.head())
                    else:
                        behind = True
                        # Everything past the cursor (a feed gives it out in batches).
                        while found := await asyncio.shield(feed.after(cursor)):
                            cursor = found[-1][0]
                            await self._apply([media for _, media in found])
                        behind = False
                    if loop.time() >= stalled.when():
                        waited = False  # it stalled: this cycle proves nothing
                    if waited:
                        # Only a whole cycle (the feed woke us, we read) proves it works.
                        self._follow(before, feed.live_period())
                except Exception:
                    self._distrust()
                    log.exception("could not look for new revocations; trying again")
                    await asyncio.sleep(retry_delay)
                finally:
                    stalled.cancel()
        finally:
            self._distrust(quietly=True)
            self._feed = None

    async def _apply(self, revoked: list[MediaId]) -> None:
        new = [m for m in revoked if self._answers.get(m) is not True]
        # Refused at once, all of them; the clean-ups (purge, counting) come after.
        for media in new:
            self.mark_revoked(media)
        for media in new:
            await self._discovered(media)

    async def close(self) -> None:
        """Cancel lookups still under way (at shutdown, before the database closes)."""
        await self._queries.close()

    async def _discovered(self, media: MediaId) -> None:
        if self._on_discovered is None:
            return
        try:
            await self._on_discovered(media)
        except Exception:
            # The link is refused either way; only the local clean-up failed.
            log.exception("could not clean up after discovering that %s was revoked", media)

"""Is this media revoked? A short-lived memory in front of the database's answer.

A redaction revokes media for good (``revoked_media`` rows are never deleted), so a
"revoked" answer is kept until pushed out of the bounded memory, while a "not
revoked" answer is trusted for only ``ttl`` seconds, without one database query per
request for hot media.
The process that ingested the redaction calls :meth:`RevocationCheck.mark_revoked`
and stops at once. Revocations committed elsewhere (another process, ``media-relay
revoke``, a removal found upstream) reach :meth:`RevocationCheck.watch` through a
:class:`RevocationFeed` (pushed on PostgreSQL, polled on SQLite:
:mod:`relay.store.revocation_feed`), so every process refuses the media, purges its
copy and cuts its responses under way without waiting for a request.
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
DEFAULT_MAX_ENTRIES = 100_000
# After a failed read of the feed, wait this long before trying again.
RETRY_DELAY = 0.5


class RevocationStore(Protocol):
    """The database's answer (``relay.store.Store`` provides it)."""

    async def is_revoked(self, media: MediaId) -> bool: ...


class RevocationFeed(Protocol):
    """Revocations in commit order past a cursor (``relay.store.revocation_feed``)."""

    async def head(self) -> int: ...

    async def after(self, cursor: int) -> list[tuple[int, MediaId]]: ...

    async def wait(self) -> None:
        """Return when there may be revocations past the cursor (pushed or polled)."""


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
        self._queries: SingleFlight[MediaId, Call[bool]] = SingleFlight("is_revoked")

    def mark_revoked(self, media: MediaId) -> None:
        """Record a revocation this process committed: effective immediately."""
        self._answers.put(media, True, ttl=math.inf)

    def remembered(self, media: MediaId) -> bool | None:
        """The answer :meth:`is_revoked` would give without a query, or None (no I/O)."""
        return self._answers.get(media)

    async def is_revoked(self, media: MediaId) -> bool:
        """Whether links to ``media`` must stop working (database errors propagate)."""
        known = self._answers.get(media)
        if known is not None:
            return known
        # Shared: concurrent lookups of one item make one query, and a caller that
        # gives up (client gone) never cancels the one the others wait for.
        return await self._queries.join(media, lambda: Call(lambda: self._query(media))).result()

    async def _query(self, media: MediaId) -> bool:
        revoked = await self._store.is_revoked(media)
        if self._answers.get(media) is True:
            # Marked revoked here while the query ran: that answer is the newer one.
            return True
        if revoked:
            # Another process ingested the redaction: clean up here too.
            self._answers.put(media, True, ttl=math.inf)
            await self._discovered(media)
        else:
            self._answers.put(media, False)
        return revoked

    async def watch(self, feed: RevocationFeed, *, retry_delay: float = RETRY_DELAY) -> None:
        """Forever: apply revocations committed elsewhere (``on_discovered`` once each).

        Follows the feed's cursor from the newest revocation at start: older ones are
        found by :meth:`is_revoked` when asked. Database errors are logged and retried.
        """
        cursor: int | None = None
        behind = False  # a read failed: read again without waiting for the feed
        while True:
            try:
                if cursor is None:
                    cursor = await feed.head()
                if not behind:
                    await feed.wait()
                behind = True
                # Read everything past the cursor (a feed gives it out in batches).
                while found := await feed.after(cursor):
                    cursor = found[-1][0]
                    await self._apply([media for _, media in found])
                behind = False
            except Exception:
                log.exception("could not look for new revocations; trying again")
                await asyncio.sleep(retry_delay)

    async def _apply(self, revoked: list[MediaId]) -> None:
        new = [m for m in revoked if self._answers.get(m) is not True]
        # Refused at once, all of them; the clean-ups (purge, counting) come after.
        for media in new:
            self._answers.put(media, True, ttl=math.inf)
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

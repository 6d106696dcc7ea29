"""Is this media revoked? A short-lived memory in front of the database's answer.

A redaction revokes media for good (``revoked_media`` rows are never deleted), so a
"revoked" answer is kept until pushed out of the bounded memory, while a "not
revoked" answer is trusted for only ``ttl`` seconds. With ``ttl`` at most 0.5 s, a
redaction committed by any relay process sharing the database stops every other
process serving the media within a second, without one database query per request
for hot media.
The process that ingested the redaction calls :meth:`RevocationCheck.mark_revoked`
and stops at once.
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

log = logging.getLogger(__name__)

DEFAULT_TTL = 0.5
DEFAULT_MAX_ENTRIES = 100_000


class RevocationStore(Protocol):
    """The database's answer (``relay.store.Store`` provides it)."""

    async def is_revoked(self, media: MediaId) -> bool: ...


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
        self._pending: dict[MediaId, asyncio.Task[bool]] = {}

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
        task = self._pending.get(media)
        if task is None:
            # A task of its own, so a caller that gives up (client gone) never cancels
            # the query the other callers of the same item are waiting for.
            task = asyncio.create_task(self._query(media), name=f"is_revoked {media}")
            self._pending[media] = task
            task.add_done_callback(lambda done: self._query_done(media, done))
        return await asyncio.shield(task)

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

    def _query_done(self, media: MediaId, task: asyncio.Task[bool]) -> None:
        if self._pending.get(media) is task:
            del self._pending[media]
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here so that an error nobody waited for is not reported as
            # "never retrieved"; waiters still get it raised.
            log.debug("revocation lookup of %s failed: %s", media, task.exception())

    async def close(self) -> None:
        """Cancel lookups still under way (at shutdown, before the database closes)."""
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _discovered(self, media: MediaId) -> None:
        if self._on_discovered is None:
            return
        try:
            await self._on_discovered(media)
        except Exception:
            # The link is refused either way; only the local clean-up failed.
            log.exception("could not clean up after discovering that %s was revoked", media)

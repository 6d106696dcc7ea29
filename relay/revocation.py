"""Is this media revoked? A short-lived memory in front of the database's answer.

A redaction revokes media for good (``revoked_media`` rows are never deleted), so a
"revoked" answer is kept until the memory is full, while a "not revoked" answer is
trusted for only ``ttl`` seconds. With ``ttl`` at most 0.5 s, a redaction committed
by any relay process sharing the database stops every other process serving the
media within a second, without one database query per request for hot media.
The process that ingested the redaction calls :meth:`RevocationCheck.mark_revoked`
and stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol

from relay.mxc import MediaId

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
        if ttl < 0 or max_entries < 1:
            raise ValueError("ttl must be >= 0 and max_entries >= 1")
        self._store = store
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._on_discovered = on_discovered
        # media → time until which "not revoked" may be believed; LRU order.
        self._not_revoked: OrderedDict[MediaId, float] = OrderedDict()
        self._revoked: OrderedDict[MediaId, None] = OrderedDict()
        self._pending: dict[MediaId, asyncio.Task[bool]] = {}

    def mark_revoked(self, media: MediaId) -> None:
        """Record a revocation this process committed: effective immediately."""
        self._not_revoked.pop(media, None)
        self._remember_revoked(media)

    async def is_revoked(self, media: MediaId) -> bool:
        """Whether links to ``media`` must stop working (database errors propagate)."""
        if media in self._revoked:
            self._revoked.move_to_end(media)
            return True
        until = self._not_revoked.get(media)
        if until is not None:
            if self._clock() < until:
                return False
            del self._not_revoked[media]
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
        if revoked:
            if media not in self._revoked:
                self._remember_revoked(media)
                await self._discovered(media)
        else:
            self._not_revoked[media] = self._clock() + self.ttl
            self._not_revoked.move_to_end(media)
            while len(self._not_revoked) > self.max_entries:
                self._not_revoked.popitem(last=False)
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

    def _remember_revoked(self, media: MediaId) -> None:
        self._revoked[media] = None
        self._revoked.move_to_end(media)
        while len(self._revoked) > self.max_entries:
            # Forgetting is safe: the next lookup asks the database again.
            self._revoked.popitem(last=False)

    async def _discovered(self, media: MediaId) -> None:
        if self._on_discovered is None:
            return
        try:
            await self._on_discovered(media)
        except Exception:
            # The link is refused either way; only the local clean-up failed.
            log.exception("could not clean up after discovering that %s was revoked", media)

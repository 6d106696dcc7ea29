"""Is the homeserver still serving what the relay has cached? Asked once per interval.

The homeserver is the source of truth: media it quarantined or deleted must stop being
served from the relay's cache within ``media.revalidate_after`` seconds, without an
upstream request per hit. The policy, per media item (every cached variant together):

- **fresh** (last upstream answer younger than ``revalidate_after``): served, no I/O.
  The last answer is kept in memory; at start-up, or once forgotten, it is seeded from
  the oldest cache entry's ``created_at`` (that entry came from an upstream answer at
  least that old). Nothing cached: nothing to check (the download is the check).
- **stale**: one check (:class:`~relay.upstream.probe.MediaProbe`), shared by every
  request that arrives meanwhile (:mod:`relay.support.singleflight`):
  - present → fresh again, served;
  - gone (404: quarantined, deleted) → ``on_gone`` (purge everything of it, revoke it
    with source ``homeserver``), and this request answers 404; later ones 410;
  - trouble (5xx, timeout, 429, refused token) → served on, and asked again after
    another interval, for up to ``grace`` seconds (default 3 x ``revalidate_after``)
    after the last good answer; after that 503 with Retry-After until it answers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from relay.core.errors import Codes, MatrixError
from relay.core.mxc import MediaId
from relay.support.memo import TTLCache
from relay.support.metrics import Metrics
from relay.support.singleflight import Call, SingleFlight
from relay.upstream.errors import FetchError

log = logging.getLogger(__name__)

GRACE_FACTOR = 3
MAX_ENTRIES = 100_000


class Probe(Protocol):
    """The upstream question (``relay.upstream.probe.MediaProbe`` answers it)."""

    async def still_served(self, media: MediaId) -> bool: ...


class Outcome(StrEnum):
    """A check's answer, and the ``relay_revalidations`` label."""

    PRESENT = "present"
    GONE = "gone"
    FAILED = "failed"


@dataclass(slots=True)
class _State:
    last_ok: float  # wall time of the last "present" (or the seed)
    last_attempt: float  # wall time of the last check, whatever it said


class Revalidator:
    """Decides, per request, whether cached media may still be served (module docstring)."""

    def __init__(
        self,
        probe: Probe,
        on_gone: Callable[[MediaId], Awaitable[None]],
        metrics: Metrics,
        *,
        interval: float,
        grace: float | None = None,
        clock: Callable[[], float] = time.time,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        # Wall time, not monotonic: seeds come from cache entries' created_at.
        self._probe = probe
        self._on_gone = on_gone
        self._metrics = metrics
        self.interval = interval
        self.grace = GRACE_FACTOR * interval if grace is None else grace
        self._clock = clock
        self._states: TTLCache[MediaId, _State] = TTLCache(math.inf, max_entries, clock=clock)
        self._checks: SingleFlight[MediaId, Call[Outcome]] = SingleFlight("revalidate")

    def forget(self, media: MediaId) -> None:
        """Drop what is known of ``media`` (it was purged)."""
        self._states.discard(media)

    def served_now(self, media: MediaId, cached_at: float | None) -> bool:
        """Whether :meth:`ensure_served` would return at once, with no check to make and
        no state to change (False when in doubt: the caller then takes that way)."""
        state = self._states.get(media)
        if state is None or cached_at is None:
            return state is None and cached_at is None
        now = self._clock()
        return now - state.last_attempt < self.interval and not now - state.last_ok > self.grace

    async def ensure_served(self, media: MediaId, cached_at: float | None) -> None:
        """Return if ``media`` may be served from the cache; raise MatrixError if not.

        ``cached_at`` is the oldest cache entry's ``created_at`` (None: nothing cached).
        """
        state = self._states.get(media)
        if state is None:
            if cached_at is None:
                return
            state = _State(cached_at, cached_at)
            self._states.put(media, state)
        elif cached_at is None and self._clock() - state.last_ok >= self.interval:
            # Nothing cached any more: the next download asks the homeserver anyway.
            self._states.discard(media)
            return
        now = self._clock()
        if now - state.last_attempt >= self.interval:
            outcome = await self._checks.join(
                media, lambda: Call(lambda: self._check(media))
            ).result()
            if outcome is Outcome.GONE:
                raise MatrixError(
                    404, Codes.NOT_FOUND, "The homeserver no longer serves this media"
                )
            now = self._clock()
        if now - state.last_ok > self.grace:
            retry = max(1, math.ceil(self.interval))
            raise MatrixError(
                503,
                Codes.UNKNOWN,
                "The homeserver cannot confirm this media right now",
                {"Retry-After": str(retry)},
            )

    async def close(self) -> None:
        """Cancel checks under way (at shutdown)."""
        await self._checks.close()

    async def _check(self, media: MediaId) -> Outcome:
        """One upstream check; updates the state, counts it, purges gone media."""
        try:
            present = await self._probe.still_served(media)
        except FetchError as e:
            outcome = Outcome.FAILED
            log.warning("revalidation of %s failed (%s); serving the cached copy on", media, e)
        else:
            outcome = Outcome.PRESENT if present else Outcome.GONE
        self._metrics.revalidations.labels(outcome=outcome).inc()
        now = self._clock()
        state = self._states.get(media)
        if state is None:
            state = _State(now, now)
            self._states.put(media, state)
        state.last_attempt = now
        if outcome is Outcome.PRESENT:
            state.last_ok = now
        elif outcome is Outcome.GONE:
            self._states.discard(media)
            self._metrics.upstream_removals.inc()
            log.info("the homeserver no longer serves %s: purging it", media)
            try:
                await self._on_gone(media)
            except Exception:
                # The request is refused either way; only the clean-up failed.
                log.exception("could not purge %s after the homeserver dropped it", media)
        return outcome

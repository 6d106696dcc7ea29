"""A small bounded map whose entries expire: the short memories of the serving path.

Used for answers that may be trusted briefly (revocations, media records, verified
tokens, ready responses). Two limits, both always enforced:

- **time**: an entry is returned only while ``clock() < put time + ttl``; a later
  ``get`` forgets it. ``ttl`` may be ``math.inf`` (kept until pushed out).
- **size**: at most ``max_entries``; putting one more evicts the oldest (the entry put
  least recently), so memory stays bounded whatever keys arrive.

Not thread-safe: one instance belongs to one event loop, like everything it serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """A map of at most ``max_entries`` entries, each valid for ``ttl`` seconds of ``clock``."""

    __slots__ = ("_clock", "_items", "max_entries", "ttl")

    def __init__(
        self,
        ttl: float,
        max_entries: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # "not ttl >= 0" also refuses NaN, which would make every entry immortal or dead.
        if not ttl >= 0 or max_entries < 1:
            raise ValueError("ttl must be >= 0 and max_entries >= 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        # key → (deadline, value); dicts keep insertion order, so the first key is the oldest.
        self._items: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        """The value put under ``key`` if it has not expired, else ``None``."""
        item = self._items.get(key)
        if item is None:
            return None
        deadline, value = item
        # Written as "not before" so that a NaN clock counts as expired, never as fresh.
        if not self._clock() < deadline:
            del self._items[key]
            return None
        return value

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        """Remember ``value`` for ``ttl`` seconds (default: the cache's ``ttl``)."""
        lifetime = self.ttl if ttl is None else ttl
        if not lifetime >= 0:
            raise ValueError("ttl must be >= 0")
        items = self._items
        # Re-inserted, not updated in place, so it counts as the newest entry.
        items.pop(key, None)
        items[key] = (self._clock() + lifetime, value)
        while len(items) > self.max_entries:
            del items[next(iter(items))]

    def discard(self, key: K) -> None:
        """Forget ``key`` (no error if it is not there)."""
        self._items.pop(key, None)

    def discard_where(self, matches: Callable[[K], bool]) -> int:
        """Forget every key that ``matches``; returns how many (a scan: for rare events)."""
        keys = [key for key in self._items if matches(key)]
        for key in keys:
            del self._items[key]
        return len(keys)

    def clear(self) -> None:
        """Forget everything."""
        self._items.clear()

    def __len__(self) -> int:
        """Entries held, expired ones not yet forgotten included."""
        return len(self._items)

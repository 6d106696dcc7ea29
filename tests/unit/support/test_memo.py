"""TTLCache: entries expire by the injected clock, the size bound evicts the oldest first."""

from __future__ import annotations

import math

import pytest

from relay.support.memo import TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.mark.parametrize(
    ("ttl", "elapsed", "found"),
    [
        (1.0, 0.0, True),
        (1.0, 0.999, True),
        (1.0, 1.0, False),  # expired from put time + ttl on, like signed links
        (1.0, 5.0, False),
        (0.0, 0.0, False),  # ttl 0: never returned
        (math.inf, 1e12, True),
    ],
)
def test_entries_live_for_ttl_of_the_clock(
    clock: Clock, ttl: float, elapsed: float, found: bool
) -> None:
    """get returns a value only while clock() < put time + ttl."""
    cache: TTLCache[str, int] = TTLCache(ttl, 10, clock=clock)
    cache.put("a", 1)
    clock.now += elapsed
    assert cache.get("a") == (1 if found else None)


def test_expired_entry_is_forgotten_on_get(clock: Clock) -> None:
    """An expired entry stays gone even if the clock goes back (it is deleted, not hidden)."""
    cache: TTLCache[str, int] = TTLCache(1.0, 10, clock=clock)
    cache.put("a", 1)
    clock.now += 2
    assert cache.get("a") is None
    assert len(cache) == 0
    clock.now -= 2
    assert cache.get("a") is None


def test_per_entry_ttl_overrides_the_default(clock: Clock) -> None:
    """put(ttl=...) gives one entry its own lifetime; the others keep the cache's."""
    cache: TTLCache[str, bool] = TTLCache(1.0, 10, clock=clock)
    cache.put("short", False)
    cache.put("forever", True, ttl=math.inf)
    clock.now += 3600
    assert cache.get("short") is None
    assert cache.get("forever") is True


def test_put_again_renews_value_and_lifetime(clock: Clock) -> None:
    """Putting a key again replaces its value and restarts its ttl."""
    cache: TTLCache[str, int] = TTLCache(1.0, 10, clock=clock)
    cache.put("a", 1)
    clock.now += 0.8
    cache.put("a", 2)
    clock.now += 0.8
    assert cache.get("a") == 2


def test_bound_evicts_the_oldest_put_first(clock: Clock) -> None:
    """Beyond max_entries the least recently put entry goes; a re-put counts as new."""
    cache: TTLCache[str, int] = TTLCache(60.0, 3, clock=clock)
    for key in ("a", "b", "c"):
        cache.put(key, ord(key))
    cache.put("a", 0)  # "a" is now the newest
    cache.put("d", 4)  # evicts "b", the oldest
    assert len(cache) == 3
    assert [cache.get(k) for k in ("a", "b", "c", "d")] == [0, None, ord("c"), 4]


def test_none_is_stored_like_any_value_but_reads_as_a_miss(clock: Clock) -> None:
    """get cannot tell a stored None from a miss: wrap such values (the serve memo does)."""
    cache: TTLCache[str, tuple[int | None]] = TTLCache(1.0, 10, clock=clock)
    cache.put("never seen", (None,))
    assert cache.get("never seen") == (None,)
    assert cache.get("unknown") is None


def test_discard_and_clear(clock: Clock) -> None:
    """discard forgets one key (missing keys are fine), clear forgets all."""
    cache: TTLCache[str, int] = TTLCache(60.0, 10, clock=clock)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.discard("a")
    cache.discard("missing")
    assert (cache.get("a"), cache.get("b")) == (None, 2)
    cache.clear()
    assert cache.get("b") is None
    assert len(cache) == 0


def test_nan_clock_counts_as_expired(clock: Clock) -> None:
    """A NaN clock reading never makes an entry fresh."""
    cache: TTLCache[str, int] = TTLCache(60.0, 10, clock=clock)
    cache.put("a", 1)
    clock.now = math.nan
    assert cache.get("a") is None


@pytest.mark.parametrize(("ttl", "max_entries"), [(-1.0, 10), (math.nan, 10), (1.0, 0)])
def test_bad_limits_are_refused(ttl: float, max_entries: int) -> None:
    """A negative or NaN ttl, or room for nothing, is a programming error."""
    with pytest.raises(ValueError):
        TTLCache(ttl, max_entries)


@pytest.mark.parametrize("ttl", [-1.0, math.nan])
def test_bad_per_entry_ttl_is_refused(clock: Clock, ttl: float) -> None:
    """put refuses a negative or NaN ttl and stores nothing."""
    cache: TTLCache[str, int] = TTLCache(1.0, 10, clock=clock)
    with pytest.raises(ValueError):
        cache.put("a", 1, ttl=ttl)
    assert len(cache) == 0

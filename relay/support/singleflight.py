"""Single-flight: one piece of work per key, shared by every caller that asks meanwhile.

Used wherever concurrent requests would otherwise repeat the same expensive thing: a
download, a render, a revocation query. The work runs in a task of its own, so a caller
that gives up (its client left) never cancels what the other callers wait for; when the
work ends, the key is free again and the next caller starts afresh.

A flight is an object, not just a coroutine, so work that others may follow while it
runs (a download whose file grows) can carry its progress: subclass :class:`Flight`.
:class:`Call` wraps a plain coroutine function for everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Hashable, Iterator
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
F = TypeVar("F", bound="Flight[Any]")


class Flight(Generic[V]):
    """One shared piece of work; :meth:`work` is what runs, once."""

    task: asyncio.Task[V]

    async def work(self) -> V:
        raise NotImplementedError

    async def result(self) -> V:
        """The work's result (or its exception); cancelling the caller leaves the work running."""
        return await asyncio.shield(self.task)


class Call(Flight[V]):
    """A flight that runs ``make()``."""

    def __init__(self, make: Callable[[], Coroutine[Any, Any, V]]) -> None:
        self._make = make

    async def work(self) -> V:
        return await self._make()


class SingleFlight(Generic[K, F]):
    """At most one flight per key; ``join`` starts one or returns the one under way."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._flights: dict[K, F] = {}
        # Callers that found a flight under way (for metrics and tests).
        self.joined = 0

    def join(self, key: K, make: Callable[[], F]) -> F:
        """The flight for ``key``: the one under way, else ``make()``, started now."""
        flight = self._flights.get(key)
        if flight is not None:
            self.joined += 1
            return flight
        flight = make()
        self._flights[key] = flight
        flight.task = asyncio.create_task(self._run(key, flight), name=f"{self._name} {key}")
        flight.task.add_done_callback(self._retrieve)
        return flight

    def get(self, key: K) -> F | None:
        """The flight under way for ``key``, if any."""
        return self._flights.get(key)

    def detach(self, matches: Callable[[K], bool]) -> list[F]:
        """Forget the flights whose key matches (they run on; new callers start afresh)."""
        keys = [key for key in self._flights if matches(key)]
        return [self._flights.pop(key) for key in keys]

    async def close(self) -> None:
        """Cancel every flight under way and wait for them to end."""
        tasks = [flight.task for flight in self._flights.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def __len__(self) -> int:
        return len(self._flights)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._flights))

    async def _run(self, key: K, flight: F) -> Any:
        try:
            return await flight.work()
        finally:
            # Here, not in a done callback: a waiter resumed by the result must find the
            # key free, or its next call would join the flight that just ended.
            if self._flights.get(key) is flight:
                del self._flights[key]

    def _retrieve(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here so that a failure nobody waited for is not reported as
            # "never retrieved"; every waiter still gets it raised.
            log.debug("%s failed: %r", task.get_name(), task.exception())

"""A relay on an event loop of its own thread, for tests that drive it with blocking calls.

Hypothesis and schemathesis run synchronous test bodies; the relay under test then
needs a loop that keeps running between (and during) their blocking HTTP requests.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from relay.app import Relay

T = TypeVar("T")


class ThreadedRelay:
    """A relay on an event loop of its own thread, so blocking HTTP calls can reach it."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="threaded-relay")

    def __enter__(self) -> ThreadedRelay:
        self._thread.start()
        self.run(self.relay.start())
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coro`` on the relay's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __exit__(self, *_: object) -> None:
        try:
            self.run(self.relay.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

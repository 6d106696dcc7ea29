"""Polling helper for things that happen asynchronously (homeserver pushes, joins)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], *, within: float = 30.0, interval: float = 0.1
) -> T:
    """Await ``probe()`` until it returns something truthy; fail with the last value on timeout."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s (last value: {value!r})")
        await asyncio.sleep(interval)

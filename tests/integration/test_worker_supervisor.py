"""relay.app.workers' supervisor with stand-in worker processes (no relay, no homeserver).

Real child processes, so exits, signals and pipes are the kernel's; what the workers do
is a few lines of Python each.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

import pytest

from relay.app.workers import PublicWorkers
from relay.support.metrics import Metrics
from tests.harness.waiting import eventually

EXITS_AT_ONCE = [sys.executable, "-c", "raise SystemExit(7)"]
# Says it listens, then neither stops on SIGTERM nor answers anything on its stdin.
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
    "time.sleep(120)\n",
]


async def listening(caplog: pytest.LogCaptureFixture, count: int) -> bool:
    """``count`` workers said they listen (the supervisor logged their ready line)."""
    return sum("listening" in r.getMessage() for r in caplog.records) >= count


def every_worker(command: list[str]) -> Callable[[int], list[str]]:
    """The same command line for worker 1, 2, …"""
    return lambda number: command


def _restarts(metrics: Metrics) -> float:
    return metrics.value("relay_public_worker_restarts")


async def test_a_failing_worker_is_restarted_with_growing_delays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each exit is logged with its code and counted; stop() during a back-off is prompt."""
    caplog.set_level(logging.INFO, "relay.app.workers")
    metrics = Metrics()
    workers = PublicWorkers(every_worker(EXITS_AT_ONCE), 1, metrics)
    workers.start()
    try:

        async def restarted_twice() -> bool:
            return _restarts(metrics) >= 2

        await eventually(restarted_twice, within=20)
    finally:
        started = time.monotonic()
        await workers.stop()
    assert time.monotonic() - started < 1.0  # it was waiting out a 2 s back-off
    lines = [r.getMessage() for r in caplog.records if "exited" in r.getMessage()]
    assert lines[0].startswith("public worker 1 exited (exit code 7) after ")
    assert lines[0].endswith("restarting it in 0.5 s")
    assert lines[1].endswith("restarting it in 1.0 s")
    assert len(lines) == _restarts(metrics)
    assert workers.pids == {}


async def test_a_worker_that_ignores_sigterm_is_killed_after_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """stop(): SIGTERM, then SIGKILL at the deadline; nothing is left running or counted."""
    metrics = Metrics()
    caplog.set_level(logging.INFO, "relay.app.workers")
    workers = PublicWorkers(every_worker(STUBBORN), 2, metrics, stop_deadline=0.5)
    workers.start()
    await eventually(lambda: listening(caplog, 2), within=20)
    pids = sorted(workers.pids.values())
    assert len(pids) == 2
    started = time.monotonic()
    await workers.stop()
    assert 0.5 <= time.monotonic() - started < 5
    assert f"public workers {pids} still running 0.5 s after SIGTERM; killing them" in caplog.text
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert _restarts(metrics) == 0  # stopped on purpose: not a restart


async def test_a_worker_that_does_not_answer_is_left_out_of_a_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The scrape waits SCRAPE_TIMEOUT at most and returns what answered (here nothing)."""
    caplog.set_level(logging.INFO, "relay.app.workers")
    workers = PublicWorkers(every_worker(STUBBORN), 1, Metrics(), stop_deadline=0.5)
    workers.start()
    try:
        await eventually(lambda: listening(caplog, 1), within=20)
        started = time.monotonic()
        assert await workers.scrape() == []
        waited = time.monotonic() - started
        assert waited > 1.5, waited
        assert waited < 4, waited
    finally:
        await workers.stop()

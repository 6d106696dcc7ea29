"""Several processes on one public port (``public.workers``): the supervisor and its workers.

The first process, the *primary*, is the whole relay (internal listener, background
jobs, start-up checks) and serves the public port too. Once its own start-up has
succeeded it starts ``workers - 1`` *public workers*: the same program with a hidden
option, serving only the public listener (relay.app.process ``public_only``). Every
process binds the port with SO_REUSEPORT and the kernel spreads new connections over
them (relay.web.listener).

Each worker is tied to the primary by two pipes:

- its **stdin**: the primary never writes to it, so it closes only when the primary is
  gone, however it went (SIGKILL included). The worker stops on that end of file, so a
  worker never outlives its primary. The same works on every POSIX system, unlike
  Linux's ``PR_SET_PDEATHSIG``.
- its **stdout**: one line, :data:`READY`, once it listens, so the primary can log it.

The primary restarts a worker that exits (with back-off, logged, counted in
``relay_public_worker_restarts_total``), and on SIGTERM/SIGINT sends SIGTERM to every
worker and waits for them (then SIGKILL after a deadline). Its exit code is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence

from prometheus_client import Counter

from relay.support.metrics import Metrics

log = logging.getLogger(__name__)

READY = b"ready\n"
# Seconds before restarting a worker that exited, by how many times in a row it failed.
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# A worker that ran this long before exiting starts again from the first delay.
STEADY_SECONDS = 60.0
# After SIGTERM, seconds a worker has to finish its responses before SIGKILL.
STOP_DEADLINE = 20.0


def describe_exit(returncode: int) -> str:
    """``exit code 5`` or ``signal SIGKILL`` (asyncio reports a signal as ``-signum``)."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class PublicWorkers:
    """Keeps ``count`` public worker processes running ``command`` until :meth:`stop`."""

    def __init__(
        self,
        command: Sequence[str],
        count: int,
        metrics: Metrics,
        *,
        stop_deadline: float = STOP_DEADLINE,
    ) -> None:
        self._command = list(command)
        self._count = count
        self._stop_deadline = stop_deadline
        self._restarts = Counter(
            "relay_public_worker_restarts",
            "Public worker processes (public.workers) restarted after they exited",
            registry=metrics.registry,
        )
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    @property
    def pids(self) -> dict[int, int]:
        """Worker number (1…count) to the pid of its running process."""
        return {index: p.pid for index, p in self._processes.items()}

    def start(self) -> None:
        for index in range(1, self._count + 1):
            self._tasks.append(asyncio.create_task(self._keep(index)))

    async def _keep(self, index: int) -> None:
        """Run worker ``index``; while not stopping, start it again when it exits."""
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                returncode = await self._run_once(index)
            except OSError as e:  # cannot start a process at all (fork, exec)
                log.error("cannot start public worker %d: %s", index, e)
                returncode = None
            if self._stopping.is_set():
                return
            ran = time.monotonic() - started
            if ran >= STEADY_SECONDS:
                failures = 0
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
            failures += 1
            self._restarts.inc()
            log.warning(
                "public worker %d exited (%s) after %.1f s; restarting it in %.1f s",
                index,
                "not started" if returncode is None else describe_exit(returncode),
                ran,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _run_once(self, index: int) -> int:
        process = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._processes[index] = process
        try:
            if self._stopping.is_set():  # stop() ran while this one was being started
                _signal(process, signal.SIGTERM)
            assert process.stdout is not None
            if await process.stdout.readline() == READY:
                log.info("public worker %d (pid %d) listening", index, process.pid)
            await process.stdout.read()  # nothing more is expected; until it exits
            return await process.wait()
        finally:
            del self._processes[index]

    async def stop(self) -> None:
        """SIGTERM every worker, wait for all of them (SIGKILL after the deadline)."""
        self._stopping.set()
        for process in self._processes.values():
            _signal(process, signal.SIGTERM)
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=self._stop_deadline)
        if pending:
            log.warning(
                "public workers %s still running %.0f s after SIGTERM; killing them",
                sorted(self.pids.values()),
                self._stop_deadline,
            )
            for process in self._processes.values():
                _signal(process, signal.SIGKILL)
            await asyncio.wait(pending)
        self._tasks.clear()


def _signal(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # exited already
        process.send_signal(sig)


class _PrimaryPipe(asyncio.Protocol):
    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._stop.is_set():
            log.warning("the primary process is gone; this public worker stops")
            self._stop.set()


@contextlib.asynccontextmanager
async def supervised(stop: asyncio.Event) -> AsyncIterator[Callable[[], None]]:
    """In a public worker: set ``stop`` when the primary is gone; yields ``ready()``.

    Entered before start-up, so a primary that dies meanwhile stops the worker too.
    """
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: _PrimaryPipe(stop), sys.stdin)

    def ready() -> None:
        sys.stdout.buffer.write(READY)
        sys.stdout.buffer.flush()

    try:
        yield ready
    finally:
        stop.set()  # so that closing the pipe here is not taken for the primary's end
        transport.close()

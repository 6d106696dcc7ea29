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

The primary also asks each worker for its metrics over these pipes (``metrics`` on
stdin, ``metrics <length>`` and the exposition on stdout) when ``/metrics`` is
scraped, and serves them with its own, every series labelled ``process="primary"``
or ``process="worker-<n>"`` (:func:`merged_exposition`).

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
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from prometheus_client import Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from relay.support.metrics import Metrics

log = logging.getLogger(__name__)

READY = b"ready\n"
METRICS = b"metrics"
# The label that tells the processes' series apart on /metrics (public.workers > 1).
PROCESS_LABEL = "process"
# Seconds a scrape of /metrics waits for the workers' expositions.
SCRAPE_TIMEOUT = 2.0
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
    """Keeps ``count`` public worker processes running until :meth:`stop`.

    ``command(n)`` is the command line of worker ``n`` (1…count).
    """

    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        count: int,
        metrics: Metrics,
        *,
        stop_deadline: float = STOP_DEADLINE,
    ) -> None:
        self._command = command
        self._count = count
        self._stop_deadline = stop_deadline
        self._restarts = Counter(
            "relay_public_worker_restarts",
            "Public worker processes (public.workers) restarted after they exited",
            registry=metrics.registry,
        )
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._listening: set[int] = set()
        self._waiters: dict[int, asyncio.Future[bytes]] = {}
        self._scraping = asyncio.Lock()
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
            *self._command(index),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._processes[index] = process
        try:
            if self._stopping.is_set():  # stop() ran while this one was being started
                _signal(process, signal.SIGTERM)
            await self._read_messages(index, process)
            return await process.wait()
        finally:
            del self._processes[index]
            self._listening.discard(index)
            waiter = self._waiters.pop(index, None)
            if waiter is not None:
                waiter.cancel()

    async def _read_messages(self, index: int, process: asyncio.subprocess.Process) -> None:
        """What the worker writes on its stdout, until it closes it (exits)."""
        assert process.stdout is not None
        try:
            while line := await process.stdout.readline():
                if line == READY:
                    self._listening.add(index)
                    log.info("public worker %d (pid %d) listening", index, process.pid)
                elif line.startswith(METRICS + b" "):
                    body = await process.stdout.readexactly(int(line.split()[1]))
                    waiter = self._waiters.pop(index, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(body)
                else:
                    log.warning("public worker %d wrote %r; ignored", index, line[:80])
        except (asyncio.IncompleteReadError, ValueError):  # died mid-message, or garbage
            await process.stdout.read()

    async def scrape(self) -> list[tuple[str, bytes]]:
        """(``worker-<n>``, its exposition) of every listening worker that answers in time."""
        async with self._scraping:
            loop = asyncio.get_running_loop()
            asked: dict[int, asyncio.Future[bytes]] = {}
            for index, process in self._processes.items():
                stdin = process.stdin
                if index in self._listening and stdin is not None and not stdin.is_closing():
                    asked[index] = self._waiters[index] = loop.create_future()
                    stdin.write(METRICS + b"\n")
            if asked:
                await asyncio.wait(asked.values(), timeout=SCRAPE_TIMEOUT)
            for index in asked:
                self._waiters.pop(index, None)
            return [
                (f"worker-{index}", answer.result())
                for index, answer in sorted(asked.items())
                if answer.done() and not answer.cancelled()
            ]

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
                "public workers %s still running %g s after SIGTERM; killing them",
                sorted(self.pids.values()),
                self._stop_deadline,
            )
            for process in self._processes.values():
                _signal(process, signal.SIGKILL)
            await asyncio.wait(pending)
        self._tasks.clear()


class _Labelled(logging.Filter):
    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_relay_labelled", False):  # once, whatever the handlers
            record.msg = f"{self.label}{record.msg}"
            record._relay_labelled = True
        return True


def label_logs(label: str) -> None:
    """Start every log line of this process with ``label`` (a worker shares the primary's
    stderr, so its lines must say whose they are)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Labelled(label))


def _signal(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # exited already
        process.send_signal(sig)


class _Families:
    """What ``generate_latest`` needs of a registry: the families to write."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merged_exposition(expositions: Sequence[tuple[str, bytes]]) -> bytes:
    """Several processes' expositions as one, each series labelled ``process=<name>``.

    Families of one name are merged (a name may have one HELP and TYPE line only).
    """
    families: dict[str, Metric] = {}
    for name, text in expositions:
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples += [
                sample._replace(labels={**sample.labels, PROCESS_LABEL: name})
                for sample in family.samples
            ]
    return generate_latest(_Families(families.values()))


class _PrimaryPipe(asyncio.Protocol):
    """The worker's stdin: the primary's requests, one a line; its end is the primary's."""

    def __init__(self, stop: asyncio.Event, answer: Callable[[bytes], None]) -> None:
        self._stop = stop
        self._answer = answer
        self._pending = b""

    def data_received(self, data: bytes) -> None:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            self._answer(line)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._stop.is_set():
            log.warning("the primary process is gone; this public worker stops")
            self._stop.set()


@contextlib.asynccontextmanager
async def supervised(
    stop: asyncio.Event, render_metrics: Callable[[], bytes]
) -> AsyncIterator[Callable[[], None]]:
    """In a public worker: set ``stop`` when the primary is gone; yields ``ready()``.

    Entered before start-up, so a primary that dies meanwhile stops the worker too.
    ``render_metrics`` answers the primary's ``metrics`` requests.
    """
    loop = asyncio.get_running_loop()
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout)

    def answer(line: bytes) -> None:
        if line == METRICS and not out.is_closing():
            body = render_metrics()
            out.write(b"%s %d\n%s" % (METRICS, len(body), body))

    requests, _ = await loop.connect_read_pipe(lambda: _PrimaryPipe(stop, answer), sys.stdin)

    def ready() -> None:
        out.write(READY)

    try:
        yield ready
    finally:
        stop.set()  # so that closing the pipe here is not taken for the primary's end
        requests.close()
        out.close()

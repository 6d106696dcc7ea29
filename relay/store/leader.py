"""One leader per cluster: the process that runs the cluster-wide jobs.

Some work must run once per database, not once per process: the audit retention
sweep, cache eviction of a shared tier, and whatever periodic sweep is added later.
Every relay process on a database runs a :class:`Leadership`; the one that holds the
lock is the leader and runs the registered jobs (:meth:`Leadership.add_job`); the
others try again every :data:`RETRY_INTERVAL` seconds.

- PostgreSQL: ``pg_try_advisory_lock`` on a dedicated connection (not the pool's, so
  the lock lives exactly as long as that one session). When the connection drops (the
  process crashes, ``pg_terminate_backend``, a restart of the server) PostgreSQL frees
  the lock and the next try elsewhere takes it. The leader stops its jobs as soon as it
  hears its connection end, and asks every :data:`CHECK_INTERVAL` whether its session
  still holds the lock (a silent network failure sends no termination).
- SQLite (one machine): ``flock`` on a file beside the database (``relay.db.leader``),
  freed by the kernel when the holder dies.

Two leaders can overlap only briefly (a partitioned leader notices within
:data:`CHECK_INTERVAL`), so every job must be safe to run twice at once: the sweeps are
idempotent deletes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

import asyncpg
from mautrix.util.async_db import Database, Scheme

from relay.support.file_lock import FileLock

log = logging.getLogger(__name__)

# Arbitrary, fixed: the relay's advisory lock for leadership ("relayldr").
LEADER_LOCK = 0x72656C61796C6472
# pg_stat_activity shows the lock's connection under this name.
APPLICATION_NAME = "media-relay leader"
RETRY_INTERVAL = 3.0  # a follower tries to take the lock this often
CHECK_INTERVAL = 3.0  # the leader makes sure it still holds it this often
# PostgreSQL ends the leader's session after this long without a check (14+), so a
# leader cut off silently frees the lock long before TCP keepalives would notice.
SESSION_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
RELEASE_TIMEOUT = 1.0
LEADER_SUFFIX = ".leader"

Job = Callable[[], Coroutine[Any, Any, None]]


class Claim(Protocol):
    """A lock only one process holds at a time."""

    async def try_take(self) -> bool:
        """Take the lock if it is free; False when another holds it."""

    async def lost(self) -> None:
        """Return when the lock is no longer held (or may not be)."""

    async def release(self) -> None:
        """Give the lock up (nothing when not held)."""


class AdvisoryLock:
    """PostgreSQL: a session advisory lock held by one dedicated connection."""

    def __init__(
        self,
        dsn: str,
        *,
        check_interval: float = CHECK_INTERVAL,
        check_timeout: float = CONNECT_TIMEOUT,
        session_timeout: float = SESSION_TIMEOUT,
    ) -> None:
        if session_timeout <= check_interval + check_timeout:
            # Else PostgreSQL could free the lock before the old leader has stopped.
            raise ValueError("session_timeout must exceed check_interval + check_timeout")
        self._dsn = dsn
        self._check_interval = check_interval
        self._check_timeout = check_timeout
        self._session_timeout = session_timeout
        self._conn: asyncpg.Connection | None = None
        self._gone = asyncio.Event()

    async def try_take(self) -> bool:
        await self.release()
        conn = await asyncpg.connect(
            self._dsn,
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": APPLICATION_NAME},
        )
        try:
            taken = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", LEADER_LOCK, timeout=CONNECT_TIMEOUT
            )
            if taken and conn.get_server_version().major >= 14:
                await conn.execute(
                    "SELECT set_config('idle_session_timeout', $1, false)",
                    str(round(self._session_timeout * 1000)),
                    timeout=CONNECT_TIMEOUT,
                )
        except BaseException:
            conn.terminate()  # and with it the lock, if it was taken
            raise
        if not taken:
            await conn.close(timeout=CONNECT_TIMEOUT)
            return False
        self._gone = gone = asyncio.Event()
        conn.add_termination_listener(lambda _conn: gone.set())
        self._conn = conn
        return True

    async def lost(self) -> None:
        conn = self._conn
        if conn is None:
            return
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gone.wait(), self._check_interval)
            if self._gone.is_set() or not await self._holds(conn):
                return

    async def _holds(self, conn: asyncpg.Connection) -> bool:
        """Whether this session still holds the lock (any failure: it may not)."""
        # A bigint key shows in pg_locks as classid (high half), objid (low half), objsubid 1.
        try:
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid() AND granted"
                " AND classid = $1 AND objid = $2 AND objsubid = 1",
                LEADER_LOCK >> 32,
                LEADER_LOCK & 0xFFFFFFFF,
                timeout=self._check_timeout,
            )
        except Exception as e:
            log.warning("leader: lock connection failed its check: %s: %s", type(e).__name__, e)
            return False
        return bool(held)

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        if self._gone.is_set():
            conn.terminate()
            return
        # Ending the session frees its advisory locks. Politely (no "unexpected EOF" in
        # the server's log), but a connection that went silent is cut at once.
        try:
            await conn.close(timeout=RELEASE_TIMEOUT)
        except Exception:
            conn.terminate()


class FileClaim:
    """SQLite: ``flock`` on a file beside the database; the kernel frees it on exit."""

    def __init__(self, path: Path, *, check_interval: float = CHECK_INTERVAL) -> None:
        self.path = path
        self._check_interval = check_interval
        self._lock: FileLock | None = None

    async def try_take(self) -> bool:
        await self.release()
        self._lock = FileLock.try_acquire(self.path)
        return self._lock is not None

    async def lost(self) -> None:
        # Nothing announces a deleted or replaced lock file: look now and then.
        while self._lock is not None and self._same_file(self._lock.fd):  # noqa: ASYNC110
            await asyncio.sleep(self._check_interval)

    def _same_file(self, fd: int) -> bool:
        """The file we lock is still the one at the path (deleted or replaced: another
        process would lock a different file and lead as well)."""
        try:
            here, there = os.fstat(fd), os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    async def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()  # the file stays: removing it would race the next holder


class Solo:
    """An in-memory SQLite database is this process's alone: always the leader."""

    async def try_take(self) -> bool:
        return True

    async def lost(self) -> None:
        await asyncio.Event().wait()

    async def release(self) -> None:
        """Nothing to give up."""


class Leadership:
    """Runs the registered jobs while this process holds the claim; stops them at once
    when it is lost, and keeps trying to take it otherwise."""

    def __init__(
        self,
        claim: Claim,
        *,
        retry_interval: float = RETRY_INTERVAL,
        on_change: Callable[[bool], object] | None = None,
    ) -> None:
        self.claim = claim
        self._retry_interval = retry_interval
        self._on_change = on_change
        self._jobs: dict[str, Job] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self.leading = False

    def add_job(self, name: str, job: Job) -> None:
        """Run ``job()`` whenever this process leads (started at once if it leads now).

        A job runs until cancelled; if it returns or fails, it is started again at
        the next change of leader, not before.
        """
        if name in self._jobs:
            raise ValueError(f"leader job {name!r} registered twice")
        self._jobs[name] = job
        if self.leading:
            self._start_job(name, job)

    async def run(self) -> None:
        """Follow or lead until cancelled; the claim is released on the way out."""
        failing = False
        try:
            while True:
                try:
                    if await self.claim.try_take():
                        await self._lead()
                    failing = False
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    # Once per outage, not every few seconds while the database is down.
                    if not failing:
                        log.warning("leader: cannot take the lock: %s: %s", type(e).__name__, e)
                    failing = True
                await asyncio.sleep(self._retry_interval)
        finally:
            await self._stop_jobs()
            await self.claim.release()

    async def _lead(self) -> None:
        log.info("leader: this process runs the cluster-wide jobs (%s)", ", ".join(self._jobs))
        self._set(True)
        for name, job in self._jobs.items():
            self._start_job(name, job)
        try:
            await self.claim.lost()
        finally:
            await self._stop_jobs()
        log.warning("leader: lost the lock; stopped the cluster-wide jobs")
        await self.claim.release()

    def _start_job(self, name: str, job: Job) -> None:
        task = asyncio.create_task(job(), name=f"leader job {name}")
        task.add_done_callback(_log_end)
        self._running[name] = task

    async def _stop_jobs(self) -> None:
        tasks, self._running = list(self._running.values()), {}
        if self.leading:
            self._set(False)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _set(self, leading: bool) -> None:
        self.leading = leading
        if self._on_change is not None:
            self._on_change(leading)


def _log_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (e := task.exception()) is not None:
        log.error("%s failed", task.get_name(), exc_info=e)


def leadership(db: Database, **kwargs: Any) -> Leadership:
    """The leadership for this database: an advisory lock on PostgreSQL, a file lock on
    SQLite (``<database file>.leader``), always leading on an in-memory database."""
    claim: Claim
    if db.scheme == Scheme.POSTGRES:
        claim = AdvisoryLock(str(db.url))
    else:
        path = db.url.path
        if path in ("", ":memory:") or path.startswith("file:"):
            claim = Solo()
        else:
            claim = FileClaim(Path(path + LEADER_SUFFIX))
    return Leadership(claim, **kwargs)

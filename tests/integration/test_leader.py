"""One leader per database for the cluster-wide jobs (relay.store.leader).

PostgreSQL: each "process" is its own Leadership with its own lock connection, as two
relay processes have. SQLite: the other process is a real one (a subprocess), since an
flock is the kernel's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from relay.app import Relay
from relay.devtools.local_synapse import LocalSynapse
from relay.store.leader import (
    APPLICATION_NAME,
    LEADER_LOCK,
    LEADER_SUFFIX,
    RETRY_INTERVAL,
    AdvisoryLock,
    Claim,
    FileClaim,
    Leadership,
    Solo,
)
from tests.harness.fixtures import RelayRegistration
from tests.harness.relay import MakeConfig, StartRelay, second_relay
from tests.harness.waiting import eventually

RETRY = 0.3
CHECK = 0.2
# Time for a busy 2-core machine on top of the interval that bounds a takeover.
SLACK = 1.5


class Counted:
    """A claim that counts its tries, so a test can wait for a follower to have tried."""

    def __init__(self, claim: Claim) -> None:
        self.claim = claim
        self.tries = 0

    async def try_take(self) -> bool:
        self.tries += 1
        return await self.claim.try_take()

    async def lost(self) -> None:
        await self.claim.lost()

    async def release(self) -> None:
        await self.claim.release()


@dataclass
class Member:
    """One process's leadership, its one job, and what happened to that job."""

    claim: Counted
    leadership: Leadership = field(init=False)
    starts: int = 0
    cancels: int = 0
    changes: list[bool] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.leadership = Leadership(
            self.claim, retry_interval=RETRY, on_change=self.changes.append
        )
        self.leadership.add_job("sweep", self._job)

    async def _job(self) -> None:
        self.starts += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancels += 1
            raise

    @property
    def job_running(self) -> bool:
        return self.starts > self.cancels

    def start(self) -> None:
        self.task = asyncio.create_task(self.leadership.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def tried(self, times: int) -> None:
        """Wait until this member has tried the lock ``times`` more times."""
        target = self.claim.tries + times

        async def enough() -> bool:
            return self.claim.tries >= target

        await eventually(enough, within=times * RETRY + 10, interval=0.02)


async def leader_of(members: list[Member]) -> Member:
    async def one() -> Member | None:
        leading = [m for m in members if m.leadership.leading]
        return leading[0] if len(leading) == 1 else None

    leader = await eventually(one, within=10, interval=0.01)
    assert leader is not None
    return leader


def assert_exactly_one_leads(members: list[Member]) -> Member:
    leading = [m for m in members if m.leadership.leading]
    running = [m for m in members if m.job_running]
    assert len(leading) == 1 and running == leading, [
        (m.leadership.leading, m.starts, m.cancels) for m in members
    ]
    return leading[0]


@pytest.fixture
async def pg_members(postgres_url: str) -> AsyncIterator[list[Member]]:
    members = [Member(Counted(AdvisoryLock(postgres_url, check_interval=CHECK))) for _ in "ab"]
    for m in members:
        m.start()
    yield members
    for m in members:
        await m.stop()


async def lock_holders(url: str) -> list[tuple[int, str]]:
    """(pid, application_name) of every session holding the leader lock on this database."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT l.pid, a.application_name FROM pg_locks l"
            " JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted"
            # pg_locks is the whole server's: other tests' databases hold this key too.
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 1",
            LEADER_LOCK >> 32,
            LEADER_LOCK & 0xFFFFFFFF,
        )
    finally:
        await conn.close()
    return [(int(r["pid"]), str(r["application_name"])) for r in rows]


async def test_postgres_exactly_one_of_two_leads(
    postgres_url: str, pg_members: list[Member]
) -> None:
    """Two processes on one database: one leads and runs the job; the other keeps trying."""
    leader = await leader_of(pg_members)
    (follower,) = [m for m in pg_members if m is not leader]
    await follower.tried(4)
    assert assert_exactly_one_leads(pg_members) is leader
    assert (leader.starts, leader.cancels, leader.changes) == (1, 0, [True])
    assert follower.starts == 0 and True not in follower.changes
    assert [name for _, name in await lock_holders(postgres_url)] == [APPLICATION_NAME]


async def test_postgres_terminated_leader_is_replaced(
    postgres_url: str, pg_members: list[Member]
) -> None:
    """pg_terminate_backend of the leader's lock connection: its job is cancelled at once
    and the other process leads within the retry interval."""
    leader = await leader_of(pg_members)
    (follower,) = [m for m in pg_members if m is not leader]
    (holder,) = await lock_holders(postgres_url)
    admin = await asyncpg.connect(postgres_url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", holder[0])
    finally:
        await admin.close()
    terminated = time.monotonic()

    async def old_stopped() -> bool:
        return not leader.job_running and not leader.leadership.leading

    await eventually(old_stopped, within=CHECK + SLACK, interval=0.005)
    assert leader.cancels == 1
    assert await leader_of(pg_members) is follower
    assert time.monotonic() - terminated < RETRY + SLACK
    # The old leader tries again, finds the lock taken, and stays a follower.
    await leader.tried(3)
    assert assert_exactly_one_leads(pg_members) is follower
    assert leader.changes == [True, False] and follower.changes[-1] is True
    assert [pid for pid, _ in await lock_holders(postgres_url)] not in ([], [holder[0]])


async def test_postgres_stopped_leader_releases_at_once(
    postgres_url: str, pg_members: list[Member]
) -> None:
    """A leader shut down cleanly cancels its job and frees the lock for the next try."""
    leader = await leader_of(pg_members)
    (follower,) = [m for m in pg_members if m is not leader]
    await leader.stop()
    assert (leader.starts, leader.cancels, leader.changes[-1]) == (1, 1, False)
    assert await leader_of([follower]) is follower


async def test_postgres_unreachable_is_retried(postgres_url: str) -> None:
    """No server to connect to: no leader, no crash, and it keeps trying."""
    member = Member(Counted(AdvisoryLock("postgres://postgres@127.0.0.1:1/none")))
    member.start()
    try:
        await member.tried(3)
        assert not member.leadership.leading and member.starts == 0
        assert member.task is not None and not member.task.done()
    finally:
        await member.stop()


class FreezingProxy:
    """TCP between a client and PostgreSQL that can stop carrying bytes without closing
    anything: a network that fails silently (no FIN, no RST, nothing reported)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.flowing.set()  # the pipes finish
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        await self.flowing.wait()  # frozen: an end is not passed on either
        writer.transport.abort()


async def test_postgres_silent_network_failure_stops_the_leader(postgres_url: str) -> None:
    """The lock connection stops answering without closing: the leader's check times out
    and it stops its job; PostgreSQL ends the silent session (idle_session_timeout), and
    only then does the other process lead: the two never overlap."""
    host, _, rest = postgres_url.partition("@")[2].partition(":")
    port, _, _ = rest.partition("/")
    proxy = FreezingProxy(int(port))
    proxied = postgres_url.replace(f"@{host}:{port}/", f"@127.0.0.1:{await proxy.start()}/")
    lock = AdvisoryLock(proxied, check_interval=CHECK, check_timeout=0.5, session_timeout=2.5)
    member = Member(Counted(lock))
    other = Member(Counted(AdvisoryLock(postgres_url, check_interval=CHECK)))
    member.start()
    try:
        await leader_of([member])
        other.start()
        await other.tried(1)
        proxy.flowing.clear()
        frozen = time.monotonic()

        async def stopped() -> float | None:
            return time.monotonic() if member.cancels and not member.leadership.leading else None

        stopped_at = await eventually(stopped, within=CHECK + 0.5 + SLACK, interval=0.005)
        assert stopped_at is not None and stopped_at - frozen < CHECK + 0.5 + SLACK
        assert member.cancels == 1 and other.starts == 0
        # The frozen proxy passes nothing on, not even the close: PostgreSQL holds the
        # session until its idle timeout, and the lock with it.
        assert await leader_of([other]) is other
        assert time.monotonic() - frozen > 2.5 - CHECK
        proxy.flowing.set()  # the network is back: the old leader tries and follows
        await member.tried(2)
        assert assert_exactly_one_leads([member, other]) is other
    finally:
        await member.stop()
        await other.stop()
        await proxy.close()


CHILD = """
import asyncio, sys
from relay.store import open_database
from relay.store.leader import leadership

async def main() -> None:
    db = await open_database(sys.argv[1])
    async def job() -> None:
        print("job", flush=True)
        await asyncio.Event().wait()
    def changed(leading: bool) -> None:
        print("leading" if leading else "following", flush=True)
    lead = leadership(db, retry_interval=float(sys.argv[2]), on_change=changed)
    lead.add_job("sweep", job)
    print("started", flush=True)
    await lead.run()

asyncio.run(main())
"""


async def child(url: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, url, str(RETRY), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"started\n"
    return proc


async def next_line(proc: asyncio.subprocess.Process, within: float) -> bytes:
    assert proc.stdout is not None
    return await asyncio.wait_for(proc.stdout.readline(), within)


async def test_sqlite_file_lock_across_processes(tmp_path: Path) -> None:
    """SQLite: two OS processes on one database file; one leads; killed, the other takes over."""
    url = f"sqlite:{tmp_path / 'relay.db'}"
    first = await child(url)
    second: asyncio.subprocess.Process | None = None
    try:
        assert await next_line(first, 10) == b"leading\n"
        assert await next_line(first, 10) == b"job\n"
        second = await child(url)
        # The follower tries for several intervals and never leads.
        with pytest.raises(TimeoutError):
            await next_line(second, RETRY * 4)
        assert os.stat(tmp_path / ("relay.db" + LEADER_SUFFIX)).st_mode & 0o777 == 0o600
        first.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert await next_line(second, RETRY + SLACK) == b"leading\n"
        assert await next_line(second, SLACK) == b"job\n"
        assert time.monotonic() - killed < RETRY + SLACK
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_sqlite_replaced_lock_file_stops_the_leader(tmp_path: Path) -> None:
    """The lock file deleted under a leader: it stops, as the next process locks a new file."""
    path = tmp_path / "relay.db.leader"
    first = Member(Counted(FileClaim(path, check_interval=CHECK)))
    first.start()
    members = [first]
    try:
        await leader_of([first])
        os.unlink(path)
        second = Member(Counted(FileClaim(path, check_interval=CHECK)))
        members.append(second)
        second.start()

        async def first_stopped() -> bool:
            return first.cancels == 1

        await eventually(first_stopped, within=CHECK + SLACK, interval=0.01)
        # Either may lock the new file; the other then keeps trying and never leads.
        leader = await leader_of(members)
        await next(m for m in members if m is not leader).tried(3)
        assert assert_exactly_one_leads(members) is leader
    finally:
        for m in members:
            await m.stop()


async def test_jobs_added_while_leading_start_at_once() -> None:
    """add_job on a leader starts the job now; a name registered twice is refused."""
    member = Member(Counted(Solo()))
    member.start()
    try:
        await leader_of([member])
        started = asyncio.Event()

        async def late() -> None:
            started.set()
            await asyncio.Event().wait()

        member.leadership.add_job("late", late)
        await asyncio.wait_for(started.wait(), 1)
        with pytest.raises(ValueError, match="'late' registered twice"):
            member.leadership.add_job("late", late)
    finally:
        await member.stop()
    assert member.changes == [True, False] and member.cancels == 1


async def leader_gauge(http: aiohttp.ClientSession, relay: Relay) -> float:
    """relay_cluster_leader as this relay's /metrics shows it."""
    async with http.get(f"{relay.internal_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    # With public.workers the series is labelled by process; only the primary leads.
    lines = [
        x
        for x in text.splitlines()
        if x.startswith(("relay_cluster_leader ", "relay_cluster_leader{"))
    ]
    assert lines, text
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines)


@pytest.mark.synapse
async def test_two_relays_one_leader_gauge(
    synapse: LocalSynapse,
    relay_registration: RelayRegistration,
    postgres_url: str,
    make_config: MakeConfig,
    start_relay: StartRelay,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Two relays on one PostgreSQL: exactly one shows relay_cluster_leader 1; its lock
    connection terminated, the other shows 1 and it shows 0."""
    first = await start_relay(make_config(postgres_url))
    second = await second_relay(synapse, relay_registration, postgres_url, start_relay, tmp_path)
    relays = [first, second]

    async def gauges() -> list[float] | None:
        got = [await leader_gauge(http_session, r) for r in relays]
        return got if sorted(got) == [0.0, 1.0] else None

    before = await eventually(gauges, within=RETRY_INTERVAL + 10)
    assert before is not None
    (holder,) = await lock_holders(postgres_url)
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", holder[0])
    finally:
        await admin.close()

    async def swapped() -> list[float] | None:
        got = await gauges()
        return got if got == before[::-1] else None

    await eventually(swapped, within=RETRY_INTERVAL + 10)

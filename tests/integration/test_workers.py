"""``public.workers``: several processes on one public port, supervised by the primary.

The cluster runs as the operator runs it (``python -m relay -c …`` in a subprocess);
an in-process relay on the same PostgreSQL ingests the media and signs the links.
Which process accepted a connection is read from /proc (the server side of the
socket is an fd of exactly one of them), so a request can be sent to a chosen one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from relay.core.exit_codes import EXIT_CONFIG, EXIT_DATABASE, EXIT_OK
from relay.devtools.local_synapse import LocalSynapse, free_ports
from tests.harness import make_png
from tests.harness.fixtures import RelayPorts, RelayRegistration
from tests.harness.links import errcode, post_and_sign, run_cli
from tests.harness.matrix_client import MatrixUser
from tests.harness.relay import MakeConfig, StartRelay, relay_config_dict, write_config
from tests.harness.waiting import eventually

pytestmark = [pytest.mark.synapse, pytest.mark.skipif(sys.platform != "linux", reason="/proc")]

WORKER_LISTENING = re.compile(r"public worker (\d+) \(pid (\d+)\) listening")


@dataclass
class Cluster:
    """A relay started from the command line with its public workers."""

    process: asyncio.subprocess.Process
    log_path: Path
    config_path: Path
    public_port: int
    internal_port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[tuple[int, int]]:
        """(worker number, pid) of every "listening" line so far, in order."""
        return [(int(n), int(pid)) for n, pid in WORKER_LISTENING.findall(self.log())]

    def link(self, url: str, public_port: int) -> str:
        return url.replace(f"127.0.0.1:{public_port}", f"127.0.0.1:{self.public_port}")


def _write_cluster_config(
    synapse: LocalSynapse,
    registration: RelayRegistration,
    database: str,
    workdir: Path,
    ports: RelayPorts,
    workers: int,
) -> Path:
    workdir.mkdir(exist_ok=True)
    data = relay_config_dict(synapse, registration, ports, workdir, database)
    data["public"]["workers"] = workers
    data["logging"] = {"level": "INFO"}
    return write_config(workdir / "config.yaml", data)


async def start_cluster(
    synapse: LocalSynapse,
    registration: RelayRegistration,
    database: str,
    workdir: Path,
    *,
    workers: int,
    public_port: int | None = None,
) -> Cluster:
    """``media-relay -c config.yaml`` with ``public.workers: workers``, started (not yet up)."""
    internal, public = free_ports(2)
    ports = RelayPorts(internal, public_port or public)
    config_path = _write_cluster_config(synapse, registration, database, workdir, ports, workers)
    log_path = workdir / "relay.log"
    with open(log_path, "wb") as log_file:  # noqa: ASYNC230 - a moment, before the process runs
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "-c", str(config_path), stderr=log_file
        )
    return Cluster(process, log_path, config_path, ports.public, internal)


async def running(cluster: Cluster, workers: int) -> None:
    """Wait until the primary says it runs and ``workers`` worker lines were logged."""

    async def up() -> bool:
        if cluster.process.returncode is not None:
            raise AssertionError(f"relay exited {cluster.process.returncode}:\n{cluster.log()}")
        return "running; SIGTERM" in cluster.log() and len(cluster.workers()) >= workers

    await eventually(up, within=60)


async def stop(cluster: Cluster, sig: signal.Signals = signal.SIGTERM) -> int:
    if cluster.process.returncode is None:
        cluster.process.send_signal(sig)
        try:
            await asyncio.wait_for(cluster.process.wait(), 40)
        except TimeoutError:
            cluster.process.kill()
            await cluster.process.wait()
    assert cluster.process.returncode is not None
    return cluster.process.returncode


@pytest.fixture(params=["postgres"])
def cluster_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """PostgreSQL (recommended with workers), or SQLite (WAL) where a test asks for both."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'relay.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


BOTH_DATABASES = pytest.mark.parametrize("cluster_database", ["sqlite", "postgres"], indirect=True)


@pytest_asyncio.fixture
async def cluster(
    synapse: LocalSynapse,
    relay_registration: RelayRegistration,
    cluster_database: str,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    """Two processes (the primary and one public worker) on a fresh database."""
    cluster = await start_cluster(
        synapse, relay_registration, cluster_database, tmp_path / "cluster", workers=2
    )
    try:
        await running(cluster, 1)
        yield cluster
    finally:
        for _, pid in cluster.workers():
            # Never leave a worker behind, even when the test failed half-way.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await stop(cluster)


# ------------------------------------------------------------------ /proc


def _server_inode(port: int, client_port: int) -> int | None:
    """The inode of the accepted (server-side) socket of the connection from ``client_port``."""
    local, remote = f"0100007F:{port:04X}", f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote and fields[3] == "01":  # ESTABLISHED
            return int(fields[9])
    return None


def _owner(inode: int, pids: list[int]) -> int | None:
    """Which of ``pids`` has the socket ``inode`` open (accepted it)."""
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    return None


@dataclass
class Connection:
    """One keep-alive HTTP/1.1 connection to the public port, and the pid that accepted it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pid: int

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        assert length is not None, head
        return status, await asyncio.wait_for(self.reader.readexactly(int(length[1])), 10)

    def close(self) -> None:
        self.writer.close()


async def connect(port: int, pids: list[int]) -> Connection:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client_port = writer.get_extra_info("sockname")[1]

    async def owner() -> int | None:
        inode = _server_inode(port, client_port)
        return None if inode is None else _owner(inode, pids)

    return Connection(reader, writer, await eventually(owner, within=5, interval=0.01))


async def one_to_each(port: int, pids: list[int], *, attempts: int = 64) -> list[Connection]:
    """Connections until every pid accepted one (the kernel picks); one per pid returned."""
    chosen: dict[int, Connection] = {}
    spare: list[Connection] = []
    for _ in range(attempts):
        conn = await connect(port, pids)
        if conn.pid in chosen:
            spare.append(conn)
        else:
            chosen[conn.pid] = conn
        if len(chosen) == len(pids):
            break
    for conn in spare:
        conn.close()
    assert sorted(chosen) == sorted(pids), f"only {sorted(chosen)} of {pids} accepted"
    return list(chosen.values())


@contextlib.asynccontextmanager
async def connected_to_each(port: int, pids: list[int]) -> AsyncIterator[list[Connection]]:
    """``one_to_each``, every connection closed on the way out (even from a failed check)."""
    conns = await one_to_each(port, pids)
    try:
        yield conns
    finally:
        for conn in conns:
            conn.close()


async def scraped(
    session: aiohttp.ClientSession, cluster: Cluster, sample: str
) -> dict[tuple[tuple[str, str], ...], float]:
    """The values of one sample on the primary's /metrics, by their sorted labels."""
    async with session.get(f"http://127.0.0.1:{cluster.internal_port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
    }


def gone(pid: int) -> bool:
    """No such process, or only a zombie left (it exited; its reaper has not run yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


# ------------------------------------------------------------------ tests


class PostedLink(NamedTuple):
    """The path of a signed link (the same on any public port), its bytes, its mxc."""

    path: str
    data: bytes
    mxc: str


@pytest_asyncio.fixture
async def posted_link(
    start_relay: StartRelay,
    make_config: MakeConfig,
    cluster_database: str,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
) -> PostedLink:
    """An image ingested, and its link signed, by an in-process relay on the cluster's database."""
    relay = await start_relay(make_config(database=cluster_database))
    data = make_png(32, 32, (secrets.randbelow(256), 9, 9))
    _, mxc, _, url = await post_and_sign(http_session, relay, alice, data, "image/png", "w.png")
    return PostedLink("/" + url.split("/", 3)[3], data, mxc)


@BOTH_DATABASES
async def test_two_processes_answer_on_one_port(
    cluster: Cluster, posted_link: PostedLink, http_session: aiohttp.ClientSession
) -> None:
    """workers: 2 is two processes accepting on one port; each serves the signed link."""
    path, data, _ = posted_link
    [(number, worker)] = cluster.workers()
    assert number == 1 and worker != cluster.process.pid
    pids = [cluster.process.pid, worker]
    async with connected_to_each(cluster.public_port, pids) as conns:
        for conn in conns:
            for _ in range(3):  # keep-alive: the same process answers each time
                assert await conn.get(path) == (200, data)
    # /metrics (the primary's) has each process's own count of what it served.
    served = await scraped(http_session, cluster, "relay_served_requests_total")
    assert served == {
        (("process", "primary"), ("status", "200")): 3.0,
        (("process", "worker-1"), ("status", "200")): 3.0,
    }
    # The worker has no internal listener: only the primary's port answers there.
    log = cluster.log()
    assert log.count("internal listener (homeserver and bridges) on") == 1
    listening = f"public listener (signed media links) on http://127.0.0.1:{cluster.public_port}"
    # The worker's lines say whose they are (both processes write to one stderr).
    assert f"public worker 1: {listening}\n" in log


async def test_a_killed_worker_is_restarted(
    cluster: Cluster, posted_link: PostedLink, http_session: aiohttp.ClientSession
) -> None:
    """SIGKILL of a worker: logged, counted, a new worker listens; the port keeps answering."""
    path, data, _ = posted_link
    [(_, first)] = cluster.workers()
    os.kill(first, signal.SIGKILL)

    async def restarted() -> bool:
        return len(cluster.workers()) == 2

    await eventually(restarted, within=30)
    [_, (number, second)] = cluster.workers()
    assert number == 1 and second != first and gone(first)
    assert "public worker 1 exited (signal SIGKILL)" in cluster.log()
    restarts = await scraped(http_session, cluster, "relay_public_worker_restarts_total")
    assert restarts == {(("process", "primary"),): 1.0}
    async with connected_to_each(cluster.public_port, [cluster.process.pid, second]) as conns:
        for conn in conns:
            assert await conn.get(path) == (200, data)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_every_process(cluster: Cluster, sig: signal.Signals) -> None:
    """SIGTERM or SIGINT to the primary alone stops its workers; exit 0, nothing left behind."""
    [(_, worker)] = cluster.workers()
    assert await stop(cluster, sig) == EXIT_OK
    assert gone(worker)
    assert "exited" not in cluster.log()  # a worker stopped on purpose is not "restarted"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", cluster.public_port)) != 0


async def test_a_worker_never_outlives_a_killed_primary(cluster: Cluster) -> None:
    """SIGKILL of the primary (no chance to clean up): the worker sees its pipe close, stops."""
    [(_, worker)] = cluster.workers()
    cluster.process.kill()
    await cluster.process.wait()

    async def worker_gone() -> bool:
        return gone(worker)

    await eventually(worker_gone, within=30)
    assert "the primary process is gone; this public worker stops" in cluster.log()


async def test_a_failed_primary_start_up_starts_no_worker(
    synapse: LocalSynapse,
    relay_registration: RelayRegistration,
    tmp_path: Path,
) -> None:
    """workers: 3 and no database: exit 5 once, as with one process, and no worker ran."""
    failed = await start_cluster(
        synapse,
        relay_registration,
        "postgresql://postgres@127.0.0.1:1/none",
        tmp_path / "failed",
        workers=3,
    )
    assert await asyncio.wait_for(failed.process.wait(), 60) == EXIT_DATABASE
    log = failed.log()
    assert log.count("media-relay: error: ") == 1, log
    assert "public worker" not in log


async def test_one_worker_still_refuses_a_busy_port(
    synapse: LocalSynapse,
    relay_registration: RelayRegistration,
    tmp_path: Path,
) -> None:
    """workers: 1 does not set SO_REUSEPORT: a port held even with SO_REUSEPORT is exit 3."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = await start_cluster(
            synapse,
            relay_registration,
            f"sqlite:{tmp_path / 'relay.db'}",
            tmp_path / "second",
            workers=1,
            public_port=port,
        )
        assert await asyncio.wait_for(busy.process.wait(), 60) == EXIT_CONFIG
    assert f"media-relay: error: cannot listen on 127.0.0.1:{port}" in busy.log()


@BOTH_DATABASES
async def test_revoke_is_honoured_by_every_process(
    cluster: Cluster, posted_link: PostedLink, http_session: aiohttp.ClientSession
) -> None:
    """``media-relay revoke``: within 1 s both processes answer 410 on connections they hold."""
    path, data, mxc = posted_link
    [(_, worker)] = cluster.workers()
    async with connected_to_each(cluster.public_port, [cluster.process.pid, worker]) as conns:
        for conn in conns:
            assert await conn.get(path) == (200, data)  # cached and remembered in each
        code, out, err = await run_cli(cluster.config_path, "revoke", mxc)
        assert (code, out) == (EXIT_OK, f"revoked {mxc}\n"), err
        for conn in conns:

            async def refused(conn: Connection = conn) -> bool:
                return (await conn.get(path))[0] == 410

            await eventually(refused, within=1.0, interval=0.05)
            status, body = await conn.get(path)
            assert (status, errcode(body)) == (410, "M_NOT_FOUND")
            assert data not in body

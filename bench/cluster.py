"""Cluster benchmark: several relay processes on one PostgreSQL, in one run.

    .venv/bin/python bench/cluster.py [--duration S] [--rounds N] [--warmup S]
                                      [--revocations N] [--cold-requests N]
                                      [--upstream-delay S]

Three relays (run as operators run them, ``python -m relay run -c …``) share one fresh
PostgreSQL database and one throwaway Synapse:

- relay A, ``public.workers: 1``; relay B, ``public.workers: 2`` (two processes on one
  port and one cache directory); relay C, ``public.workers: 3``, whose homeserver is a
  counting proxy in front of Synapse.

It reports:

(a) req/s, p99 and server CPU per request on one cached 100 KiB link, wrk -t2 -c32,
    with 1 process (A) and with 2 (B); rounds interleave A and B and the best round of
    each counts. CPU is the sum over every process of the relay (the primary and its
    workers, from /proc) per request. Target: 2 processes >= 1.7x one's req/s.
(b) revocation latency across processes: N fresh items, each cached and answered 200
    by A and B first, are revoked one at a time with ``media-relay revoke``'s code
    (relay.store.takedown, from this process, a process of its own on the database);
    the time from just before the revoking transaction to the moment the other
    processes answer 410 "revoked": A on its keep-alive connection, B on a fresh
    connection per poll (so either of its processes may answer) from the first of four
    410s in a row. Targets: median < 150 ms, max < 1 s.
(c) upstream downloads for N concurrent cold requests (fresh connections, so the kernel
    spreads them over C's 3 processes) for one 1 MiB item: the proxy counts the
    download requests reaching the homeserver; it holds each one --upstream-delay
    seconds first (a remote homeserver's latency, so the requests really overlap).
    Target: 1.

Every answer is checked (status, length, SHA-256 where a body is expected); a run with
a non-2xx answer, a socket error or short bodies is INVALID. The exit code is 1 for an
invalid run or a missed target (FAIL), as for the other benchmarks. Needs ``wrk``
and PostgreSQL (``RELAY_BENCH_POSTGRES_URL``, default postgres@127.0.0.1:5432).
Takes about 80 s with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
from aiohttp import web
from benchkit import RelaySetup, prepare, relay_config, relay_process, write_yaml
from faultproxy import DOWNLOAD, FaultProxy
from revocation_latency import drop_postgres, fresh_postgres
from serve import (
    WRK_MISSING,
    WRK_REPORT_LUA,
    Run,
    Target,
    cpu_seconds,
    fetch_and_check,
    run_wrk,
    upload,
)

from relay.app import key_ring
from relay.config.loading import load
from relay.core.minting import LinkMinter
from relay.core.mxc import parse_mxc
from relay.devtools.local_synapse import LocalSynapse, free_ports
from relay.store import open_database
from relay.store.takedown import OPERATOR, Takedowns

APPSERVICE_ID = "media-relay-cluster-bench"
BOT_LOCALPART = "mediarelayclusterbench"
HOT_SIZE = 100 * 1024
COLD_SIZE = 1024 * 1024
REVOKED_SIZE = 1024
LINK_TTL = 3600
CONNECTIONS = 32
THREADS = 2
TARGET_SCALING = 1.7
TARGET_MEDIAN_MS = 150.0
TARGET_MAX_MS = 1000.0
SEEN_WITHIN = 5.0  # a revocation not honoured by then makes the run invalid
STREAK = 4  # fresh-connection 410s in a row that count as "every process"
WORKERS_TIMEOUT = 30.0


# ---------------------------------------------------------------- the relays


@dataclass(frozen=True)
class Relay:
    name: str
    setup: RelaySetup
    config: Path
    workers: int
    minter: LinkMinter

    @property
    def public_base(self) -> str:
        return f"http://127.0.0.1:{self.setup.public_port}"

    def link(self, mxc: str) -> str:
        return self.minter.mint(parse_mxc(mxc), LINK_TTL).url


def write_relay(
    name: str, setup: RelaySetup, synapse: LocalSynapse, database: str, workers: int, **extra: str
) -> Relay:
    workdir = setup.workdir / name
    workdir.mkdir()
    data = relay_config(
        setup,
        synapse,
        database=database,
        cache_dir=workdir / "cache",
        public={"workers": workers},
        # Links for items never posted in a room (uploaded straight to Synapse).
        signing={"require_seen": False},
    )
    if "homeserver" in extra:
        data["homeserver"]["address"] = extra["homeserver"]
    config = write_yaml(workdir / "config.yaml", data)
    loaded = load(config, environ={})
    return Relay(name, setup, config, workers, LinkMinter(key_ring(loaded), loaded.public.url))


def listeners(port: int) -> int:
    """LISTEN sockets on 127.0.0.1:``port`` (SO_REUSEPORT: one per serving process)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as table:
        return sum(1 for row in table if row.split()[1:4:2] == [local, "0A"])


def relay_pids(primary: int) -> list[int]:
    """The primary and its children (the public workers), from /proc."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{primary}/task"):
            text = Path(f"/proc/{primary}/task/{task}/children").read_text()
            children += [int(pid) for pid in text.split()]
    return [primary, *children]


@contextlib.asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[list[int]]:
    """The relay until every one of its processes listens; yields their pids."""
    async with relay_process(relay.config, relay.setup.internal_port) as process:
        deadline = time.monotonic() + WORKERS_TIMEOUT
        while listeners(relay.setup.public_port) < relay.workers:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"relay {relay.name}: not {relay.workers} processes listening")
            await asyncio.sleep(0.1)
        pids = relay_pids(process.pid)
        if len(pids) != relay.workers:
            raise RuntimeError(f"relay {relay.name}: processes {pids}, not {relay.workers}")
        yield pids


# ---------------------------------------------------------------- (a) req/s


@dataclass(frozen=True)
class Throughput:
    run: Run
    cpu_ms_per_request: float


async def throughput(
    wrk: str, relay: Relay, pids: list[int], url: str, seconds: float, script: Path
) -> Throughput:
    target = Target(relay.name, "100 KiB", HOT_SIZE, url, (), CONNECTIONS, pids[0])
    before = sum(cpu_seconds(pid) for pid in pids)
    result = await run_wrk(wrk, target, seconds, THREADS, script)
    cpu = sum(cpu_seconds(pid) for pid in pids) - before
    return Throughput(result, 1000 * cpu / max(result.requests, 1))


# ---------------------------------------------------------------- (b) revocations


async def status_of(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


def revoked_answer(status: int, body: bytes) -> bool:
    # 410 is also an expired link's answer; links here live an hour, but be sure.
    return status == 410 and b"revoked" in body


async def until_revoked(
    session: aiohttp.ClientSession, url: str, streak: int, started: float
) -> float:
    """Seconds from ``started`` until the first of ``streak`` revoked answers in a row."""
    first: float | None = None
    seen = 0
    while seen < streak:
        if time.time() - started > SEEN_WITHIN:
            raise RuntimeError(f"not revoked after {SEEN_WITHIN:g} s: {url[:60]}…")
        now = time.time()
        status, body = await status_of(session, url)
        if revoked_answer(status, body):
            first = now if first is None else first
            seen += 1
        elif status == 200:
            first, seen = None, 0
        else:
            raise RuntimeError(f"GET {url[:60]}… answered {status} while polling: {body[:200]!r}")
    assert first is not None
    return first - started


async def revocation_latencies(
    database: str, a: Relay, b: Relay, items: list[tuple[str, str]]
) -> tuple[list[float], list[float]]:
    """(A's, B's) seconds per revocation of ``items`` (mxc, SHA-256 of the body)."""
    db = await open_database(database)
    takedowns = Takedowns(db)
    timeout = aiohttp.ClientTimeout(total=10)
    keep_alive = aiohttp.ClientSession(timeout=timeout)
    fresh = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True))
    to_a: list[float] = []
    to_b: list[float] = []
    try:
        for mxc, digest in items:
            link_a, link_b = a.link(mxc), b.link(mxc)
            await fetch_and_check(keep_alive, link_a, {}, digest, REVOKED_SIZE)
            for _ in range(2):  # likely both of B's processes
                await fetch_and_check(fresh, link_b, {}, digest, REVOKED_SIZE)
            await asyncio.sleep(secrets.randbelow(250) / 1000)  # not in step with any poll
            started = time.time()
            await takedowns.revoke(parse_mxc(mxc), OPERATOR)
            seen_a, seen_b = await asyncio.gather(
                until_revoked(keep_alive, link_a, 1, started),
                until_revoked(fresh, link_b, STREAK, started),
            )
            to_a.append(seen_a)
            to_b.append(seen_b)
    finally:
        await keep_alive.close()
        await fresh.close()
        await db.stop()
    return to_a, to_b


# ---------------------------------------------------------------- (c) cold requests


class CountingProxy(FaultProxy):
    """Forwards everything to Synapse; counts the media downloads, each held a while."""

    def __init__(self, upstream: str, port: int, delay: float) -> None:
        super().__init__(upstream, port)
        self.delay = delay
        self.downloads: dict[str, int] = {}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith(DOWNLOAD):
            media_id = request.path.rsplit("/", 1)[-1]
            self.downloads[media_id] = self.downloads.get(media_id, 0) + 1
            await asyncio.sleep(self.delay)
        return await super()._handle(request)


async def cold_burst(url: str, digest: str, count: int) -> list[str]:
    """``count`` concurrent GETs on fresh connections; what was wrong with any."""
    connector = aiohttp.TCPConnector(limit=count, force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        results = await asyncio.gather(
            *(fetch_and_check(session, url, {}, digest, COLD_SIZE) for _ in range(count)),
            return_exceptions=True,
        )
    return sorted({str(r) for r in results if isinstance(r, BaseException)})


# ---------------------------------------------------------------- report


def ms_summary(seconds: list[float]) -> tuple[float, float, float]:
    ms = sorted(1000 * s for s in seconds)
    p95 = ms[max(0, round(0.95 * len(ms)) - 1)]
    return statistics.median(ms), p95, ms[-1]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(
    runs: dict[str, list[Throughput]],
    latencies: tuple[list[float], list[float]],
    downloads: int,
    cold: int,
) -> bool:
    """Print the tables; whether every target was met."""
    best = {name: max(rs, key=lambda t: t.run.requests_per_second) for name, rs in runs.items()}
    one, two = best["1 process"], best["2 processes"]
    print()
    print(f"{'(a) cached 100 KiB, wrk -t2 -c32':<34} {'req/s':>8} {'p99 ms':>7} "
          f"{'CPU ms/req':>10}  all rounds")  # fmt: skip
    for name, t in best.items():
        rounds = "/".join(f"{x.run.requests_per_second:.0f}" for x in runs[name])
        print(
            f"{'    ' + name:<34} {t.run.requests_per_second:>8.0f} {t.run.p99_ms:>7.1f} "
            f"{t.cpu_ms_per_request:>10.3f}  {rounds}"
        )
    scaling = two.run.requests_per_second / max(one.run.requests_per_second, 1e-9)
    cpu_ratio = two.cpu_ms_per_request / max(one.cpu_ms_per_request, 1e-9)
    print(f"    2 processes / 1: req/s {scaling:.2f}x (target >= {TARGET_SCALING}x "
          f"{verdict(scaling >= TARGET_SCALING)}), CPU per request {cpu_ratio:.2f}x")  # fmt: skip
    met = [scaling >= TARGET_SCALING, downloads == 1]
    print()
    print(f"{'(b) revocation, seen by':<34} {'median':>8} {'p95':>7} {'max':>10}  (ms, "
          f"n={len(latencies[0])})")  # fmt: skip
    for name, values in (("A (1 process)", latencies[0]), ("B (2 processes)", latencies[1])):
        median, p95, worst = ms_summary(values)
        ok = median < TARGET_MEDIAN_MS and worst < TARGET_MAX_MS
        met.append(ok)
        print(f"{'    ' + name:<34} {median:>8.1f} {p95:>7.1f} {worst:>10.1f}  {verdict(ok)}")
    print()
    print(f"(c) {cold} cold requests over 3 processes sharing a cache_dir: "
          f"{downloads} upstream download(s), {cold / max(downloads, 1):.0f} requests per "
          f"download (target 1 download {verdict(downloads == 1)})")  # fmt: skip
    return all(met)


# ---------------------------------------------------------------- main


async def bench(args: argparse.Namespace, wrk: str, workdir: Path, database: str) -> int:
    script = workdir / "report.lua"
    script.write_text(WRK_REPORT_LUA, encoding="utf-8")
    setup_a, synapse = prepare(workdir, APPSERVICE_ID, BOT_LOCALPART)
    ports = free_ports(5)
    # One appservice, three replicas: the homeserver's transactions go to A (the
    # registration's url); every replica fetches with the same as_token.
    setup_b = replace(setup_a, internal_port=ports[0], public_port=ports[1])
    setup_c = replace(setup_a, internal_port=ports[2], public_port=ports[3])
    started = time.monotonic()
    print(f"starting Synapse in {workdir} ...", flush=True)
    await synapse.start()
    proxy = CountingProxy(synapse.base_url, ports[4], args.upstream_delay)
    await proxy.start()
    try:
        _, token = await synapse.register_user("bench")
        bodies = {
            "hot": os.urandom(HOT_SIZE),
            "cold": os.urandom(COLD_SIZE),
            **{f"r{i}": os.urandom(REVOKED_SIZE) for i in range(args.revocations)},
        }
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            mxcs = {k: await upload(session, synapse.base_url, token, v) for k, v in bodies.items()}
        digests = {k: hashlib.sha256(v).hexdigest() for k, v in bodies.items()}
        a = write_relay("a", setup_a, synapse, database, 1)
        b = write_relay("b", setup_b, synapse, database, 2)
        c = write_relay("c", setup_c, synapse, database, 3, homeserver=proxy.url)
        async with running(a) as pids_a, running(b) as pids_b, running(c) as _:
            print(f"relays up after {time.monotonic() - started:.1f} s", flush=True)
            hot = {r.name: r.link(mxcs["hot"]) for r in (a, b)}
            # Fresh connections: the kernel spreads them, so every process has it cached.
            fresh = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=fresh) as session:
                for r in (a, b):
                    for _ in range(8):
                        await fetch_and_check(session, hot[r.name], {}, digests["hot"], HOT_SIZE)
            runs: dict[str, list[Throughput]] = {"1 process": [], "2 processes": []}
            for round_no in range(1, args.rounds + 1):
                for name, relay, pids in (("1 process", a, pids_a), ("2 processes", b, pids_b)):
                    url = hot[relay.name]
                    if round_no == 1 and args.warmup > 0:
                        await throughput(wrk, relay, pids, url, args.warmup, script)
                    result = await throughput(wrk, relay, pids, url, args.duration, script)
                    runs[name].append(result)
                    print(f"round {round_no}/{args.rounds} {name}: "
                          f"{result.run.requests_per_second:.0f} req/s", flush=True)  # fmt: skip
            problems = sorted({p for rs in runs.values() for t in rs for p in t.run.problems})
            items = [(mxcs[f"r{i}"], digests[f"r{i}"]) for i in range(args.revocations)]
            latencies = await revocation_latencies(database, a, b, items)
            print(f"revocations done after {time.monotonic() - started:.1f} s", flush=True)
            cold_id = parse_mxc(mxcs["cold"]).media_id
            wrong = await cold_burst(c.link(mxcs["cold"]), digests["cold"], args.cold_requests)
            problems += [f"cold request: {w}" for w in wrong]
        met = report(runs, latencies, proxy.downloads.get(cold_id, 0), args.cold_requests)
        print(f"total time {time.monotonic() - started:.0f} s")
    finally:
        await proxy.close()
        await synapse.stop()
    if problems:
        print("INVALID: " + "; ".join(problems))
        return 1
    return 0 if met else 1


async def run(args: argparse.Namespace, wrk: str) -> int:
    with tempfile.TemporaryDirectory(prefix="relay-cluster-bench-") as tmp:
        database, name = await fresh_postgres()
        try:
            return await bench(args, wrk, Path(tmp), database)
        except RuntimeError as e:
            # A relay that did not start, an answer that was wrong, a revocation not
            # honoured in time: no figure of this run means anything.
            print(f"INVALID: {e}", file=sys.stderr)
            return 1
        finally:
            await drop_postgres(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--rounds", type=int, default=2, help="wrk runs per relay (2)")
    parser.add_argument("--warmup", type=float, default=1, help="unmeasured seconds first (1)")
    parser.add_argument("--revocations", type=int, default=50, help="revocations timed (50)")
    parser.add_argument("--cold-requests", type=int, default=100, help="cold requests (100)")
    parser.add_argument(
        "--upstream-delay", type=float, default=0.25, help="seconds each download is held (0.25)"
    )
    args = parser.parse_args()
    if min(args.rounds, args.revocations, args.cold_requests) < 1 or args.duration <= 0:
        parser.error("--rounds, --revocations, --cold-requests >= 1 and --duration > 0")
    if args.warmup < 0 or args.upstream_delay < 0:
        parser.error("--warmup and --upstream-delay must be >= 0")
    wrk = shutil.which("wrk")
    if wrk is None:
        print(WRK_MISSING, file=sys.stderr)
        return 2
    return asyncio.run(run(args, wrk))


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped and temporary files removed", file=sys.stderr)
        raise SystemExit(130) from None

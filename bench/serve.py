"""Serving benchmark: cached media through signed links, side by side with Synapse.

    python bench/serve.py [--duration S] [--rounds N] [--warmup S] [--threads T]
                          [--small-connections C] [--large-connections C]

What it does:
  1. starts a throwaway Synapse, registers a user and uploads a 100 KiB and a 100 MiB
     file of random bytes (incompressible, so nothing on the way can shrink them);
  2. runs the relay as a **subprocess** (``python -m relay run -c config.yaml``) and
     signs one link per file with ``python -m relay sign --force`` (the operator's
     command; ``--force`` because the files were never posted in a room);
  3. warms the relay's cache with one GET per link and checks length and SHA-256
     against the upload (Synapse's own download is checked the same way);
  4. runs ``wrk`` against the targets, one at a time, the other servers idle:
     relay 100 KiB, Synapse 100 KiB, relay 100 MiB, Synapse 100 MiB, the 100 KiB
     file through a heisenbridge link (``compat:``, the same pipeline behind another
     verifier; ``signing.require_seen: false`` as the file was never posted), and, when
     ``nginx`` is installed, nginx serving the same two files from disk (1 worker,
     ``sendfile on``: the limit of what serving them can cost). Synapse is asked
     through its authenticated endpoint, ``GET /_matrix/client/v1/media/download/…``
     with the user's access token, as a Matrix client would. Each target gets an
     unmeasured warm-up run, then N measured rounds interleave the targets (so a burst
     of background load hits both servers) and the best round of each counts. Both
     sides get the same wrk settings;
  5. reports requests/s, MB/s (10^6 bytes), latency percentiles and the server's CPU
     use per target (its share of a core, and milliseconds of CPU per request: utime +
     stime of the server process, nginx's worker, over the requests wrk completed), the
     relay's peak RSS (``VmHWM`` of its process, covering start-up, the cache warm-up
     and every run), and checks the targets of the issues:
     relay/Synapse requests/s at 100 KiB >= 10, MB/s at 100 MiB >= 3, relay peak
     RSS < 80 MiB, a compat link at >= 0.9x the native link's requests/s, and (issue 14)
     <= 0.07 ms of relay CPU per 100 KiB request and, with nginx, a p99 at 100 KiB no
     worse than nginx's in the same run. A run
     with a non-2xx answer, a socket error or short bodies is invalid and fails the
     benchmark.

Needs ``wrk`` (Debian/Ubuntu: ``apt-get install wrk``; macOS: ``brew install wrk``);
nginx is optional (``apt-get install nginx-light``; without it the column is left out,
with a note). Takes about 70 s with the defaults. CPU per request is the figure to
compare on a busy machine: requests/s and latency move with the background load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from benchkit import (
    RelaySetup,
    prepare,
    relay_config,
    relay_process,
    write_yaml,
)

from relay.core.compat import heisenbridge
from relay.core.mxc import parse_mxc
from relay.devtools.local_synapse import LocalSynapse, free_ports

APPSERVICE_ID = "media-relay-serve-bench"
BOT_LOCALPART = "mediarelayservebench"
SMALL_SIZE = 100 * 1024
LARGE_SIZE = 100 * 1024 * 1024
LINK_TTL = 3600
TARGET_SMALL_RPS_RATIO = 10.0
TARGET_COMPAT_RPS_RATIO = 0.9  # a compat link costs one more HMAC: within noise
HEISENBRIDGE_KEY = "bench-heisenbridge-media-key-0123456789"
TARGET_LARGE_MBPS_RATIO = 3.0
TARGET_PEAK_RSS_MIB = 80.0
TARGET_CPU_MS_PER_SMALL_REQUEST = 0.07
RSS_SAMPLE_SECONDS = 0.1
HEALTH_SECONDS = 10.0
WRK_MISSING = (
    "bench/serve.py needs the HTTP load generator wrk, which was not found on PATH.\n"
    "Install it with `apt-get install wrk` (Debian/Ubuntu) or `brew install wrk` (macOS)."
)

# wrk calls done() once after the run; printing the raw counters avoids parsing its
# rounded human-readable summary ("1.23GB").
WRK_REPORT_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d bytes=%d duration_us=%d connect=%d read=%d write=%d status=%d " ..
    "timeout=%d p50_us=%d p99_us=%d max_us=%d\\n",
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


# ---------------------------------------------------------------- processes


def sign(config: Path, mxc: str) -> str:
    """A signed link from the operator's command (stdout is the URL alone)."""
    argv = [sys.executable, "-m", "relay", "sign", "-c", str(config), "--force"]
    argv += ["--ttl", str(LINK_TTL), mxc]
    done = subprocess.run(
        argv,
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"media-relay sign failed ({done.returncode}): {done.stderr}")
    return done.stdout.strip()


# ---------------------------------------------------------------- nginx (the limit)

NGINX_MISSING = "nginx not found on PATH (apt-get install nginx-light to add the limit)"
NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  client_body_temp_path {root}/tmp;
  proxy_temp_path {root}/tmp;
  fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp;
  scgi_temp_path {root}/tmp;
  server {{
    listen 127.0.0.1:{port};
    root {root}/files;
  }}
}}
"""


@contextlib.asynccontextmanager
async def nginx_process(nginx: str, root: Path, port: int) -> AsyncIterator[int]:
    """nginx serving ``root/files`` on ``port`` (1 worker, sendfile); yields the worker's pid."""
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    # As root, nginx would run its worker as "nobody", which cannot enter the 0700 temp dir.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root, port=port, user=user), encoding="utf-8")
    argv = [nginx, "-c", str(conf), "-p", str(root), "-e", str(root / "error.log")]
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + HEALTH_SECONDS
        while not (workers := child_pids(process.pid)):
            if process.returncode is not None or time.monotonic() > deadline:
                log = (root / "error.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nginx did not start:\n{log}")
            await asyncio.sleep(0.05)
        yield workers[0]
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


# ---------------------------------------------------------------- /proc


def child_pids(pid: int) -> list[int]:
    """The children of a process (nginx's master: its worker)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def proc_status_kib(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """The highest ``VmRSS`` seen while running (``VmHWM`` is read at the end too)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmRSS"))
            await asyncio.sleep(RSS_SAMPLE_SECONDS)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# ---------------------------------------------------------------- Synapse side


async def upload(session: aiohttp.ClientSession, base: str, token: str, data: bytes) -> str:
    async with session.post(
        f"{base}/_matrix/media/v3/upload?filename=bench.bin",
        data=data,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
    ) as response:
        body = await response.json()
        if response.status != 200:
            raise RuntimeError(f"upload failed: {response.status} {body}")
        return str(body["content_uri"])


def synapse_download_url(base: str, mxc: str) -> str:
    server, media_id = mxc.removeprefix("mxc://").split("/", 1)
    return f"{base}/_matrix/client/v1/media/download/{server}/{media_id}"


async def fetch_and_check(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], expected: str, size: int
) -> None:
    """One GET; its body must be the upload (length and SHA-256)."""
    digest = hashlib.sha256()
    length = 0
    async with session.get(url, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"GET {url.split('?')[0][:60]}…: {response.status}")
        async for chunk in response.content.iter_chunked(1 << 20):
            digest.update(chunk)
            length += len(chunk)
    if length != size or digest.hexdigest() != expected:
        raise RuntimeError(f"GET {url[:60]}… returned {length} bytes that differ from the upload")


# ---------------------------------------------------------------- wrk


@dataclass(frozen=True)
class Target:
    server: str  # "relay" or "Synapse"
    label: str  # "100 KiB" / "100 MiB"
    size: int
    url: str
    headers: tuple[str, ...]
    connections: int
    pid: int


@dataclass(frozen=True)
class Run:
    target: Target
    requests: int
    body_bytes_read: int  # everything wrk read, headers included, partial bodies too
    seconds: float
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_cores: float  # the server's CPU seconds per wall second
    cpu_seconds: float  # the server's CPU seconds during the run

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_seconds * 1000 / max(self.requests, 1)

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def megabytes_per_second(self) -> float:
        # wrk counts bytes as they are read, so bodies still in flight at the end count
        # too (with a few 100 MiB responses, whole-request counting would be too coarse).
        return self.body_bytes_read / self.seconds / 1e6

    @property
    def problems(self) -> list[str]:
        found = [f"{count} {name} errors" for name, count in self.errors.items() if count]
        if self.requests == 0:
            found.append("no request completed")
        elif self.body_bytes_read < self.requests * self.target.size:
            found.append("fewer bytes read than complete bodies")
        return found


async def run_wrk(wrk: str, target: Target, seconds: float, threads: int, script: Path) -> Run:
    """One wrk run against ``target``; raises RuntimeError if wrk itself fails."""
    argv = [wrk, f"-t{threads}", f"-c{target.connections}", f"-d{seconds:g}s", "--timeout", "60s"]
    for header in target.headers:
        argv += ["-H", header]
    argv += ["-s", str(script), target.url]
    cpu_before = cpu_seconds(target.pid)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await process.communicate()
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    wall = time.monotonic() - started
    cpu = cpu_seconds(target.pid) - cpu_before
    text = output.decode(errors="replace")
    match = re.search(r"^BENCH (.*)$", text, re.MULTILINE)
    if process.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{text}")
    values = {k: int(v) for k, v in (pair.split("=") for pair in match.group(1).split())}
    return Run(
        target=target,
        requests=values["requests"],
        body_bytes_read=values["bytes"],
        seconds=values["duration_us"] / 1e6,
        errors={k: values[k] for k in ("connect", "read", "write", "status", "timeout")},
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        max_ms=values["max_us"] / 1000,
        cpu_cores=cpu / wall,
        cpu_seconds=cpu,
    )


# ---------------------------------------------------------------- report


def key_figure(run: Run) -> float:
    """What the target is about: requests/s for the small file, MB/s for the large one."""
    if run.target.size == SMALL_SIZE:
        return run.requests_per_second
    return run.megabytes_per_second


def best_runs(runs: list[Run]) -> dict[tuple[str, int], Run]:
    """Per (server, size), the round with the best key figure (background noise only slows)."""
    best: dict[tuple[str, int], Run] = {}
    for r in runs:
        key = (r.target.server, r.target.size)
        if key not in best or key_figure(r) > key_figure(best[key]):
            best[key] = r
    return best


def report(runs: list[Run], peak_rss_mib: float, synapse_rss_mib: float) -> bool:
    best = best_runs(runs)
    print()
    header = (
        f"{'target':<26} {'conns':>5} {'req/s':>7} {'MB/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'CPU':>5} {'ms/req':>7}  {'all rounds':<18} errors"
    )
    print(header)
    print("-" * len(header))
    for (server, size), r in best.items():
        rounds = "/".join(
            f"{key_figure(x):.0f}"
            for x in runs
            if (x.target.server, x.target.size) == (server, size)
        )
        problems = sorted({p for x in runs if x.target is r.target for p in x.problems})
        print(
            f"{server + ' ' + r.target.label:<26} {r.target.connections:>5} "
            f"{r.requests_per_second:>7.0f} {r.megabytes_per_second:>7.0f} "
            f"{r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.cpu_cores:>5.0%} "
            f"{r.cpu_ms_per_request:>7.3f}  {rounds:<18} {', '.join(problems) or 'none'}"
        )
    relay_small = best[("relay", SMALL_SIZE)]
    small = key_figure(relay_small) / max(key_figure(best[("Synapse", SMALL_SIZE)]), 1e-9)
    large = key_figure(best[("relay", LARGE_SIZE)]) / max(
        key_figure(best[("Synapse", LARGE_SIZE)]), 1e-9
    )
    compat = key_figure(best[("relay heisenbridge", SMALL_SIZE)]) / max(
        key_figure(relay_small), 1e-9
    )
    cpu = relay_small.cpu_ms_per_request
    valid = all(not r.problems for r in runs)
    checks = [
        ("req/s at 100 KiB, relay / Synapse", f"{small:.1f}x",
         f">= {TARGET_SMALL_RPS_RATIO:g}x", small >= TARGET_SMALL_RPS_RATIO),
        ("MB/s at 100 MiB, relay / Synapse", f"{large:.1f}x",
         f">= {TARGET_LARGE_MBPS_RATIO:g}x", large >= TARGET_LARGE_MBPS_RATIO),
        ("req/s at 100 KiB, compat / native", f"{compat:.2f}x",
         f">= {TARGET_COMPAT_RPS_RATIO:g}x", compat >= TARGET_COMPAT_RPS_RATIO),
        ("relay peak RSS", f"{peak_rss_mib:.1f} MiB",
         f"< {TARGET_PEAK_RSS_MIB:g} MiB", peak_rss_mib < TARGET_PEAK_RSS_MIB),
        ("relay CPU per 100 KiB request", f"{cpu:.3f} ms",
         f"<= {TARGET_CPU_MS_PER_SMALL_REQUEST:g} ms", cpu <= TARGET_CPU_MS_PER_SMALL_REQUEST),
    ]  # fmt: skip
    nginx_small = best.get(("nginx", SMALL_SIZE))
    if nginx_small is not None:
        p99 = relay_small.p99_ms
        checks.append(
            ("p99 at 100 KiB, relay vs nginx", f"{p99:.1f} ms",
             f"<= {nginx_small.p99_ms:.1f} ms", p99 <= nginx_small.p99_ms)
        )  # fmt: skip
    print("(best round shown; CPU = the server process's CPU seconds per second,")
    print(" ms/req = its CPU milliseconds per completed request)")
    if nginx_small is None:
        print(f"no nginx column: {NGINX_MISSING}")
    print()
    for name, shown, target, ok in checks:
        print(f"{name:<34} {shown:>9}  target {target:<9} {'PASS' if ok else 'FAIL'}")
    print(f"{'Synapse peak RSS (for comparison)':<34} {synapse_rss_mib:>5.1f} MiB")
    if not valid:
        print("INVALID: some runs had errors (see the table); the ratios mean nothing")
    return valid and all(ok for *_, ok in checks)


# ---------------------------------------------------------------- main


async def run(args: argparse.Namespace, wrk: str) -> int:
    with tempfile.TemporaryDirectory(prefix="relay-serve-bench-") as tmp:
        workdir = Path(tmp)
        script = workdir / "report.lua"
        script.write_text(WRK_REPORT_LUA, encoding="utf-8")
        setup, synapse = prepare(workdir, APPSERVICE_ID, BOT_LOCALPART)
        started = time.monotonic()
        print(f"starting Synapse in {tmp} ...", flush=True)
        await synapse.start()
        try:
            return await bench(args, wrk, setup, synapse, script, started)
        finally:
            await synapse.stop()


async def bench(
    args: argparse.Namespace,
    wrk: str,
    setup: RelaySetup,
    synapse: LocalSynapse,
    script: Path,
    started: float,
) -> int:
    _, token = await synapse.register_user("bench")
    auth = {"Authorization": f"Bearer {token}"}
    files = {size: os.urandom(size) for size in (SMALL_SIZE, LARGE_SIZE)}
    digests = {size: hashlib.sha256(data).hexdigest() for size, data in files.items()}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        mxcs = {
            size: await upload(session, synapse.base_url, token, data)
            for size, data in files.items()
        }
    nginx = shutil.which("nginx")
    nginx_root = setup.workdir / "nginx"
    if nginx is not None:
        (nginx_root / "files").mkdir(parents=True)
        for size, data in files.items():
            (nginx_root / "files" / f"{size}.bin").write_bytes(data)
    else:
        print(f"no nginx column: {NGINX_MISSING}", flush=True)
    del files
    print(f"Synapse ready and files uploaded after {time.monotonic() - started:.1f} s", flush=True)

    relay_dir = setup.workdir / "relay"
    relay_base = f"http://127.0.0.1:{setup.public_port}"
    relay_dir.mkdir()
    config = write_yaml(
        relay_dir / "config.yaml",
        relay_config(
            setup,
            synapse,
            database=f"sqlite:{relay_dir / 'relay.db'}",
            cache_dir=relay_dir / "cache",
            # The default max_size (100M) is exactly the large file; leave headroom.
            media={"max_size": "1G"},
            signing={"require_seen": False},
            compat={
                "heisenbridge": [
                    {"name": "bench", "url": relay_base + "/", "media_key": HEISENBRIDGE_KEY}
                ]
            },
        ),
    )
    compat_link = (
        relay_base
        + "/"
        + heisenbridge.link_path(HEISENBRIDGE_KEY.encode(), parse_mxc(mxcs[SMALL_SIZE]))
    )
    links = {size: await asyncio.to_thread(sign, config, mxc) for size, mxc in mxcs.items()}
    async with contextlib.AsyncExitStack() as stack:
        relay = await stack.enter_async_context(relay_process(config, setup.internal_port))
        nginx_base, nginx_pid = "", None
        if nginx is not None:
            (nginx_port,) = free_ports(1)
            nginx_pid = await stack.enter_async_context(
                nginx_process(nginx, nginx_root, nginx_port)
            )
            nginx_base = f"http://127.0.0.1:{nginx_port}"
        relay_pid = relay.pid
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for size in (SMALL_SIZE, LARGE_SIZE):
                # The first GET fills the relay's cache; the second is a cache hit.
                for _ in range(2):
                    await fetch_and_check(session, links[size], {}, digests[size], size)
                if size == SMALL_SIZE:
                    await fetch_and_check(session, compat_link, {}, digests[size], size)
                if nginx_pid is not None:
                    nginx_url = f"{nginx_base}/{size}.bin"
                    await fetch_and_check(session, nginx_url, {}, digests[size], size)
                await fetch_and_check(
                    session,
                    synapse_download_url(synapse.base_url, mxcs[size]),
                    auth,
                    digests[size],
                    size,
                )
        print(f"relay cache warm after {time.monotonic() - started:.1f} s", flush=True)
        synapse_pid = synapse.pid
        if synapse_pid is None:
            raise RuntimeError("Synapse is not running")
        bearer = f"Authorization: Bearer {token}"
        targets: list[Target] = []
        for size, label, conns in (
            (SMALL_SIZE, "100 KiB", args.small_connections),
            (LARGE_SIZE, "100 MiB", args.large_connections),
        ):
            targets.append(Target("relay", label, size, links[size], (), conns, relay_pid))
            synapse_url = synapse_download_url(synapse.base_url, mxcs[size])
            targets.append(
                Target("Synapse", label, size, synapse_url, (bearer,), conns, synapse_pid)
            )
            if size == SMALL_SIZE:
                targets.append(
                    Target("relay heisenbridge", label, size, compat_link, (), conns, relay_pid)
                )
            if nginx_pid is not None:
                nginx_url = f"{nginx_base}/{size}.bin"
                targets.append(Target("nginx", label, size, nginx_url, (), conns, nginx_pid))
        sampler = RssSampler(relay_pid)
        sampler.start()
        runs: list[Run] = []
        try:
            # Rounds interleave the servers, so a burst of background load hits both.
            for round_no in range(1, args.rounds + 1):
                for target in targets:
                    if round_no == 1 and args.warmup > 0:
                        await run_wrk(wrk, target, args.warmup, args.threads, script)
                    result = await run_wrk(wrk, target, args.duration, args.threads, script)
                    runs.append(result)
                    print(
                        f"round {round_no}/{args.rounds} {target.server} {target.label}, "
                        f"{target.connections} connections: "
                        f"{result.requests_per_second:.0f} req/s, "
                        f"{result.megabytes_per_second:.0f} MB/s",
                        flush=True,
                    )
        finally:
            await sampler.stop()
        relay_hwm_kib = proc_status_kib(relay_pid, "VmHWM")
        synapse_hwm_kib = proc_status_kib(synapse_pid, "VmHWM")
    peak_mib = max(relay_hwm_kib, sampler.peak_kib) / 1024
    print(
        f"wrk {args.threads} threads, same settings for both servers; "
        f"total time {time.monotonic() - started:.0f} s"
    )
    return 0 if report(runs, peak_mib, synapse_hwm_kib / 1024) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, default=5, help="seconds per measured run (default 5)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="measured runs per target, interleaved (default 2)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2,
        help="unmeasured seconds per target before its first run (default 2)",
    )
    parser.add_argument(
        "--small-connections", type=int, default=32, help="wrk connections, 100 KiB (32)"
    )
    parser.add_argument(
        "--large-connections", type=int, default=8, help="wrk connections, 100 MiB (8)"
    )
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    args = parser.parse_args()
    if min(args.small_connections, args.large_connections, args.threads, args.rounds) < 1:
        parser.error("connections, threads and rounds must be >= 1")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be > 0 and --warmup >= 0")
    if args.threads > min(args.small_connections, args.large_connections):
        parser.error("wrk needs at least as many connections as threads")
    wrk = shutil.which("wrk")
    if wrk is None:
        print(WRK_MISSING, file=sys.stderr)
        return 2
    return asyncio.run(main_task(args, wrk))


async def main_task(args: argparse.Namespace, wrk: str) -> int:
    """``run`` with SIGTERM handled like Ctrl-C: every finally (servers, temp dir) runs."""
    task = asyncio.current_task()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        if task is not None:
            task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await run(args, wrk)
    except asyncio.CancelledError:
        if not terminated:
            raise
        print("terminated; servers stopped and temporary files removed", file=sys.stderr)
        return 143


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped and temporary files removed", file=sys.stderr)
        raise SystemExit(130) from None

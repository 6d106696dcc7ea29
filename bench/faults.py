"""Fault benchmark: kill -9 during ingest, then a homeserver that misbehaves.

    .venv/bin/python bench/faults.py [--events 2000] [--kills 20] [--clients 20]

A script, not a timed test (tests/ never measure; see bench/README.md). It starts a
throwaway Synapse and runs the relay as a subprocess (``python -m relay run -c …``).

1. **kill -9 during ingest.** A user posts ``--events`` m.image messages (one unique
   mxc each) in a room the relay serves, paced so the stream spans the kills, while the
   relay is killed with SIGKILL ``--kills`` times at spread-out moments and restarted at
   once. Synapse delivers the events as appservice transactions and retries whatever
   was not acknowledged. Afterwards, from the relay's database: *lost* = events posted
   but not recorded; *processed twice* = events counted by committed transactions beyond
   the distinct events recorded (a transaction applied twice, under its id or another).
   Synapse numbers its transactions, so the committed ids must also be contiguous.
2. **a misbehaving homeserver.** The relay's ``homeserver.address`` points at a proxy
   in front of Synapse (bench/faultproxy.py) that answers chosen downloads with 429,
   500, 502, a 503 HTML page, a reset after 1 of 8 MiB, a 32 B/s drip, or never; and
   that goes down altogether for a while. ``--clients`` concurrent clients GET signed
   links to such media; reported: the statuses they got, how long they waited, how many
   bodies were cut short. Then a flood (200 clients, 50 resetting downloads) for memory.
   Targets: no 500 from the relay, no client left hanging (60 s), the relay alive and
   serving afterwards, peak RSS under 150 MiB.

Exits 1 when a target is missed. Takes about two to three minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from benchkit import (
    RelaySetup,
    log_tail,
    prepare,
    relay_config,
    relay_process,
    spawn_relay,
    stop_process,
    wait_healthy,
    write_yaml,
)
from faultproxy import FAULTS, FaultProxy
from serve import RssSampler, proc_status_kib, upload

from relay.core.minting import LinkMinter
from relay.core.mxc import MediaId, parse_mxc
from relay.core.signing import KeyRing, SigningKey
from relay.devtools.local_synapse import LocalSynapse, free_ports

APPSERVICE_ID = "media-relay-fault-bench"
BOT_LOCALPART = "mediarelayfaultbench"
SIGNING_SECRET = secrets.token_urlsafe(32)
CLIENT_TIMEOUT = 60.0
DRAIN_TIMEOUT = 300.0  # Synapse backs off after failures; give it time to catch up
TARGET_RSS_MIB = 150.0
FLOOD_CLIENTS, FLOOD_MEDIA = 200, 50


# ---------------------------------------------------------------- part 1: kill -9


def db_figures(path: Path) -> tuple[int, int, list[int]]:
    """(distinct stream events recorded, events counted by transactions, transaction ids)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        recorded = db.execute(
            "SELECT COUNT(DISTINCT event_id) FROM media_reference WHERE media_id LIKE 'fault%'"
        ).fetchone()[0]
        counted = db.execute("SELECT COALESCE(SUM(event_count), 0) FROM as_transaction")
        ids = [row[0] for row in db.execute("SELECT txn_id FROM as_transaction")]
        return int(recorded), int(counted.fetchone()[0]), sorted(int(i) for i in ids)
    finally:
        db.close()


async def client_json(
    session: aiohttp.ClientSession, method: str, url: str, token: str, body: Any = None
) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.request(method, url, json=body, headers=headers) as response:
        data = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{method} {url}: {response.status} {data}")
        return data


@dataclass
class Killer:
    """Restarts the relay after each SIGKILL; counts kills and restarts."""

    config: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    kills: int = 0
    log_file: Any = None

    async def start(self) -> None:
        self.log_file = self.log_path.open("ab")
        self.process = spawn_relay(self.config, self.log_file)
        await wait_healthy(self.process, self.port, self.log_path)

    async def kill_and_restart(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.process.wait)
        self.kills += 1
        self.process = spawn_relay(self.config, self.log_file)
        await wait_healthy(self.process, self.port, self.log_path)

    async def stop(self) -> None:
        if self.process is not None:
            await stop_process(self.process)
        if self.log_file is not None:
            self.log_file.close()


async def ingest_under_kills(
    args: argparse.Namespace, setup: RelaySetup, synapse: LocalSynapse
) -> dict[str, Any]:
    workdir = setup.workdir / "ingest"
    workdir.mkdir()
    db_path = workdir / "relay.db"
    config = write_yaml(
        workdir / "config.yaml",
        relay_config(setup, synapse, database=f"sqlite:{db_path}", cache_dir=workdir / "cache"),
    )
    bot = f"@{setup.bot_localpart}:localhost"
    _, token = await synapse.register_user("faults")
    killer = Killer(config, setup.internal_port, workdir / "relay.log")
    await killer.start()
    base = synapse.base_url + "/_matrix/client/v3"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            room = (
                await client_json(session, "POST", base + "/createRoom", token, {"invite": [bot]})
            )["room_id"]
            members_url = f"{base}/rooms/{quote(room)}/joined_members"
            deadline = time.monotonic() + 60
            while bot not in (await client_json(session, "GET", members_url, token))["joined"]:
                if time.monotonic() > deadline:
                    raise RuntimeError("the relay's bot did not join")
                await asyncio.sleep(0.2)
            await asyncio.sleep(2)  # the join's own transaction is acknowledged by now
            _, baseline, _ = await asyncio.to_thread(db_figures, db_path)

            pace = args.seconds / args.events

            async def post_stream() -> None:
                started = time.monotonic()
                for i in range(args.events):
                    content = {
                        "msgtype": "m.image",
                        "body": f"f{i}.png",
                        "url": f"mxc://localhost/fault{i:05d}",
                    }
                    await client_json(
                        session,
                        "PUT",
                        f"{base}/rooms/{quote(room)}/send/m.room.message/t{i}",
                        token,
                        content,
                    )
                    await asyncio.sleep(max(0.0, started + (i + 1) * pace - time.monotonic()))

            async def kill_during_stream() -> None:
                gap = args.seconds / args.kills
                for _ in range(args.kills):
                    await asyncio.sleep(gap * random.uniform(0.3, 1.0))
                    await killer.kill_and_restart()

            started = time.monotonic()
            await asyncio.gather(post_stream(), kill_during_stream())
            stream_seconds = time.monotonic() - started
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while True:
                recorded, counted, ids = await asyncio.to_thread(db_figures, db_path)
                if recorded >= args.events or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            drained = time.monotonic() - started
    finally:
        await killer.stop()
    contiguous = ids == list(range(ids[0], ids[-1] + 1)) if ids else False
    return {
        "events": args.events,
        "kills": killer.kills,
        "stream_seconds": stream_seconds,
        "all_recorded_after": drained,
        "transactions": len(ids),
        "contiguous": contiguous,
        "lost": args.events - recorded,
        "twice": (counted - baseline) - recorded,
    }


# ---------------------------------------------------------------- part 2: the homeserver


@dataclass
class Outcome:
    statuses: Counter[str] = field(default_factory=Counter)
    truncated: int = 0
    waits: list[float] = field(default_factory=list)

    def line(self, name: str) -> str:
        waits = sorted(self.waits)
        statuses = ", ".join(f"{k} x{v}" for k, v in sorted(self.statuses.items()))
        p50 = waits[len(waits) // 2] if waits else 0.0
        return (
            f"  {name:<16} {statuses:<22} truncated {self.truncated:>3}"
            f"   wait p50 {p50:5.2f} s, max {max(waits, default=0.0):5.2f} s"
        )


async def get_all(session: aiohttp.ClientSession, urls: list[str]) -> Outcome:
    outcome = Outcome()

    async def one(url: str) -> None:
        started = time.monotonic()
        try:
            async with session.get(url) as response:
                expected = response.content_length
                try:
                    body = await response.read()
                    short = expected is not None and len(body) < expected
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                    short = True
                outcome.statuses[str(response.status)] += 1
                outcome.truncated += short
        except TimeoutError:
            outcome.statuses["client timeout"] += 1
        except aiohttp.ClientError as e:
            outcome.statuses[type(e).__name__] += 1
        outcome.waits.append(time.monotonic() - started)

    await asyncio.gather(*(one(url) for url in urls))
    return outcome


async def serves(session: aiohttp.ClientSession, url: str, data: bytes) -> bool:
    """Whether the relay serves ``data`` at ``url`` within 10 s (a back-off may be ending)."""
    deadline = time.monotonic() + 10
    while True:
        async with session.get(url) as response:
            if response.status == 200 and await response.read() == data:
                return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)


async def misbehaving_homeserver(
    args: argparse.Namespace, setup: RelaySetup, synapse: LocalSynapse
) -> tuple[dict[str, Outcome], dict[str, Any]]:
    workdir = setup.workdir / "upstream"
    workdir.mkdir()
    (proxy_port,) = free_ports(1)
    proxy = FaultProxy(synapse.base_url, proxy_port)
    await proxy.start()
    _, token = await synapse.register_user("uploader")
    good = {name: os.urandom(512 * 1024) for name in ("cached", "cold", "after")}
    async with aiohttp.ClientSession() as session:
        mxcs = {n: await upload(session, synapse.base_url, token, d) for n, d in good.items()}
    public = f"http://127.0.0.1:{setup.public_port}/"
    config = write_yaml(
        workdir / "config.yaml",
        relay_config(
            setup,
            synapse,
            database=f"sqlite:{workdir / 'relay.db'}",
            cache_dir=workdir / "cache",
            homeserver={"address": proxy.url},
            media={"connect_timeout": 2, "read_timeout": 3, "download_timeout": 15},
            signing={"keys": [{"id": "k1", "secret": SIGNING_SECRET}], "require_seen": False},
        ),
    )
    minter = LinkMinter(KeyRing([SigningKey("k1", SIGNING_SECRET.encode())]), public)

    def link(media: MediaId) -> str:
        return minter.mint(media, 3600).url

    outcomes: dict[str, Outcome] = {}
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with relay_process(config, setup.internal_port) as relay:
        sampler = RssSampler(relay.pid)
        sampler.start()
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
            outcomes["control"] = await get_all(session, [link(parse_mxc(mxcs["cached"]))])
            # 429 last: a rate limit applies to the relay's identity as a whole, so every
            # download backs off for retry_after_ms (2 s here); wait that out afterwards.
            for fault in sorted(FAULTS, key=lambda f: f == "f429"):
                urls = [link(MediaId("localhost", f"{fault}-{i % 4}")) for i in range(args.clients)]
                outcomes[fault] = await get_all(session, urls)
                if fault == "f429":
                    outcomes["after 429"] = await get_all(session, [link(parse_mxc(mxcs["cold"]))])
                    await asyncio.sleep(3)
            await proxy.take_down()
            outcomes["down, cached"] = await get_all(
                session, [link(parse_mxc(mxcs["cached"]))] * args.clients
            )
            outcomes["down, uncached"] = await get_all(
                session, [link(MediaId("localhost", f"missing{i}")) for i in range(args.clients)]
            )
            await proxy.start()
            await asyncio.sleep(1)
            outcomes["back up"] = await get_all(session, [link(parse_mxc(mxcs["after"]))])
            flood = [
                link(MediaId("localhost", f"freset-flood{i % FLOOD_MEDIA}"))
                for i in range(FLOOD_CLIENTS)
            ]
            outcomes[f"flood x{FLOOD_CLIENTS}"] = await get_all(session, flood)
            intact = await serves(session, link(parse_mxc(mxcs["cold"])), good["cold"])
        await sampler.stop()
        alive = relay.poll() is None
        peak = max(sampler.peak_kib, proc_status_kib(relay.pid, "VmHWM")) / 1024
    await proxy.close()
    return outcomes, {"alive": alive and intact, "peak_rss_mib": peak, "log": workdir}


# ---------------------------------------------------------------- report


def report(ingest: dict[str, Any], outcomes: dict[str, Outcome], health: dict[str, Any]) -> bool:
    print("\nkill -9 during ingest (real Synapse, SQLite)")
    print(
        f"  {ingest['events']} events in {ingest['transactions']} transactions over"
        f" {ingest['stream_seconds']:.0f} s, {ingest['kills']} kills; all recorded"
        f" {ingest['all_recorded_after']:.0f} s after the stream began"
    )
    print(
        f"  lost {ingest['lost']}, processed twice {ingest['twice']},"
        f" transaction ids contiguous: {'yes' if ingest['contiguous'] else 'NO'}"
    )
    print("\nmisbehaving homeserver (what clients of the relay got)")
    for name, outcome in outcomes.items():
        print(outcome.line(name))
    print(
        f"  relay alive and serving afterwards: {'yes' if health['alive'] else 'NO'};"
        f" peak RSS {health['peak_rss_mib']:.1f} MiB (target < {TARGET_RSS_MIB:.0f})"
    )
    problems = []
    if ingest["lost"] or ingest["twice"] or not ingest["contiguous"]:
        problems.append("ingest lost or repeated events")
    for name, outcome in outcomes.items():
        if outcome.statuses["500"] or outcome.statuses["client timeout"]:
            problems.append(f"{name}: a 500 or a client left hanging")
    if not health["alive"]:
        problems.append("the relay did not survive")
    if health["peak_rss_mib"] >= TARGET_RSS_MIB:
        problems.append("peak RSS over target")
    for problem in problems:
        print("FAIL:", problem)
    return not problems


def print_logs(workdir: Path) -> None:
    for log in workdir.glob("*/relay.log"):
        print(f"--- {log}\n{log_tail(log)}", file=sys.stderr)


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="relay-fault-bench-") as tmp:
        setup, synapse = prepare(Path(tmp), APPSERVICE_ID, BOT_LOCALPART)
        print(f"starting Synapse in {tmp} ...", flush=True)
        await synapse.start()
        try:
            ingest = await ingest_under_kills(args, setup, synapse)
            print("ingest part done; faults next ...", flush=True)
            outcomes, health = await misbehaving_homeserver(args, setup, synapse)
        except Exception:
            print_logs(Path(tmp))
            raise
        finally:
            await synapse.stop()
        return 0 if report(ingest, outcomes, health) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000, help="events posted (2000)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs during the stream (20)")
    parser.add_argument("--seconds", type=float, default=60, help="stream duration (60)")
    parser.add_argument("--clients", type=int, default=20, help="clients per fault (20)")
    args = parser.parse_args()
    if min(args.events, args.kills, args.clients) < 1 or args.seconds <= 0:
        parser.error("counts must be >= 1 and --seconds > 0")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""Ingest benchmark: realistic appservice transactions pushed straight at the relay.

    python bench/ingest.py [--database sqlite|postgres|both] [--transactions N]
                           [--concurrency C] [--events E]

What it does, per database:
  1. a throwaway Synapse is started once (the relay checks ``/versions`` and ``whoami``
     at start-up, so it needs a real homeserver that loaded its registration);
  2. the relay runs as a **subprocess** (``python -m relay -c config.yaml``), so the
     load generator in this process never steals the relay's event loop;
  3. N transactions of E events each (about half with media: m.image/m.video with
     ``info.thumbnail_url``, m.file, m.audio; m.text with ~100-character bodies; a few
     m.room.member with avatars) are PUT to ``/_matrix/app/v1/transactions/{txnId}``
     in rooms matched by ``appservice.room_namespace``, C at a time (Synapse sends one
     at a time per appservice, hence the default of 1);
  4. it reports events/s, transactions/s and p50/p95/p99 acknowledgement latency, and
     checks that every transaction and media reference reached the database.

PostgreSQL: a fresh database is created next to ``--postgres-url`` (default
``postgresql://postgres@127.0.0.1:5432/test``, or ``$RELAY_BENCH_POSTGRES_URL``) and
dropped afterwards. Targets (issue): on PostgreSQL at least 2,000 events/s and a
50-event transaction acknowledged in under 50 ms at p99. The whole run, Synapse
start included, takes well under a minute with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from benchkit import (
    SERVER_NAME,
    RelaySetup,
    prepare,
    relay_config,
    relay_process,
    write_yaml,
)

from relay.core.events import extract_media
from relay.devtools.local_synapse import LocalSynapse

APPSERVICE_ID = "media-relay-bench"
BOT_LOCALPART = "mediarelaybench"
ROOMS = 20
WARMUP_TRANSACTIONS = 10
TARGET_EVENTS_PER_SECOND = 2000.0
TARGET_P99_MS = 50.0
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"

_WORDS = (
    *("the", "relay", "keeps", "links", "short", "lived", "so", "people", "outside"),
    *("matrix", "can", "see", "media", "without", "an", "account", "while", "the"),
    *("homeserver", "stays", "closed", "to", "anonymous", "downloads", "meeting"),
    *("notes", "photo", "from", "the", "trip", "screenshot", "attached", "please"),
)


# ---------------------------------------------------------------- synthetic events


class EventFactory:
    """Realistic client-format room events with unique ids and valid mxc URIs."""

    def __init__(self, run_id: str, rooms: list[str], users: list[str]) -> None:
        self.run_id = run_id
        self.rooms = rooms
        self.users = users
        self.counter = 0
        self.ts = int(time.time() * 1000)

    def _mxc(self) -> str:
        # token_urlsafe draws from [A-Za-z0-9_-], exactly the media id grammar.
        return f"mxc://{SERVER_NAME}/{secrets.token_urlsafe(18)}"

    def _envelope(self, event_type: str, content: dict[str, Any], n: int) -> dict[str, Any]:
        self.counter += 1
        self.ts += 7
        return {
            "type": event_type,
            "event_id": f"${self.run_id}_{self.counter}",
            "room_id": self.rooms[n % len(self.rooms)],
            "sender": self.users[n % len(self.users)],
            "origin_server_ts": self.ts,
            "content": content,
            "unsigned": {"age": 12},
        }

    def _text(self, n: int) -> dict[str, Any]:
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < 100:
            words.append(_WORDS[(n * 7 + len(words) * 3) % len(_WORDS)])
        return {"msgtype": "m.text", "body": " ".join(words)}

    def _thumbnail_info(self) -> dict[str, Any]:
        return {
            "thumbnail_url": self._mxc(),
            "thumbnail_info": {"w": 320, "h": 240, "mimetype": "image/jpeg", "size": 18_342},
        }

    def _media(self, n: int) -> dict[str, Any]:
        kind = n % 4
        if kind == 0:
            return {
                "msgtype": "m.image",
                "body": f"IMG_{n:05d}.jpg",
                "url": self._mxc(),
                "info": {
                    "w": 4032,
                    "h": 3024,
                    "mimetype": "image/jpeg",
                    "size": 2_483_117,
                    **self._thumbnail_info(),
                },
            }
        if kind == 1:
            return {
                "msgtype": "m.video",
                "body": f"clip-{n}.mp4",
                "url": self._mxc(),
                "info": {
                    "w": 1920,
                    "h": 1080,
                    "duration": 14_200,
                    "mimetype": "video/mp4",
                    "size": 9_811_204,
                    **self._thumbnail_info(),
                },
            }
        if kind == 2:
            return {
                "msgtype": "m.file",
                "body": f"report-{n}.pdf",
                "filename": f"report-{n}.pdf",
                "url": self._mxc(),
                "info": {"mimetype": "application/pdf", "size": 318_007},
            }
        return {
            "msgtype": "m.audio",
            "body": f"voice-{n}.ogg",
            "url": self._mxc(),
            "info": {"mimetype": "audio/ogg", "duration": 5_300, "size": 41_000},
        }

    def _member(self, n: int) -> dict[str, Any]:
        event = self._envelope(
            "m.room.member",
            {"membership": "join", "displayname": f"User {n}", "avatar_url": self._mxc()},
            n,
        )
        event["state_key"] = event["sender"]
        return event

    def transaction(self, size: int) -> list[dict[str, Any]]:
        """``size`` events: 3 memberships, then alternating media and text (~half media)."""
        events = [self._member(self.counter + i) for i in range(min(3, size))]
        for i in range(size - len(events)):
            n = self.counter + i
            content = self._media(n) if i % 2 == 0 else self._text(n)
            events.append(self._envelope("m.room.message", content, n))
        return events


@dataclass(frozen=True)
class Workload:
    bodies: list[bytes]  # serialised up front, so JSON encoding is not timed
    events: int
    media_events: int
    references: int


def build_workload(transactions: int, size: int) -> Workload:
    run_id = secrets.token_hex(4)
    rooms = [f"!bench{i}_{run_id}:{SERVER_NAME}" for i in range(ROOMS)]
    users = [f"@user{i}:{SERVER_NAME}" for i in range(50)]
    factory = EventFactory(run_id, rooms, users)
    bodies: list[bytes] = []
    events = media_events = references = 0
    for _ in range(transactions):
        batch = factory.transaction(size)
        for event in batch:
            count = len(extract_media(event).references)
            references += count
            media_events += count > 0
        events += len(batch)
        bodies.append(json.dumps({"events": batch}).encode())
    return Workload(bodies, events, media_events, references)


# ---------------------------------------------------------------- the relay under test


# ---------------------------------------------------------------- load


@dataclass(frozen=True)
class Result:
    database: str
    transactions: int
    events: int
    seconds: float
    latencies_ms: list[float]
    stored_transactions: int
    stored_references: int

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds

    @property
    def transactions_per_second(self) -> float:
        return self.transactions / self.seconds

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the acknowledgement latencies."""
        ordered = sorted(self.latencies_ms)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def push(
    session: aiohttp.ClientSession,
    base: str,
    hs_token: str,
    bodies: list[tuple[str, bytes]],
    concurrency: int,
) -> tuple[float, list[float]]:
    """PUT every body, ``concurrency`` in flight; return (wall seconds, latencies in ms)."""
    headers = {"Authorization": f"Bearer {hs_token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    queue: Iterator[tuple[str, bytes]] = iter(bodies)

    async def worker() -> None:
        for txn_id, body in queue:
            started = time.perf_counter()
            async with session.put(
                f"{base}/_matrix/app/v1/transactions/{txn_id}", data=body, headers=headers
            ) as response:
                answer = await response.read()
            latencies.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise RuntimeError(f"transaction {txn_id}: {response.status} {answer[:200]!r}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def count_rows(database: str) -> tuple[int, int]:
    """(transactions, media references) the relay committed."""
    queries = ("SELECT count(*) FROM as_transaction", "SELECT count(*) FROM media_reference")
    if database.startswith("sqlite:"):
        with contextlib.closing(sqlite3.connect(database[len("sqlite:") :])) as conn:
            txns, refs = (conn.execute(q).fetchone()[0] for q in queries)
            return txns, refs
    conn = await asyncpg.connect(database)
    try:
        return await conn.fetchval(queries[0]), await conn.fetchval(queries[1])
    finally:
        await conn.close()


async def bench_one(
    name: str,
    database: str,
    setup: RelaySetup,
    synapse: LocalSynapse,
    workload: Workload,
    concurrency: int,
) -> Result:
    workdir = setup.workdir / name
    workdir.mkdir(exist_ok=True)
    config = write_yaml(
        workdir / "config.yaml",
        relay_config(
            setup,
            synapse,
            database=database,
            cache_dir=workdir / "cache",
            appservice={"room_namespace": ["!bench.*"]},
        ),
    )
    prefix = f"{name}-{secrets.token_hex(3)}"
    bodies = [(f"{prefix}-{i}", body) for i, body in enumerate(workload.bodies)]
    warmup, measured = bodies[:WARMUP_TRANSACTIONS], bodies[WARMUP_TRANSACTIONS:]
    base = f"http://127.0.0.1:{setup.internal_port}"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with (
        relay_process(config, setup.internal_port),
        aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        ) as session,
    ):
        await push(session, base, setup.hs_token, warmup, 1)
        seconds, latencies = await push(session, base, setup.hs_token, measured, concurrency)
    stored_txns, stored_refs = await count_rows(database)
    events_per_txn = workload.events // len(workload.bodies)
    return Result(
        name,
        len(measured),
        len(measured) * events_per_txn,
        seconds,
        latencies,
        stored_txns,
        stored_refs,
    )


@contextlib.asynccontextmanager
async def fresh_postgres(admin_url: str) -> Any:
    name = f"relay_bench_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield admin_url.rpartition("/")[0] + "/" + name
    finally:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


# ---------------------------------------------------------------- report


def report(results: list[Result], workload: Workload, concurrency: int) -> bool:
    per_txn = workload.events // len(workload.bodies)
    print()
    print(
        f"{per_txn} events per transaction, {workload.media_events / workload.events:.0%} "
        f"with media, {workload.references / workload.events:.2f} media references per event, "
        f"concurrency {concurrency}, {WARMUP_TRANSACTIONS} warm-up transactions not counted"
    )
    header = (
        f"{'database':<10} {'txns':>6} {'events':>7} {'events/s':>9} {'txns/s':>7} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7}  verdict"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for r in results:
        complete = (
            r.stored_transactions == len(workload.bodies)
            and r.stored_references == workload.references
        )
        verdict = (
            "stored OK"
            if complete
            else (f"MISSING DATA ({r.stored_transactions} txns, {r.stored_references} refs stored)")
        )
        if r.database == "postgres":
            meets = r.events_per_second >= TARGET_EVENTS_PER_SECOND and (
                r.percentile(99) < TARGET_P99_MS
            )
            verdict = ("PASS" if meets else "FAIL") + f", {verdict}"
            ok &= meets
        ok &= complete
        print(
            f"{r.database:<10} {r.transactions:>6} {r.events:>7} {r.events_per_second:>9.0f} "
            f"{r.transactions_per_second:>7.1f} {r.percentile(50):>7.1f} "
            f"{r.percentile(95):>7.1f} {r.percentile(99):>7.1f} {max(r.latencies_ms):>7.1f}"
            f"  {verdict}"
        )
    print(
        f"targets (PostgreSQL): >= {TARGET_EVENTS_PER_SECOND:.0f} events/s and "
        f"p99 < {TARGET_P99_MS:.0f} ms per {per_txn}-event transaction"
    )
    return ok


async def run(args: argparse.Namespace) -> int:
    databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    total = args.transactions + WARMUP_TRANSACTIONS
    workload = build_workload(total, args.events)
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        setup, synapse = prepare(Path(tmp), APPSERVICE_ID, BOT_LOCALPART)
        started = time.monotonic()
        print(f"starting Synapse in {tmp} ...", flush=True)
        await synapse.start()
        print(f"Synapse ready after {time.monotonic() - started:.1f} s", flush=True)
        results: list[Result] = []
        try:
            for name in databases:
                print(f"{name}: {args.transactions} transactions ...", flush=True)
                if name == "sqlite":
                    db = f"sqlite:{Path(tmp) / 'relay.db'}"
                    results.append(
                        await bench_one(name, db, setup, synapse, workload, args.concurrency)
                    )
                else:
                    async with fresh_postgres(args.postgres_url) as db:
                        results.append(
                            await bench_one(name, db, setup, synapse, workload, args.concurrency)
                        )
        finally:
            await synapse.stop()
    return 0 if report(results, workload, args.concurrency) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--transactions", type=int, default=1000, help="measured transactions per database"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="transactions in flight (Synapse sends one at a time per appservice)",
    )
    parser.add_argument("--events", type=int, default=50, help="events per transaction")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("RELAY_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="an existing database to connect to; a fresh one is created beside it",
    )
    args = parser.parse_args()
    if args.transactions < 1 or args.concurrency < 1 or args.events < 4:
        parser.error("--transactions and --concurrency must be >= 1, --events >= 4")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())

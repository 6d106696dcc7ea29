"""How soon another relay process honours a revocation: pushed (PostgreSQL) or polled (SQLite).

A child OS process follows the database as a relay process does (the feed
:func:`relay.store.revocation_feed.revocation_feed` gives it, and
:meth:`RevocationCheck.watch`) and prints when it applied each revocation. This process
revokes fresh items one at a time, in turn as a redaction (ingest's commit), the
operator (``media-relay revoke``'s code) and the homeserver (revalidation's), at random
intervals, and times each from just before the revocation's transaction began to the
moment the other process refused the item (both clocks are this machine's).
Target: median < 150 ms, worst < 1 s.

    .venv/bin/python bench/revocation_latency.py [--database postgres|sqlite] [--trials 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from relay.core.ingest_plan import RoomPolicy, plan_transaction
from relay.core.mxc import MediaId
from relay.media.revocation import RevocationCheck
from relay.store import Store, open_database
from relay.store.revocation_feed import revocation_feed
from relay.store.takedown import HOMESERVER, OPERATOR, REDACTION, Takedowns

POSTGRES = os.environ.get("RELAY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ROOM = "!bench:example.org"
BOT = "@mediarelay:example.org"
POLICY = RoomPolicy.build(BOT, ["example.org"], [])


async def follow(url: str) -> None:
    """The child: apply revocations as a relay process does; print "<media id> <time>"."""
    db = await open_database(url)
    feed = revocation_feed(db)

    async def discovered(media: MediaId) -> None:
        print(media.media_id, repr(time.time()), flush=True)

    check = RevocationCheck(Store(db), on_discovered=discovered)
    await feed.start()
    watcher = asyncio.create_task(check.watch(feed))
    await asyncio.sleep(0.2)  # the watch has read the cursor
    print("ready", flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await feed.close()
        await db.stop()


def event(event_id: str, kind: str, content: dict[str, object]) -> dict[str, object]:
    return {
        "type": kind,
        "room_id": ROOM,
        "event_id": event_id,
        "sender": "@alice:example.org",
        "state_key": BOT if kind == "m.room.member" else None,
        "origin_server_ts": 1,
        "content": content,
    }


async def commit(store: Store, events: list[dict[str, object]]) -> None:
    clean = [{k: v for k, v in e.items() if v is not None} for e in events]
    plan = plan_transaction(clean, await store.served_rooms({ROOM}), POLICY)
    await store.commit_transaction(secrets.token_hex(8), plan)


async def revoke(store: Store, takedowns: Takedowns, source: str) -> tuple[MediaId, float]:
    """Revoke a fresh item as ``source`` would; when the revoking transaction began."""
    media = MediaId("example.org", secrets.token_hex(8))
    if source != REDACTION:
        started = time.time()
        await takedowns.revoke(media, source)
        return media, started
    event_id = "$" + secrets.token_hex(8)
    image = {"msgtype": "m.image", "body": "a.jpg", "url": f"mxc://example.org/{media.media_id}"}
    await commit(store, [event(event_id, "m.room.message", image)])
    started = time.time()
    redaction = event("$r" + secrets.token_hex(8), "m.room.redaction", {"redacts": event_id})
    await commit(store, [redaction])
    return media, started


async def measure(url: str, trials: int) -> list[float]:
    db = await open_database(url)
    store, takedowns = Store(db), Takedowns(db)
    await commit(store, [event("$invite", "m.room.member", {"membership": "invite"})])
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--follow",
        url,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert (await child.stdout.readline()).strip() == b"ready"
        latencies = []
        for trial in range(trials):
            await asyncio.sleep(random.uniform(0.05, 0.6))  # not in step with any poll
            source = (REDACTION, OPERATOR, HOMESERVER)[trial % 3]
            media, started = await revoke(store, takedowns, source)
            line = (await asyncio.wait_for(child.stdout.readline(), 10)).decode().split()
            if line[0] != media.media_id:
                raise RuntimeError(f"expected {media.media_id}, the other process saw {line}")
            latencies.append(float(line[1]) - started)
        return latencies
    finally:
        child.stdin.close()
        await child.wait()
        await db.stop()


async def fresh_postgres() -> tuple[str, str]:
    name = f"relay_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(POSTGRES)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return POSTGRES.rpartition("/")[0] + "/" + name, name


async def drop_postgres(name: str) -> None:
    conn = await asyncpg.connect(POSTGRES)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--follow", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follow:
        await follow(args.follow)
        return
    with tempfile.TemporaryDirectory() as tmp:
        name = ""
        if args.database == "postgres":
            url, name = await fresh_postgres()
        else:
            url = f"sqlite:{Path(tmp) / 'relay.db'}"
        try:
            latencies = await measure(url, args.trials)
        finally:
            if name:
                await drop_postgres(name)
    ms = sorted(1000 * t for t in latencies)
    p90 = ms[max(0, round(0.9 * len(ms)) - 1)]
    print(
        f"{args.database}: {len(ms)} revocations seen by another process:"
        f" median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms,"
        f" min {ms[0]:.1f} ms, max {ms[-1]:.1f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())

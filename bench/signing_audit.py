"""Signing throughput of the bridge API with the audit trail on and off.

The real :class:`~relay.web.bridge_api.BridgeAPI` (token check, body parsing, the
revocation and seen-media checks against a real database, minting) serves
``POST /_relay/v1/sign`` on a loopback port in this process; a load generator in a child
process (so it does not share the event loop) keeps C requests in flight for D seconds.
Rounds alternate between audit off (no writer) and on (the relay's
:class:`~relay.store.audit.AuditWriter` on the same database); the median of each is
reported. Target: with the audit on, at least 90 % of the throughput without it, and
every granted link recorded.

    .venv/bin/python bench/signing_audit.py [--database sqlite|postgres] [--seconds 3]
                                            [--rounds 3] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from relay.config.settings import BridgeConfig
from relay.core.ingest_plan import RoomPolicy, plan_transaction
from relay.core.minting import LinkMinter
from relay.core.mxc import MediaId
from relay.core.signing import KeyRing, SigningKey
from relay.media.revocation import RevocationCheck
from relay.store import Store, open_database
from relay.store.audit import AuditTrail, AuditWriter
from relay.support.metrics import Metrics
from relay.web.bridge_api import BridgeAPI
from relay.web.middleware import error_middleware

TOKEN = "bench-bridge-token-" + "x" * 32
MEDIA = MediaId("example.org", "benchmedia")
TARGET = 0.90
POSTGRES_URL = os.environ.get(
    "RELAY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def _load(url: str, seconds: float, concurrency: int, out: Any) -> None:
    """Child process: keep ``concurrency`` signs in flight for ``seconds``; send the count."""

    async def run() -> int:
        done = 0
        deadline = time.monotonic() + seconds
        body = {"mxc": f"mxc://{MEDIA.server_name}/{MEDIA.media_id}", "filename": "cat.png"}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as session:

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    async with session.post(url, json=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"sign answered {resp.status}")
                    done += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done

    out.send(asyncio.run(run()))


async def seed(store: Store) -> None:
    """One image seen in a served room, so the default require_seen check passes."""
    room, bot = "!bench:example.org", "@relay:example.org"
    events = [
        {
            "type": "m.room.member",
            "room_id": room,
            "event_id": "$invite",
            "sender": "@admin:example.org",
            "state_key": bot,
            "origin_server_ts": 1,
            "content": {"membership": "invite"},
        },
        {
            "type": "m.room.message",
            "room_id": room,
            "event_id": "$image",
            "sender": "@alice:example.org",
            "origin_server_ts": 2,
            "content": {
                "msgtype": "m.image",
                "body": "cat.png",
                "url": f"mxc://{MEDIA.server_name}/{MEDIA.media_id}",
            },
        },
    ]
    plan = plan_transaction(events, set(), RoomPolicy.build(bot, ["example.org"], []))
    await store.commit_transaction("seed", plan)


async def serve(api: BridgeAPI) -> tuple[web.AppRunner, str]:
    app = web.Application(middlewares=[error_middleware])
    app.add_routes(api.routes())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/_relay/v1/sign"


async def one_round(store: Store, audit: AuditWriter | None, args: argparse.Namespace) -> int:
    """Signs answered 200 in one window of ``args.seconds``."""
    ring = KeyRing([SigningKey("k1", secrets.token_bytes(32))])
    revocations = RevocationCheck(store)
    api = BridgeAPI(
        [BridgeConfig(name="bench", token=TOKEN, ttl=3600)],
        LinkMinter(ring, "https://relay.example/media/"),
        store,
        revocations,
        Metrics(),
        default_ttl=3600,
        require_seen=True,
        audit=audit,
    )
    runner, url = await serve(api)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_load, args=(url, args.seconds, args.concurrency, send))
    child.start()
    try:
        count = int(await asyncio.to_thread(receive.recv))
    finally:
        await asyncio.to_thread(child.join)
        await runner.cleanup()
        await revocations.close()
    # The child times its own window, so its start-up is not counted.
    return count


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    drop: str | None = None
    if args.database == "postgres":
        drop = f"relay_bench_{secrets.token_hex(6)}"
        admin = await asyncpg.connect(args.postgres_url)
        await admin.execute(f'CREATE DATABASE "{drop}"')
        await admin.close()
        url = f"{args.postgres_url.rpartition('/')[0]}/{drop}"
    else:
        url = f"sqlite:{workdir / 'relay.db'}"
    db = await open_database(url)
    try:
        store = Store(db)
        await seed(store)
        trail = AuditTrail(db)
        off: list[int] = []
        on: list[int] = []
        recorded_before = await db.fetchval("SELECT COUNT(*) FROM signing_audit")
        for _ in range(args.rounds):
            off.append(await one_round(store, None, args))
            writer = AuditWriter(trail)
            writer.start()
            on.append(await one_round(store, writer, args))
            await writer.close()
        recorded = await db.fetchval("SELECT COUNT(*) FROM signing_audit") - recorded_before
    finally:
        await db.stop()
        if drop is not None:
            admin = await asyncpg.connect(args.postgres_url)
            await admin.execute(f'DROP DATABASE IF EXISTS "{drop}" WITH (FORCE)')
            await admin.close()
    granted = sum(on)
    ratio = statistics.median(on) / statistics.median(off)
    print(f"{args.database}, {args.concurrency} in flight, {args.rounds} x {args.seconds} s")
    for name, counts in (("off", off), ("on", on)):
        rates = ", ".join(f"{c / args.seconds:.0f}" for c in counts)
        median = statistics.median(counts) / args.seconds
        print(f"  audit {name:3}: {median:8.0f} signs/s (rounds: {rates})")
    print(f"  ratio {ratio:.1%} (target >= {TARGET:.0%}); {recorded} audit rows, {granted} granted")
    ok = ratio >= TARGET and recorded == granted
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

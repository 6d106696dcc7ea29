"""The signing audit trail on real SQLite and PostgreSQL: rows, batches, retention."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from mautrix.util.async_db import Database

from relay.core.mxc import MediaId
from relay.core.variant import Thumbnail
from relay.store import open_database
from relay.store.audit import AuditRow, AuditTrail, AuditWriter

CAT = MediaId("example.org", "cat")
DOG = MediaId("example.org", "dog")


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await open_database(database_url)
    try:
        yield database
    finally:
        await database.stop()


async def test_rows_round_trip_in_time_order(db: Database) -> None:
    """Rows come back for their media only, oldest first, with every field intact."""
    trail = AuditTrail(db)
    rows = [
        AuditRow(3_000, "irc", CAT, "thumb-64x48-crop", 9_000),
        AuditRow(1_000, "cli", CAT, "original", 5_000),
        AuditRow(2_000, "slack", DOG, "original", 6_000),
    ]
    await trail.insert(rows)
    assert await trail.for_media(CAT) == [rows[1], rows[0]]
    assert await trail.for_media(MediaId("example.org", "none")) == []
    assert rows[0].as_json() == {
        "signed_at": 3_000,
        "bridge": "irc",
        "mxc": "mxc://example.org/cat",
        "variant": "thumb-64x48-crop",
        "expires_at": 9_000,
    }


async def test_sweep_removes_only_older_rows(db: Database) -> None:
    """The retention sweep deletes rows signed before the cut-off and counts them."""
    trail = AuditTrail(db)
    await trail.insert([AuditRow(t, "b", CAT, "original", t + 10) for t in (100, 200, 300)])
    assert await trail.sweep(250) == 2
    assert [r.signed_at for r in await trail.for_media(CAT)] == [300]
    assert await trail.sweep(250) == 0


async def test_writer_batches_and_flushes_on_close(db: Database) -> None:
    """Recording is I/O-free; rows reach the database within the interval, the rest on close."""
    trail = AuditTrail(db)
    writer = AuditWriter(trail, interval=0.05, clock=lambda: 12.5)
    writer.start()
    writer.signed("irc", CAT, None, 100)
    writer.signed("irc", CAT, Thumbnail(32, 32, "crop"), 100)
    assert await trail.for_media(CAT) == []  # not written by signed() itself
    for _ in range(100):
        if len(await trail.for_media(CAT)) == 2:
            break
        await asyncio.sleep(0.02)
    assert await trail.for_media(CAT) == [
        AuditRow(12_500, "irc", CAT, "original", 100_000),
        AuditRow(12_500, "irc", CAT, "thumb-32x32-crop", 100_000),
    ]
    writer.signed("slack", DOG, None, 7)
    await writer.close()
    assert [r.bridge for r in await trail.for_media(DOG)] == ["slack"]


async def test_writer_keeps_rows_while_the_database_fails(db: Database) -> None:
    """A failed batch is kept and written by the next flush: nothing granted goes unrecorded."""

    class Flaky(AuditTrail):
        failures = 1

        async def insert(self, rows: list[AuditRow]) -> None:  # type: ignore[override]
            if self.failures:
                self.failures -= 1
                raise ConnectionError("database down")
            await super().insert(rows)

    trail = Flaky(db)
    writer = AuditWriter(trail)
    writer.signed("irc", CAT, None, 1)
    await writer.flush()
    assert await trail.for_media(CAT) == []
    writer.signed("irc", CAT, None, 2)
    await writer.flush()
    assert [r.expires_at for r in await trail.for_media(CAT)] == [1_000, 2_000]

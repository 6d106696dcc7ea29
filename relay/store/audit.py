"""The audit trail: one row for every signed link (who, what, which variant, until when).

Written by the bridge API and ``media-relay sign``, read by ``media-relay audit``,
swept after ``signing.audit_retention``. Times are milliseconds since the epoch, like
the bridge API's ``expires_at``.

The bridge API must stay fast, so it does not wait for the database: it hands rows to
an :class:`AuditWriter`, which writes them in batches (one ``executemany`` per
:data:`FLUSH_INTERVAL`, or sooner when :data:`MAX_BATCH` rows wait). The price is that
a crash loses at most the last fraction of a second of rows; a database failure keeps
them (up to :data:`MAX_PENDING`) for the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection, Database, Scheme

from relay.core.mxc import MediaId
from relay.core.variant import Variant, variant_key

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.2
MAX_BATCH = 500
# Rows held while the database fails; beyond this the oldest are dropped (and logged),
# so an outage never grows memory without bound.
MAX_PENDING = 50_000
CLI = "cli"
# The retention sweep runs this often (at most; more often when the retention is short).
SWEEP_INTERVAL = 3600.0
COLUMNS = ("signed_at", "bridge", "server_name", "media_id", "variant", "expires_at")


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One signed link. ``variant`` is ``original`` or ``thumb-WxH-method[-animated]``."""

    signed_at: int
    bridge: str
    media: MediaId
    variant: str
    expires_at: int

    @classmethod
    def now(
        cls, bridge: str, media: MediaId, variant: Variant, expires_at_s: int, clock: float
    ) -> AuditRow:
        return cls(int(clock * 1000), bridge, media, variant_key(variant), expires_at_s * 1000)

    def as_json(self) -> dict[str, Any]:
        """What ``media-relay audit`` prints (the contract's names)."""
        return {
            "signed_at": self.signed_at,
            "bridge": self.bridge,
            "mxc": f"mxc://{self.media.server_name}/{self.media.media_id}",
            "variant": self.variant,
            "expires_at": self.expires_at,
        }


class AuditTrail:
    """The ``signing_audit`` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(self, rows: Sequence[AuditRow]) -> None:
        """Write rows in one transaction: COPY on PostgreSQL, one executemany on SQLite."""
        if not rows:
            return
        records = [
            (r.signed_at, r.bridge, r.media.server_name, r.media.media_id, r.variant, r.expires_at)
            for r in rows
        ]
        conn: Connection
        async with self.db.acquire() as conn, conn.transaction():
            if self.db.scheme in (Scheme.POSTGRES, Scheme.COCKROACH):
                # COPY: measured the cheapest way in (bench/signing_audit.py).
                await conn.copy_records_to_table("signing_audit", records=records, columns=COLUMNS)
                return
            await conn.executemany(
                "INSERT INTO signing_audit (signed_at, bridge, server_name, media_id, variant,"
                " expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
                records,
            )

    async def for_media(self, media: MediaId) -> list[AuditRow]:
        """Every row kept for ``media``, oldest first (signing_audit_media_idx)."""
        rows = await self.db.fetch(
            "SELECT signed_at, bridge, variant, expires_at FROM signing_audit"
            " WHERE server_name = $1 AND media_id = $2 ORDER BY signed_at",
            media.server_name,
            media.media_id,
        )
        return [
            AuditRow(
                int(row["signed_at"]),
                str(row["bridge"]),
                media,
                str(row["variant"]),
                int(row["expires_at"]),
            )
            for row in rows
        ]

    async def sweep(self, before_ms: int) -> int:
        """Delete rows signed before ``before_ms``; returns how many went."""
        # RETURNING works on both databases (SQLite >= 3.35); a DELETE inside a CTE would not.
        gone = await self.db.fetch(
            "DELETE FROM signing_audit WHERE signed_at < $1 RETURNING signed_at", before_ms
        )
        return len(gone)

    async def sweep_forever(self, retention: int, *, wall: Callable[[], float] = time.time) -> None:
        """Delete rows older than ``retention`` seconds, now and every :data:`SWEEP_INTERVAL`."""
        while True:
            try:
                if swept := await self.sweep(math.floor((wall() - retention) * 1000)):
                    log.info("audit trail: removed %d rows older than %d s", swept, retention)
            except Exception:
                log.exception("audit trail sweep failed; trying again later")
            await asyncio.sleep(min(SWEEP_INTERVAL, retention))


class AuditWriter:
    """Collects rows without I/O and writes them in batches (see the module docstring)."""

    def __init__(
        self,
        trail: AuditTrail,
        *,
        interval: float = FLUSH_INTERVAL,
        max_batch: int = MAX_BATCH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._trail = trail
        self._interval = interval
        self._max_batch = max_batch
        self._clock = clock
        self._pending: list[AuditRow] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def signed(self, bridge: str, media: MediaId, variant: Variant, expires_at: int) -> None:
        """Record one link (``expires_at`` in seconds, as minted); returns at once."""
        self._pending.append(AuditRow.now(bridge, media, variant, expires_at, self._clock()))
        if len(self._pending) >= self._max_batch:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit writer")

    async def flush(self) -> None:
        """Write what is pending now; on failure keep it for the next attempt."""
        rows, self._pending = self._pending, []
        try:
            await self._trail.insert(rows)
        except Exception:
            log.exception("could not write %d audit rows; will retry", len(rows))
            self._pending = rows + self._pending
            excess = len(self._pending) - MAX_PENDING
            if excess > 0:
                del self._pending[:excess]
                self.dropped += excess
                log.error("audit trail: dropped %d rows the database would not take", excess)

    async def close(self) -> None:
        """Stop the loop and write what is left (call before the database closes)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            if self._pending:
                await self.flush()

"""Revocations in commit order, and a nudge when there are new ones.

Every relay process follows ``revoked_media`` by ``seq`` (schema v6), a cursor that
grows in commit order: a writer takes :data:`_ORDER_LOCK` (a PostgreSQL advisory lock
held to its commit) before its row is numbered, so a reader that has seen ``seq`` n
will never later find a committed row below n. SQLite has one writer at a time anyway.
``revoked_at`` is no cursor: it comes from the writers' clocks and may tie or skew.

On PostgreSQL the writer also sends ``NOTIFY relay_revocations`` in the same
transaction (delivered at commit, not at all on rollback), and each process keeps one
dedicated connection that LISTENs, so it reads the new rows at once. NOTIFY is not
durable: whatever was committed while that connection was down is read from the
cursor when it is back, and a slow poll remains as a safety net. On SQLite the feed
polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg
from mautrix.util.async_db import Connection, Database, Scheme

from relay.core.mxc import MediaId

log = logging.getLogger(__name__)

# The values of revoked_media.source (and of the relay_revocations_by_source label).
REDACTION = "redaction"
OPERATOR = "operator"
HOMESERVER = "homeserver"
SOURCES = (REDACTION, OPERATOR, HOMESERVER)

CHANNEL = "relay_revocations"
# pg_stat_activity shows the listening connection under this name.
APPLICATION_NAME = "media-relay revocation feed"
# Arbitrary, fixed: the relay's only advisory lock on revoked_media's numbering.
_ORDER_LOCK = 0x7265766F6B6564  # "revoked"
POLL_INTERVAL = 0.5  # SQLite: how often to look
SAFETY_INTERVAL = 5.0  # PostgreSQL: how often to look even without a notification
RECONNECT_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)  # then 5 s each time
CONNECT_TIMEOUT = 5.0
BATCH = 1_000


async def record_revocation(
    conn: Connection, media: MediaId, event_id: str, source: str, now: int
) -> bool:
    """Revoke ``media`` inside the caller's transaction; False if it was revoked already.

    The first revocation wins: its source and time stay (rows are never deleted).
    """
    postgres = conn.scheme == Scheme.POSTGRES
    if postgres:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _ORDER_LOCK)
    inserted = await conn.fetchval(
        "INSERT INTO revoked_media (server_name, media_id, event_id, revoked_at, source)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (server_name, media_id) DO NOTHING"
        " RETURNING media_id",
        media.server_name,
        media.media_id,
        event_id,
        now,
        source,
    )
    if inserted is not None and postgres:
        # An empty payload means "look now"; PostgreSQL sends one per transaction.
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    return inserted is not None


class RevocationFeed:
    """Polls ``revoked_media`` past a cursor (SQLite; the base of the PostgreSQL feed)."""

    def __init__(self, db: Database, *, interval: float = POLL_INTERVAL) -> None:
        self.db = db
        self.interval = interval

    async def start(self) -> None:
        """Nothing to start when polling."""

    async def close(self) -> None:
        """Nothing to stop when polling."""

    async def head(self) -> int:
        """The cursor of the newest revocation committed so far (0 when none)."""
        return int(await self.db.fetchval("SELECT COALESCE(MAX(seq), 0) FROM revoked_media"))

    async def after(self, cursor: int) -> list[tuple[int, MediaId]]:
        """Revocations past ``cursor``, in commit order (at most :data:`BATCH` at a time)."""
        rows = await self.db.fetch(
            "SELECT seq, server_name, media_id FROM revoked_media WHERE seq > $1"
            " ORDER BY seq LIMIT $2",
            cursor,
            BATCH,
        )
        return [(int(r["seq"]), MediaId(r["server_name"], r["media_id"])) for r in rows]

    async def wait(self) -> None:
        """Return when there may be new revocations (here: after the interval)."""
        await asyncio.sleep(self.interval)

    def live_period(self) -> int | None:
        """Which live period this is (None: not live); polling is always live."""
        return 0


class ListeningFeed(RevocationFeed):
    """PostgreSQL: LISTEN on a dedicated connection; reconnect, and poll slowly too."""

    def __init__(
        self,
        db: Database,
        dsn: str,
        *,
        interval: float = SAFETY_INTERVAL,
        reconnect_delays: tuple[float, ...] = RECONNECT_DELAYS,
    ) -> None:
        super().__init__(db, interval=interval)
        self._dsn = dsn
        self._reconnect_delays = reconnect_delays
        self._nudge = asyncio.Event()
        self._connected = asyncio.Event()
        self._period = 0  # one per listening connection (live_period)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin listening; waits briefly for the first connection (polling meanwhile)."""
        self._task = asyncio.create_task(self._listen_forever())
        try:
            await asyncio.wait_for(self._connected.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            log.warning("revocation feed: not listening yet; polling every %.1f s", self.interval)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait(self) -> None:
        """Return on a notification, after a reconnection, or after the safety interval."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._nudge.wait(), self.interval)
        self._nudge.clear()

    def live_period(self) -> int | None:
        """Which listening connection is up (a new number each); None while none is."""
        return self._period if self._connected.is_set() else None

    def _notified(self, *_: Any) -> None:
        self._nudge.set()

    async def _listen_forever(self) -> None:
        failures = 0
        again = False
        while True:
            try:
                await self._listen_once(again=again)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._connected.clear()
                again = True
                # Lost after listening: the first delay again; failing to connect: longer.
                failures = 1 if isinstance(e, _Lost) else failures + 1
                delay = self._reconnect_delays[min(failures, len(self._reconnect_delays)) - 1]
                log.warning(
                    "revocation feed: %s: %s; reconnecting in %.1f s", type(e).__name__, e, delay
                )
                await asyncio.sleep(delay)

    async def _listen_once(self, *, again: bool) -> None:
        """Listen until the connection is lost (raises :class:`_Lost` then)."""
        lost = asyncio.Event()
        conn = await asyncpg.connect(
            self._dsn,
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": APPLICATION_NAME},
        )
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(CHANNEL, self._notified)
            if again:
                log.info("revocation feed: listening again")
            self._period += 1
            self._connected.set()
            # What was committed while nobody listened is read from the cursor.
            self._nudge.set()
            try:
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), self.interval)
                    if not lost.is_set():
                        # A silent network failure sends no termination: ask.
                        await conn.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT)
            except Exception as e:
                raise _Lost(f"{type(e).__name__}: {e}") from e
            raise _Lost("the listening connection was closed")
        finally:
            if not conn.is_closed():
                conn.terminate()


class _Lost(ConnectionError):
    """The connection went away after it had listened (reconnect after the first delay)."""


def revocation_feed(db: Database) -> RevocationFeed:
    """The feed for this database: listening on PostgreSQL, polling on SQLite."""
    if db.scheme == Scheme.POSTGRES:
        return ListeningFeed(db, str(db.url))
    return RevocationFeed(db)

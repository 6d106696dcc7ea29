"""The outbox: follow-ups of a committed transaction that must survive a crash.

A transaction is answered 200 only after it commits, and what it asks of the rest of
the relay happens after that: decline an invite (a homeserver request), delete a
revoked item's cached files. Done only in memory, a crash between the commit and the
follow-up loses it for good: the homeserver never resends an acknowledged transaction.
So the follow-ups are written in the same database transaction as the events
(:func:`add_followups`), each row is deleted once its follow-up is done (:meth:`Outbox.done`),
and whatever is left is done at the next start (:meth:`Outbox.pending`).

Every follow-up is idempotent (leaving a room twice, purging a purged item), so a row
done twice (a crash after the follow-up but before the delete, two processes at start)
costs nothing. Joins need no row: a room to join is stored as ``joining`` in
``served_room`` until the join succeeds, and every start joins those.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from mautrix.util.async_db import Connection, Database


class Kind(enum.StrEnum):
    DECLINE = "decline"  # subject: a room id whose invite is declined
    PURGE = "purge"  # subject: an mxc URI whose cached files are deleted


@dataclass(frozen=True, slots=True, order=True)
class FollowUp:
    kind: Kind
    subject: str


async def add_followups(conn: Connection, followups: Iterable[FollowUp], now_ms: int) -> None:
    """Record ``followups`` on ``conn``, inside the caller's transaction."""
    rows = [(str(f.kind), f.subject, now_ms) for f in followups]
    if rows:
        await conn.executemany(
            "INSERT INTO outbox (kind, subject, created_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (kind, subject) DO NOTHING",
            rows,
        )


class Outbox:
    """Reads and clears the rows :func:`add_followups` wrote."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def pending(self) -> list[FollowUp]:
        """Every follow-up not done yet, oldest first (unknown kinds are skipped)."""
        rows = await self.db.fetch(
            "SELECT kind, subject FROM outbox ORDER BY created_at, kind, subject"
        )
        known = {k.value for k in Kind}
        return [FollowUp(Kind(r["kind"]), r["subject"]) for r in rows if r["kind"] in known]

    async def done(self, followup: FollowUp) -> None:
        await self.db.execute(
            "DELETE FROM outbox WHERE kind = $1 AND subject = $2",
            str(followup.kind),
            followup.subject,
        )

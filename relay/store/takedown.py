"""Revocations that do not come from a redaction: the operator's and the homeserver's.

A redaction revokes media when its last live reference goes (``Store.commit_transaction``);
these revoke media outright, for good, in the same ``revoked_media`` table with a
``source``: ``operator`` (``media-relay revoke``) or ``homeserver`` (revalidation found it
gone upstream). Every relay process on the database hears of it
(:mod:`relay.store.revocation_feed`) and stops serving it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mautrix.util.async_db import Connection, Database

from relay.core.mxc import MediaId
from relay.store.revocation_feed import (
    HOMESERVER,
    OPERATOR,
    REDACTION,
    SOURCES,
    record_revocation,
)
from relay.store.store import now_ms

__all__ = ["HOMESERVER", "OPERATOR", "REDACTION", "SOURCES", "Revoked", "Selector", "Takedowns"]


class Selector(StrEnum):
    """What ``media-relay revoke`` names: the media referenced by an event, room or sender."""

    EVENT = "event"
    ROOM = "room"
    SENDER = "sender"


@dataclass(frozen=True, slots=True)
class Revoked:
    """One media item a revocation covered; ``newly`` is False if it was revoked already."""

    media: MediaId
    newly: bool


# Fixed SQL per selector (never built from input). An event's edits go with it, as for
# a redaction (clients delete an edited message by redacting the original).
_REFERENCED_BY: dict[Selector, str] = {
    Selector.EVENT: "SELECT DISTINCT server_name, media_id, event_id FROM media_reference"
    " WHERE event_id = $1 OR replaces = $1",
    Selector.ROOM: "SELECT DISTINCT server_name, media_id, event_id FROM media_reference"
    " WHERE room_id = $1",
    Selector.SENDER: "SELECT DISTINCT server_name, media_id, event_id FROM media_reference"
    " WHERE sender = $1",
}


class Takedowns:
    """Operator and homeserver revocations (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def revoke(self, media: MediaId, source: str = OPERATOR, event_id: str = "") -> Revoked:
        """Revoke one media item, seen or not (an operator may act before it is posted)."""
        conn: Connection
        # A transaction: the numbering lock of record_revocation lasts until the commit.
        async with self.db.acquire() as conn, conn.transaction():
            return await _insert(conn, media, source, event_id, now_ms())

    async def revoke_referenced(self, selector: Selector, value: str) -> list[Revoked]:
        """Revoke every media item referenced by the event, room or sender ``value``.

        Redacted references count too: the operator names what was posted, and media
        already revoked is listed with ``newly`` False. Empty when nothing matched.
        """
        now = now_ms()
        conn: Connection
        async with self.db.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_REFERENCED_BY[selector], value)
            first_event: dict[MediaId, str] = {}
            for row in rows:
                media = MediaId(row["server_name"], row["media_id"])
                first_event.setdefault(media, row["event_id"])
            ordered = sorted(first_event, key=lambda m: (m.server_name, m.media_id))
            return [await _insert(conn, m, OPERATOR, first_event[m], now) for m in ordered]

    async def source(self, media: MediaId) -> str | None:
        """Who revoked ``media`` (one of :data:`SOURCES`), or None when it is not revoked."""
        value = await self.db.fetchval(
            "SELECT source FROM revoked_media WHERE server_name = $1 AND media_id = $2",
            media.server_name,
            media.media_id,
        )
        return None if value is None else str(value)


async def _insert(
    conn: Connection, media: MediaId, source: str, event_id: str, now: int
) -> Revoked:
    return Revoked(media, await record_revocation(conn, media, event_id, source, now))

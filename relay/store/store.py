"""Queries: everything the relay remembers goes through here."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from mautrix.util.async_db import Connection, Database

from relay.core.events import EncryptionInfo
from relay.core.ingest_plan import TransactionPlan
from relay.core.mxc import MediaId
from relay.core.records import MediaRecord

JOINING = "joining"
JOINED = "joined"
NAMESPACE = "namespace"


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What a newly committed transaction changed that other parts must act on."""

    revoked: tuple[MediaId, ...]
    rooms_to_join: tuple[str, ...]


def now_ms() -> int:
    return int(time.time() * 1000)


def _placeholders(count: int, start: int = 1) -> str:
    # Only generated "$n" markers go into the SQL text; values are always parameters.
    return ", ".join(f"${i}" for i in range(start, start + count))


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db

    # ------------------------------------------------------------ transactions

    async def transaction_seen(self, txn_id: str) -> bool:
        row = await self.db.fetchval("SELECT 1 FROM as_transaction WHERE txn_id = $1", txn_id)
        return row is not None

    async def served_rooms(self, room_ids: Iterable[str]) -> set[str]:
        ids = list(room_ids)
        if not ids:
            return set()
        # Only generated "$n" placeholders are interpolated; the ids are parameters.
        query = f"SELECT room_id FROM served_room WHERE room_id IN ({_placeholders(len(ids))})"  # noqa: S608
        rows = await self.db.fetch(query, *ids)
        return {row["room_id"] for row in rows}

    async def commit_transaction(self, txn_id: str, plan: TransactionPlan) -> CommitResult | None:
        """Apply the plan and remember the id, all in one database transaction.

        Returns None when the id was already committed (a retry, or a racing
        duplicate delivery): then nothing is written.
        """
        now = now_ms()
        conn: Connection
        async with self.db.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO as_transaction (txn_id, received_at, event_count) VALUES ($1, $2, $3)"
                " ON CONFLICT (txn_id) DO NOTHING RETURNING txn_id",
                txn_id,
                now,
                plan.events,
            )
            if inserted is None:
                return None
            await self._apply_rooms(conn, plan, now)
            await self._insert_references(conn, plan)
            for r in plan.redactions:
                await conn.execute(
                    "INSERT INTO redaction (redacted_event_id, redaction_id, room_id, redacted_at)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (redacted_event_id) DO NOTHING",
                    r.redacted_event_id,
                    r.redaction_id,
                    r.room_id,
                    now,
                )
            revoked = await self._revoke_redacted(conn, plan, now)
        return CommitResult(tuple(revoked), tuple(plan.rooms_to_serve))

    async def _apply_rooms(self, conn: Connection, plan: TransactionPlan, now: int) -> None:
        for room_id in plan.rooms_to_forget:
            await conn.execute("DELETE FROM served_room WHERE room_id = $1", room_id)
        for room_id, inviter in plan.rooms_to_serve.items():
            await conn.execute(
                "INSERT INTO served_room (room_id, state, inviter, updated_at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (room_id) DO UPDATE"
                " SET inviter = excluded.inviter, updated_at = excluded.updated_at",
                room_id,
                JOINING,
                inviter,
                now,
            )
        for room_id in plan.namespace_rooms:
            await conn.execute(
                "INSERT INTO served_room (room_id, state, inviter, updated_at)"
                " VALUES ($1, $2, NULL, $3) ON CONFLICT (room_id) DO NOTHING",
                room_id,
                NAMESPACE,
                now,
            )
        for room_id in plan.rooms_joined:
            await conn.execute(
                "INSERT INTO served_room (room_id, state, inviter, updated_at)"
                " VALUES ($1, $2, NULL, $3) ON CONFLICT (room_id) DO UPDATE"
                " SET state = excluded.state, updated_at = excluded.updated_at",
                room_id,
                JOINED,
                now,
            )

    async def _insert_references(self, conn: Connection, plan: TransactionPlan) -> None:
        rows = [
            (
                r.event_id,
                ".".join(r.ref.path),
                r.ref.media.server_name,
                r.ref.media.media_id,
                r.room_id,
                r.sender,
                str(r.ref.role),
                r.ref.mimetype,
                r.ref.size,
                r.ref.width,
                r.ref.height,
                r.ref.filename,
                r.ref.encryption.to_json() if r.ref.encryption else None,
                r.origin_ts,
                r.replaces,
            )
            for r in plan.references
        ]
        if rows:
            await conn.executemany(
                "INSERT INTO media_reference (event_id, path, server_name, media_id, room_id,"
                " sender, role, mimetype, size, width, height, filename, encryption, origin_ts,"
                " replaces)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
                " ON CONFLICT (event_id, path) DO NOTHING",
                rows,
            )

    async def _revoke_redacted(
        self, conn: Connection, plan: TransactionPlan, now: int
    ) -> list[MediaId]:
        """Revoke media of redacted events, whichever of event and redaction came first.

        An edit's media goes with its original: clients delete an edited message by
        redacting the original event. Only indexed lookups: the small ``redaction``
        table for this batch's events, and ``media_reference`` by event id and by
        ``replaces`` for this batch's redactions (a join over the whole reference
        table degrades as it grows).
        """
        targets: dict[MediaId, str] = {}
        candidates = sorted(
            {r.event_id for r in plan.references}
            | {r.replaces for r in plan.references if r.replaces is not None}
        )
        if candidates:
            # Only generated "$n" placeholders are interpolated; the ids are parameters.
            query = (
                "SELECT redacted_event_id FROM redaction"  # noqa: S608
                f" WHERE redacted_event_id IN ({_placeholders(len(candidates))})"
            )
            redacted = {row["redacted_event_id"] for row in await conn.fetch(query, *candidates)}
            for r in plan.references:
                if r.event_id in redacted:
                    targets.setdefault(r.ref.media, r.event_id)
                elif r.replaces is not None and r.replaces in redacted:
                    targets.setdefault(r.ref.media, r.replaces)
        for redaction in plan.redactions:
            for column in ("event_id", "replaces"):
                rows = await conn.fetch(
                    f"SELECT server_name, media_id FROM media_reference WHERE {column} = $1",  # noqa: S608 - fixed column names
                    redaction.redacted_event_id,
                )
                for row in rows:
                    media = MediaId(row["server_name"], row["media_id"])
                    targets.setdefault(media, redaction.redacted_event_id)
        revoked: list[MediaId] = []
        for media, event_id in targets.items():
            inserted = await conn.fetchval(
                "INSERT INTO revoked_media (server_name, media_id, event_id, revoked_at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (server_name, media_id) DO NOTHING"
                " RETURNING media_id",
                media.server_name,
                media.media_id,
                event_id,
                now,
            )
            if inserted is not None:
                revoked.append(media)
        return revoked

    # ------------------------------------------------------------ rooms

    async def rooms_joining(self) -> list[str]:
        rows = await self.db.fetch("SELECT room_id FROM served_room WHERE state = $1", JOINING)
        return [row["room_id"] for row in rows]

    async def mark_room_joined(self, room_id: str) -> None:
        await self.db.execute(
            "UPDATE served_room SET state = $1, updated_at = $2 WHERE room_id = $3",
            JOINED,
            now_ms(),
            room_id,
        )

    async def forget_room(self, room_id: str) -> None:
        await self.db.execute("DELETE FROM served_room WHERE room_id = $1", room_id)

    # ------------------------------------------------------------ media

    async def media_record(self, media: MediaId) -> MediaRecord | None:
        """The newest reference in a room still served, or None if the relay never saw it there."""
        row = await self.db.fetchrow(
            "SELECT m.room_id, m.event_id, m.mimetype, m.size, m.filename, m.encryption"
            " FROM media_reference m JOIN served_room s ON s.room_id = m.room_id"
            " WHERE m.server_name = $1 AND m.media_id = $2"
            " ORDER BY m.origin_ts DESC LIMIT 1",
            media.server_name,
            media.media_id,
        )
        if row is None:
            return None
        encryption = EncryptionInfo.from_json(row["encryption"]) if row["encryption"] else None
        return MediaRecord(
            media,
            row["room_id"],
            row["event_id"],
            row["mimetype"],
            row["size"],
            row["filename"],
            encryption,
        )

    async def is_revoked(self, media: MediaId) -> bool:
        row = await self.db.fetchval(
            "SELECT 1 FROM revoked_media WHERE server_name = $1 AND media_id = $2",
            media.server_name,
            media.media_id,
        )
        return row is not None

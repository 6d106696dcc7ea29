"""Queries: everything the relay remembers goes through here."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from mautrix.util.async_db import Connection, Database

from relay.core.attachment_keys import EncryptionInfo
from relay.core.ingest_plan import TransactionPlan
from relay.core.mxc import MediaId
from relay.core.records import MediaRecord
from relay.core.redactions import PowerLevels, redaction_applies
from relay.store.outbox import FollowUp, Kind, add_followups
from relay.store.revocation_feed import REDACTION, record_revocation

JOINING = "joining"
JOINED = "joined"
NAMESPACE = "namespace"
# Links are bound to one of these; a reference beyond the newest this many is not served.
MAX_REFERENCES = 200


@dataclass(frozen=True, slots=True)
class _LiveReference:
    event_id: str
    path: str
    media: MediaId
    room_id: str
    sender: str


@dataclass(frozen=True, slots=True)
class _StoredRedaction:
    redaction_id: str
    room_id: str
    sender: str
    sender_may_redact: bool


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
            await self._save_power_levels(conn, plan, now)
            for r in plan.redactions:
                await conn.execute(
                    "INSERT INTO redaction (redacted_event_id, redaction_id, room_id, sender,"
                    " sender_may_redact, redacted_at) VALUES ($1, $2, $3, $4, $5, $6)"
                    " ON CONFLICT (redacted_event_id, redaction_id) DO NOTHING",
                    r.redacted_event_id,
                    r.redaction_id,
                    r.room_id,
                    r.sender,
                    r.sender_may_redact,
                    now,
                )
            revoked = await self._apply_redactions(conn, plan, now)
            # In the same transaction: a crash before they are done leaves them for the
            # next start (relay.store.outbox). Joins are kept as served_room "joining".
            followups = [FollowUp(Kind.DECLINE, r) for r in sorted(plan.invites_to_decline)]
            followups += [FollowUp(Kind.PURGE, str(m)) for m in revoked]
            await add_followups(conn, followups, now)
        return CommitResult(tuple(revoked), tuple(plan.rooms_to_serve))

    async def power_levels(self, room_ids: Iterable[str]) -> dict[str, PowerLevels]:
        """The newest tracked ``m.room.power_levels`` of each of these rooms that has one."""
        ids = sorted(set(room_ids))
        if not ids:
            return {}
        # Only generated "$n" placeholders are interpolated; the ids are parameters.
        query = (
            "SELECT room_id, levels FROM room_power_levels"  # noqa: S608
            f" WHERE room_id IN ({_placeholders(len(ids))})"
        )
        rows = await self.db.fetch(query, *ids)
        return {row["room_id"]: PowerLevels.from_json(row["levels"]) for row in rows}

    async def _save_power_levels(self, conn: Connection, plan: TransactionPlan, now: int) -> None:
        for room_id, levels in plan.power_levels.items():
            await conn.execute(
                "INSERT INTO room_power_levels (room_id, levels, updated_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (room_id) DO UPDATE"
                " SET levels = excluded.levels, updated_at = excluded.updated_at",
                room_id,
                levels.to_json(),
                now,
            )

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

    async def _apply_redactions(
        self, conn: Connection, plan: TransactionPlan, now: int
    ) -> list[MediaId]:
        """Mark the references that redactions remove; revoke media left with none live.

        Whichever of event and redaction came first: this batch's references are
        checked against stored redactions, this batch's redactions against stored
        references. An edit's references go with its original (clients delete an edited
        message by redacting the original event). Each pair must pass the rule of
        :mod:`relay.core.redactions`. Only indexed lookups (by event id, ``replaces``
        and media): a join over the whole reference table degrades as it grows.
        """
        removed: dict[tuple[str, str], str] = {}  # (event id, path) -> redaction id
        first_event: dict[MediaId, str] = {}  # media -> a redacted event that referred to it

        def judge(ref: _LiveReference, redaction: _StoredRedaction) -> None:
            if (ref.event_id, ref.path) not in removed and redaction_applies(
                redaction_room=redaction.room_id,
                redaction_sender=redaction.sender,
                sender_may_redact=redaction.sender_may_redact,
                event_room=ref.room_id,
                event_sender=ref.sender,
            ):
                removed[(ref.event_id, ref.path)] = redaction.redaction_id
                first_event.setdefault(ref.media, ref.event_id)

        stored = await self._redactions_of(
            conn,
            {r.event_id for r in plan.references}
            | {r.replaces for r in plan.references if r.replaces is not None},
        )
        for r in plan.references:
            ref = _LiveReference(r.event_id, ".".join(r.ref.path), r.ref.media, r.room_id, r.sender)
            for target in (r.event_id, r.replaces):
                for redaction in stored.get(target or "", ()):
                    judge(ref, redaction)
        for d in plan.redactions:
            stored_redaction = _StoredRedaction(
                d.redaction_id, d.room_id, d.sender, d.sender_may_redact
            )
            for ref in await self._live_references_of(conn, d.redacted_event_id):
                judge(ref, stored_redaction)
        for (event_id, path), redaction_id in removed.items():
            await conn.execute(
                "UPDATE media_reference SET redacted_by = $1"
                " WHERE event_id = $2 AND path = $3 AND redacted_by IS NULL",
                redaction_id,
                event_id,
                path,
            )
        revoked: list[MediaId] = []
        for media in first_event:
            live = await conn.fetchval(
                "SELECT 1 FROM media_reference WHERE server_name = $1 AND media_id = $2"
                " AND redacted_by IS NULL LIMIT 1",
                media.server_name,
                media.media_id,
            )
            if live is not None:
                continue
            # For good: revocation.py remembers "revoked" without asking again.
            if await record_revocation(conn, media, first_event[media], REDACTION, now):
                revoked.append(media)
        return revoked

    async def _redactions_of(
        self, conn: Connection, event_ids: set[str]
    ) -> dict[str, list[_StoredRedaction]]:
        if not event_ids:
            return {}
        ids = sorted(event_ids)
        # Only generated "$n" placeholders are interpolated; the ids are parameters.
        query = (
            "SELECT redacted_event_id, redaction_id, room_id, sender, sender_may_redact"  # noqa: S608
            f" FROM redaction WHERE redacted_event_id IN ({_placeholders(len(ids))})"
        )
        found: dict[str, list[_StoredRedaction]] = {}
        for row in await conn.fetch(query, *ids):
            found.setdefault(row["redacted_event_id"], []).append(
                _StoredRedaction(
                    row["redaction_id"],
                    row["room_id"],
                    row["sender"],
                    bool(row["sender_may_redact"]),
                )
            )
        return found

    async def _live_references_of(self, conn: Connection, event_id: str) -> list[_LiveReference]:
        """Live references of ``event_id`` and of the edits that replace it."""
        refs: list[_LiveReference] = []
        for column in ("event_id", "replaces"):
            rows = await conn.fetch(
                "SELECT event_id, path, server_name, media_id, room_id, sender"  # noqa: S608 - fixed column names
                f" FROM media_reference WHERE {column} = $1 AND redacted_by IS NULL",
                event_id,
            )
            refs += [
                _LiveReference(
                    row["event_id"],
                    row["path"],
                    MediaId(row["server_name"], row["media_id"]),
                    row["room_id"],
                    row["sender"],
                )
                for row in rows
            ]
        return refs

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
        """The newest live reference in a room still served, or None if there is none."""
        references = await self.media_references(media, limit=1)
        return references[0] if references else None

    async def media_references(
        self, media: MediaId, *, limit: int = MAX_REFERENCES
    ) -> list[MediaRecord]:
        """The live references in rooms still served, newest first (at most ``limit``).

        A redacted reference is not live: what it said (its key, type, file name) no
        longer speaks for the media item, and links bound to it stop working.
        """
        rows = await self.db.fetch(
            "SELECT m.room_id, m.event_id, m.mimetype, m.size, m.filename, m.encryption"
            " FROM media_reference m JOIN served_room s ON s.room_id = m.room_id"
            " WHERE m.server_name = $1 AND m.media_id = $2 AND m.redacted_by IS NULL"
            " ORDER BY m.origin_ts DESC LIMIT $3",
            media.server_name,
            media.media_id,
            limit,
        )
        return [
            MediaRecord(
                media,
                row["room_id"],
                row["event_id"],
                row["mimetype"],
                row["size"],
                row["filename"],
                EncryptionInfo.from_json(row["encryption"]) if row["encryption"] else None,
            )
            for row in rows
        ]

    async def is_revoked(self, media: MediaId) -> bool:
        """Whether links to ``media`` must stop working: it lost its last live reference.

        For good: a later re-post does not bring the links back (``revoked_media`` rows
        are never deleted, and relay.media.revocation remembers "revoked" for good).
        """
        row = await self.db.fetchval(
            "SELECT 1 FROM revoked_media WHERE server_name = $1 AND media_id = $2",
            media.server_name,
            media.media_id,
        )
        return row is not None

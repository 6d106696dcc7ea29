"""Versioned schema migrations. Add new ones at the end; never edit a released one."""

from __future__ import annotations

from mautrix.util.async_db import Connection, Scheme, UpgradeTable

upgrade_table = UpgradeTable(version_table_name="relay_schema_version", database_name="relay")


# mautrix's register() is typed for the bare-decorator form only; this use is documented.
@upgrade_table.register(description="Transactions, rooms, media references, revocations")  # type: ignore[call-arg, arg-type, untyped-decorator]
async def upgrade_v1(conn: Connection, scheme: Scheme) -> None:
    # Appservice transaction ids already answered 200 (spec: the homeserver retries a
    # transaction with the same id until it is acknowledged, so ids must survive restarts).
    await conn.execute(
        """CREATE TABLE as_transaction (
            txn_id      TEXT PRIMARY KEY,
            received_at BIGINT NOT NULL,
            event_count INTEGER NOT NULL
        )"""
    )
    # Rooms whose media the relay serves: joined after an allowed invite, or in the
    # registration's room namespace.
    await conn.execute(
        """CREATE TABLE served_room (
            room_id    TEXT PRIMARY KEY,
            state      TEXT NOT NULL,
            inviter    TEXT,
            updated_at BIGINT NOT NULL
        )"""
    )
    await conn.execute(
        """CREATE TABLE media_reference (
            event_id    TEXT NOT NULL,
            path        TEXT NOT NULL,
            server_name TEXT NOT NULL,
            media_id    TEXT NOT NULL,
            room_id     TEXT NOT NULL,
            sender      TEXT NOT NULL,
            role        TEXT NOT NULL,
            mimetype    TEXT,
            size        BIGINT,
            width       INTEGER,
            height      INTEGER,
            filename    TEXT,
            encryption  TEXT,
            origin_ts   BIGINT NOT NULL,
            PRIMARY KEY (event_id, path)
        )"""
    )
    await conn.execute(
        "CREATE INDEX media_reference_media_idx ON media_reference (server_name, media_id)"
    )
    # Redactions are kept even when the redacted event was never seen: it may still arrive.
    await conn.execute(
        """CREATE TABLE redaction (
            redacted_event_id TEXT PRIMARY KEY,
            redaction_id      TEXT NOT NULL,
            room_id           TEXT NOT NULL,
            redacted_at       BIGINT NOT NULL
        )"""
    )
    await conn.execute(
        """CREATE TABLE revoked_media (
            server_name TEXT NOT NULL,
            media_id    TEXT NOT NULL,
            event_id    TEXT NOT NULL,
            revoked_at  BIGINT NOT NULL,
            PRIMARY KEY (server_name, media_id)
        )"""
    )


@upgrade_table.register(description="Edits: remember which event an edit replaces")  # type: ignore[call-arg, arg-type, untyped-decorator]
async def upgrade_v2(conn: Connection, scheme: Scheme) -> None:
    # Redacting an edited message's original must revoke media only its edits brought in.
    await conn.execute("ALTER TABLE media_reference ADD COLUMN replaces TEXT")
    await conn.execute("CREATE INDEX media_reference_replaces_idx ON media_reference (replaces)")

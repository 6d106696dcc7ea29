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


@upgrade_table.register(description="Redactions per reference; room power levels")  # type: ignore[call-arg, arg-type, untyped-decorator]
async def upgrade_v3(conn: Connection, scheme: Scheme) -> None:
    # A redaction removes the references of the event it redacts, not the media item:
    # a reference is live while redacted_by is NULL, and media is revoked when it has no
    # live reference left (relay.core.redactions has the rule a redaction must pass).
    await conn.execute("ALTER TABLE media_reference ADD COLUMN redacted_by TEXT")
    # Under v2 every stored redaction was applied by event id alone; its references
    # are marked so (revoked_media keeps what was revoked then).
    for column in ("event_id", "replaces"):
        await conn.execute(
            "UPDATE media_reference SET redacted_by = (SELECT r.redaction_id FROM redaction r"  # noqa: S608 - fixed column names
            f" WHERE r.redacted_event_id = media_reference.{column})"
            " WHERE redacted_by IS NULL AND EXISTS (SELECT 1 FROM redaction r"
            f" WHERE r.redacted_event_id = media_reference.{column})"
        )
    # Several redactions of one event are kept (one that fails the rule must not hide
    # a later one that passes), with what the rule needs: room, sender, sender's power.
    await conn.execute(
        """CREATE TABLE redaction_v3 (
            redacted_event_id TEXT NOT NULL,
            redaction_id      TEXT NOT NULL,
            room_id           TEXT NOT NULL,
            sender            TEXT NOT NULL,
            sender_may_redact BOOLEAN NOT NULL,
            redacted_at       BIGINT NOT NULL,
            PRIMARY KEY (redacted_event_id, redaction_id)
        )"""
    )
    # A v2 row's sender is unknown; it was accepted then, so it keeps applying to
    # events that arrive later (still only in its own room).
    await conn.execute(
        "INSERT INTO redaction_v3 (redacted_event_id, redaction_id, room_id, sender,"
        " sender_may_redact, redacted_at)"
        " SELECT redacted_event_id, redaction_id, room_id, '', TRUE, redacted_at FROM redaction"
    )
    await conn.execute("DROP TABLE redaction")
    await conn.execute("ALTER TABLE redaction_v3 RENAME TO redaction")
    # The newest m.room.power_levels the relay received in each served room
    # (relay.core.redactions.PowerLevels as JSON).
    await conn.execute(
        """CREATE TABLE room_power_levels (
            room_id    TEXT PRIMARY KEY,
            levels     TEXT NOT NULL,
            updated_at BIGINT NOT NULL
        )"""
    )


@upgrade_table.register(description="Revocation sources; the signing audit trail")  # type: ignore[call-arg, arg-type, untyped-decorator]
async def upgrade_v4(conn: Connection, scheme: Scheme) -> None:
    # Who revoked: a redaction (ingest), the operator (media-relay revoke) or the
    # homeserver (revalidation found it gone). Rows before v4 all came from redactions.
    await conn.execute(
        "ALTER TABLE revoked_media ADD COLUMN source TEXT NOT NULL DEFAULT 'redaction'"
    )
    # Every process polls for revocations made elsewhere (relay.app, _watch_revocations).
    await conn.execute("CREATE INDEX revoked_media_time_idx ON revoked_media (revoked_at)")
    # media-relay revoke --room / --sender look references up by these.
    await conn.execute("CREATE INDEX media_reference_room_idx ON media_reference (room_id)")
    await conn.execute("CREATE INDEX media_reference_sender_idx ON media_reference (sender)")
    # One row per signed link (bridge API and media-relay sign); times in ms since the epoch.
    await conn.execute(
        """CREATE TABLE signing_audit (
            signed_at   BIGINT NOT NULL,
            bridge      TEXT NOT NULL,
            server_name TEXT NOT NULL,
            media_id    TEXT NOT NULL,
            variant     TEXT NOT NULL,
            expires_at  BIGINT NOT NULL
        )"""
    )
    # media-relay audit reads one item's rows in time order; the retention sweep
    # deletes by time. No primary key: rows are only ever appended and swept.
    await conn.execute(
        "CREATE INDEX signing_audit_media_idx ON signing_audit (server_name, media_id, signed_at)"
    )
    await conn.execute("CREATE INDEX signing_audit_time_idx ON signing_audit (signed_at)")


@upgrade_table.register(description="The outbox: follow-ups of committed transactions")  # type: ignore[call-arg, arg-type, untyped-decorator]
async def upgrade_v5(conn: Connection, scheme: Scheme) -> None:
    # relay.store.outbox: written in a transaction's own commit, deleted once done; what
    # a crash left behind is done at the next start. One row per follow-up and subject.
    await conn.execute(
        """CREATE TABLE outbox (
            kind       TEXT NOT NULL,
            subject    TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (kind, subject)
        )"""
    )


@upgrade_table.register(description="A monotonic revocation cursor")  # type: ignore[call-arg, arg-type, untyped-decorator]
async def upgrade_v6(conn: Connection, scheme: Scheme) -> None:
    # relay.store.revocation_feed: every process follows revoked_media by seq, which
    # grows in commit order (writers take a lock first, see there); revoked_at comes
    # from the writers' clocks and may tie or skew. Old rows are numbered by time.
    seq = (
        "seq INTEGER PRIMARY KEY AUTOINCREMENT"  # SQLite: an explicit rowid VACUUM keeps
        if scheme == Scheme.SQLITE
        else "seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    )
    await conn.execute(
        f"""CREATE TABLE revoked_media_v6 (
            {seq},
            server_name TEXT NOT NULL,
            media_id    TEXT NOT NULL,
            event_id    TEXT NOT NULL,
            revoked_at  BIGINT NOT NULL,
            source      TEXT NOT NULL DEFAULT 'redaction',
            UNIQUE (server_name, media_id)
        )"""
    )
    await conn.execute(
        "INSERT INTO revoked_media_v6 (server_name, media_id, event_id, revoked_at, source)"
        " SELECT server_name, media_id, event_id, revoked_at, source FROM revoked_media"
        " ORDER BY revoked_at, server_name, media_id"
    )
    await conn.execute("DROP TABLE revoked_media")
    await conn.execute("ALTER TABLE revoked_media_v6 RENAME TO revoked_media")
    await conn.execute("CREATE INDEX revoked_media_time_idx ON revoked_media (revoked_at)")

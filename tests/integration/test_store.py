"""The store on real SQLite and real PostgreSQL (every test runs on both)."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relay.core.ingest_plan import plan_transaction
from relay.core.mxc import MediaId
from relay.store import DatabaseUnusable, Store, open_database
from tests.harness.store_events import (
    POLICY,
    b64,
    commit,
    edit,
    from_sender,
    image,
    invite,
    kick,
    power_levels,
    redaction,
)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    db = await open_database(database_url)
    try:
        yield Store(db)
    finally:
        await db.stop()


async def test_media_recorded_in_served_room(store: Store) -> None:
    """An invite makes the room served; a later image in it is recorded with its metadata."""
    await commit(store, [invite("!a:example.org"), image("!a:example.org", "$e1", "m1")])
    record = await store.media_record(MediaId("example.org", "m1"))
    assert record is not None
    assert (record.room_id, record.event_id, record.mimetype, record.size, record.filename) == (
        "!a:example.org",
        "$e1",
        "image/jpeg",
        10,
        "photo.jpg",
    )
    assert await store.rooms_joining() == ["!a:example.org"]
    await store.mark_room_joined("!a:example.org")
    assert await store.rooms_joining() == []


async def test_media_outside_served_rooms_not_recorded(store: Store) -> None:
    """Without an invite the room's media is ignored and counted as such."""
    plan = await commit(store, [image("!b:example.org", "$e2", "m2")])
    assert plan.ignored == 1
    assert await store.media_record(MediaId("example.org", "m2")) is None


async def test_kick_forgets_room(store: Store) -> None:
    """After a kick, media of the room is no longer signable and new media is ignored."""
    room = "!c:example.org"
    await commit(store, [invite(room), image(room, "$e3", "m3")])
    await commit(store, [kick(room), image(room, "$e4", "m4")])
    assert await store.served_rooms([room]) == set()
    assert await store.media_record(MediaId("example.org", "m3")) is None
    assert await store.media_record(MediaId("example.org", "m4")) is None


async def test_duplicate_transaction_writes_nothing(store: Store) -> None:
    """A committed txn id is refused the second time, and its events are not applied again."""
    room = "!d:example.org"
    await commit(store, [invite(room)])
    plan = plan_transaction([image(room, "$e5", "m5")], {room}, POLICY)
    assert await store.commit_transaction("txn-1", plan) is not None
    other = plan_transaction([image(room, "$e6", "m6")], {room}, POLICY)
    assert await store.commit_transaction("txn-1", other) is None
    assert await store.transaction_seen("txn-1")
    assert await store.media_record(MediaId("example.org", "m6")) is None


async def test_racing_commits_of_one_id(store: Store) -> None:
    """Ten concurrent commits of the same txn id: exactly one applies."""
    room = "!e:example.org"
    await commit(store, [invite(room)])
    plans = [plan_transaction([image(room, f"$r{i}", f"r{i}")], {room}, POLICY) for i in range(10)]
    results = await asyncio.gather(*(store.commit_transaction("race", p) for p in plans))
    assert sum(r is not None for r in results) == 1
    recorded = [
        await store.media_record(MediaId("example.org", f"r{i}")) is not None for i in range(10)
    ]
    assert recorded.count(True) == 1


@pytest.mark.parametrize("redaction_first", [False, True])
async def test_redaction_revokes(store: Store, redaction_first: bool) -> None:
    """A redaction revokes the event's media, whichever arrives first; other media stays."""
    room = "!f:example.org"
    await commit(store, [invite(room), image(room, "$keep", "keep")])
    batches = [[image(room, "$gone", "gone")], [redaction(room, "$gone")]]
    if redaction_first:
        batches.reverse()
    results = []
    for events in batches:
        served = await store.served_rooms([room])
        plan = plan_transaction(events, served, POLICY)
        results.append(await store.commit_transaction(secrets.token_hex(8), plan))
    revoked = [m for r in results if r is not None for m in r.revoked]
    assert revoked == [MediaId("example.org", "gone")]
    assert await store.is_revoked(MediaId("example.org", "gone"))
    assert not await store.is_revoked(MediaId("example.org", "keep"))


async def test_encryption_info_round_trip(store: Store) -> None:
    """EncryptedFile key material is stored and comes back byte for byte."""
    room = "!g:example.org"
    key, iv, digest = secrets.token_bytes(32), secrets.token_bytes(16), secrets.token_bytes(32)
    event = image(room, "$enc", "unused")
    del event["content"]["url"]
    event["content"]["file"] = {
        "v": "v2",
        "url": "mxc://example.org/enc1",
        "iv": b64(iv),
        "hashes": {"sha256": b64(digest)},
        "key": {
            "kty": "oct",
            "alg": "A256CTR",
            "ext": True,
            "key_ops": ["encrypt", "decrypt"],
            "k": base64.urlsafe_b64encode(key).decode().rstrip("="),
        },
    }
    await commit(store, [invite(room), event])
    record = await store.media_record(MediaId("example.org", "enc1"))
    assert record is not None and record.encryption is not None
    assert (record.encryption.key, record.encryption.iv, record.encryption.sha256) == (
        key,
        iv,
        digest,
    )


async def test_data_survives_reopen(database_url: str) -> None:
    """Closing and reopening the database keeps transactions and references (no re-migration)."""
    db = await open_database(database_url)
    store = Store(db)
    await commit(store, [invite("!h:example.org"), image("!h:example.org", "$e8", "m8")])
    plan = plan_transaction([], set(), POLICY)
    assert await store.commit_transaction("kept", plan) is not None
    await db.stop()
    db = await open_database(database_url)
    try:
        store = Store(db)
        assert await store.transaction_seen("kept")
        assert await store.media_record(MediaId("example.org", "m8")) is not None
    finally:
        await db.stop()


async def test_unusable_database_is_reported(tmp_path: Any) -> None:
    """A database that cannot be opened raises DatabaseUnusable with a one-line reason."""
    with pytest.raises(DatabaseUnusable) as e:
        await open_database(f"sqlite:{tmp_path / 'missing-dir' / 'x.db'}")
    assert "\n" not in str(e.value)
    with pytest.raises(DatabaseUnusable) as e:
        await open_database("postgresql://postgres:secretpw@127.0.0.1:9/none")
    assert "secretpw" not in str(e.value)


@pytest.mark.parametrize("redaction_first", [False, True])
async def test_redacting_the_original_revokes_media_of_its_edits(
    store: Store, redaction_first: bool
) -> None:
    """Deleting an edited message (redacting the original) revokes what the edit brought in."""
    room = "!edit:example.org"
    await commit(store, [invite(room), image(room, "$orig", "before")])
    batches = [[edit(room, "$edit", "$orig", "after")], [redaction(room, "$orig")]]
    if redaction_first:
        batches.reverse()
    for events in batches:
        await commit(store, events)
    assert await store.is_revoked(MediaId("example.org", "before"))
    assert await store.is_revoked(MediaId("example.org", "after"))


async def test_unrelated_redaction_leaves_edits_alone(store: Store) -> None:
    """Redacting some other event does not revoke an edit's media."""
    room = "!edit2:example.org"
    await commit(
        store, [invite(room), image(room, "$o2", "keep1"), edit(room, "$e2", "$o2", "keep2")]
    )
    await commit(store, [redaction(room, "$unrelated")])
    assert not await store.is_revoked(MediaId("example.org", "keep1"))
    assert not await store.is_revoked(MediaId("example.org", "keep2"))


async def test_v1_database_upgrades_in_place(database_url: str) -> None:
    """A database created at schema v1 is migrated to the current schema, keeping its rows."""
    from mautrix.util.async_db import Database, UpgradeTable

    from relay.store.migrations import upgrade_table

    v1_only = UpgradeTable(version_table_name="relay_schema_version", database_name="relay")
    v1_only.upgrades.append(upgrade_table.upgrades[0])
    url = database_url.replace("postgresql://", "postgres://", 1)
    old = Database.create(url, upgrade_table=v1_only)
    await old.start()
    await old.execute(
        "INSERT INTO media_reference (event_id, path, server_name, media_id, room_id, sender,"
        " role, origin_ts) VALUES ('$old', 'url', 'example.org', 'oldmedia', '!r', '@a:b',"
        " 'content', 1)"
    )
    await old.execute(
        "INSERT INTO served_room (room_id, state, updated_at) VALUES ('!r', 'joined', 1)"
    )
    await old.stop()

    db = await open_database(database_url)
    try:
        assert await db.fetchval("SELECT version FROM relay_schema_version") == len(
            upgrade_table.upgrades
        )
        assert await Store(db).media_record(MediaId("example.org", "oldmedia")) is not None
        assert (
            await db.fetchval("SELECT replaces FROM media_reference WHERE event_id = '$old'")
            is None
        )
    finally:
        await db.stop()


@pytest.mark.parametrize("redaction_first", [False, True])
async def test_moderators_redaction_revokes(store: Store, redaction_first: bool) -> None:
    """A moderator on another server (power from tracked m.room.power_levels) revokes."""
    room = "!mod:example.org"
    await commit(store, [invite(room), power_levels(room, {"@mod:other.org": 50})])
    batches = [[image(room, "$post", "modgone")], [redaction(room, "$post", "@mod:other.org")]]
    if redaction_first:
        batches.reverse()
    for events in batches:
        await commit(store, events)
    assert await store.is_revoked(MediaId("example.org", "modgone"))
    assert await store.media_record(MediaId("example.org", "modgone")) is None


@pytest.mark.parametrize("redaction_first", [False, True])
async def test_redactions_that_must_not_revoke(store: Store, redaction_first: bool) -> None:
    """A powerless user on another server, and a redaction sent in another room, revoke nothing.

    And neither hides a valid redaction of the same event that comes after it.
    """
    room, other_room = "!keep:example.org", "!other:example.org"
    await commit(
        store,
        [invite(room), invite(other_room), power_levels(room, {"@mallory:evil.org": 49})],
    )
    invalid = [redaction(room, "$kept", "@mallory:evil.org"), redaction(other_room, "$kept")]
    batches = [[image(room, "$kept", "kept")], invalid]
    if redaction_first:
        batches.reverse()
    for events in batches:
        await commit(store, events)
    media = MediaId("example.org", "kept")
    assert not await store.is_revoked(media)
    assert await store.media_record(media) is not None
    await commit(store, [redaction(room, "$kept", "@admin:example.org")])  # same server
    assert await store.is_revoked(media)


async def test_reposting_and_redacting_ones_copy_keeps_other_links(store: Store) -> None:
    """Re-posting someone's mxc and redacting one's own copy removes that reference only."""
    room, elsewhere = "!share:example.org", "!share2:example.org"
    media = MediaId("example.org", "shared")
    await commit(store, [invite(room), invite(elsewhere), image(room, "$first", "shared", ts=10)])
    repost = from_sender(image(elsewhere, "$copy", "shared", ts=30, body="copy.jpg"), "@m:evil.org")
    plan = await commit(store, [repost])
    assert [r.event_id for r in plan.references] == ["$copy"]
    assert (await store.media_record(media)).event_id == "$copy"  # type: ignore[union-attr]
    redacted = await commit(store, [redaction(elsewhere, "$copy", "@m:evil.org")])
    assert redacted.redactions
    assert not await store.is_revoked(media)
    record = await store.media_record(media)
    assert record is not None and record.event_id == "$first"  # the redacted copy no longer speaks
    # The last live reference going revokes the media, and the commit reports it.
    rooms = {room}
    plan = plan_transaction(
        [redaction(room, "$first")], await store.served_rooms(rooms), POLICY, {}
    )
    result = await store.commit_transaction(secrets.token_hex(8), plan)
    assert result is not None and result.revoked == (media,)
    assert await store.is_revoked(media)


async def test_redacting_one_edit_source_keeps_media_posted_elsewhere(store: Store) -> None:
    """An edit's media goes with its original, but not if another live reference remains."""
    room = "!edit3:example.org"
    await commit(
        store,
        [invite(room), image(room, "$o3", "orig3"), edit(room, "$e3", "$o3", "both3")],
    )
    await commit(store, [image(room, "$other3", "both3")])
    await commit(store, [redaction(room, "$o3")])
    assert await store.is_revoked(MediaId("example.org", "orig3"))
    assert not await store.is_revoked(MediaId("example.org", "both3"))


async def test_v2_database_upgrades_to_per_reference_redactions(database_url: str) -> None:
    """A v2 database keeps its revocations; its redactions still apply, per room, per reference."""
    from mautrix.util.async_db import Database, UpgradeTable

    from relay.store.migrations import upgrade_table

    v2_only = UpgradeTable(version_table_name="relay_schema_version", database_name="relay")
    v2_only.upgrades.extend(upgrade_table.upgrades[:2])
    url = database_url.replace("postgresql://", "postgres://", 1)
    old = Database.create(url, upgrade_table=v2_only)
    await old.start()
    rows = [
        ("$done", "url", "done", "!r"),  # redacted and revoked under v2
        ("$pending", "url", "pending", "!r"),  # not redacted
    ]
    for event_id, path, media_id, room_id in rows:
        await old.execute(
            "INSERT INTO media_reference (event_id, path, server_name, media_id, room_id,"
            " sender, role, origin_ts) VALUES ($1, $2, 'example.org', $3, $4, '@a:example.org',"
            " 'content', 1)",
            event_id,
            path,
            media_id,
            room_id,
        )
    await old.execute(
        "INSERT INTO redaction (redacted_event_id, redaction_id, room_id, redacted_at)"
        " VALUES ('$done', '$red1', '!r', 2), ('$later', '$red2', '!r', 2)"
    )
    await old.execute(
        "INSERT INTO revoked_media (server_name, media_id, event_id, revoked_at)"
        " VALUES ('example.org', 'done', '$done', 2)"
    )
    await old.execute(
        "INSERT INTO served_room (room_id, state, updated_at) VALUES ('!r', 'joined', 1)"
    )
    await old.stop()

    db = await open_database(database_url)
    try:
        store = Store(db)
        assert await db.fetchval("SELECT version FROM relay_schema_version") == len(
            upgrade_table.upgrades
        )
        assert await store.is_revoked(MediaId("example.org", "done"))
        assert (
            await db.fetchval("SELECT redacted_by FROM media_reference WHERE event_id = '$done'")
            == "$red1"
        )
        assert await store.media_record(MediaId("example.org", "pending")) is not None
        # The stored redaction of an event not seen yet applies when it arrives (same room).
        later = image("!r", "$later", "later")
        plan = plan_transaction([later], {"!r"}, POLICY)
        result = await store.commit_transaction("after-upgrade", plan)
        assert result is not None and result.revoked == (MediaId("example.org", "later"),)
    finally:
        await db.stop()

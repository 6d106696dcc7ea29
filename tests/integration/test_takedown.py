"""Operator and homeserver revocations in the store, on real SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from mautrix.util.async_db import Database, UpgradeTable

from relay.core.mxc import MediaId
from relay.store import Store, open_database
from relay.store.migrations import upgrade_table
from relay.store.takedown import HOMESERVER, OPERATOR, Revoked, Selector, Takedowns
from tests.harness.store_events import commit, edit, from_sender, image, invite, redaction

ROOM = "!take:example.org"
OTHER_ROOM = "!other:example.org"


def media(media_id: str) -> MediaId:
    return MediaId("example.org", media_id)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    db = await open_database(database_url)
    try:
        store = Store(db)
        await commit(
            store,
            [
                invite(ROOM),
                invite(OTHER_ROOM),
                image(ROOM, "$a", "a1"),
                image(ROOM, "$b", "b1"),
                edit(ROOM, "$a-edit", "$a", "a2"),
                from_sender(image(OTHER_ROOM, "$c", "c1"), "@mallory:example.org"),
                from_sender(image(ROOM, "$d", "d1"), "@mallory:example.org"),
            ],
        )
        yield store
    finally:
        await db.stop()


async def revoked(store: Store, *ids: str) -> set[str]:
    return {i for i in ids if await store.is_revoked(media(i))}


ALL = ("a1", "a2", "b1", "c1", "d1")


async def test_revoke_one_media_item_even_unseen(store: Store) -> None:
    """An mxc is revoked outright (seen or not), with source operator; twice is not new."""
    takedowns = Takedowns(store.db)
    assert await takedowns.revoke(media("b1")) == Revoked(media("b1"), True)
    assert await takedowns.revoke(media("never-seen")) == Revoked(media("never-seen"), True)
    assert await takedowns.revoke(media("b1")) == Revoked(media("b1"), False)
    assert await revoked(store, *ALL, "never-seen") == {"b1", "never-seen"}
    assert await takedowns.source(media("b1")) == OPERATOR
    assert await takedowns.source(media("a1")) is None


@pytest.mark.parametrize(
    ("selector", "value", "expected"),
    [
        (Selector.EVENT, "$a", {"a1", "a2"}),  # the event and its edits
        (Selector.EVENT, "$b", {"b1"}),
        (Selector.ROOM, ROOM, {"a1", "a2", "b1", "d1"}),
        (Selector.SENDER, "@mallory:example.org", {"c1", "d1"}),
        (Selector.EVENT, "$nothing", set()),
    ],
)
async def test_revoke_by_selector(
    store: Store, selector: Selector, value: str, expected: set[str]
) -> None:
    """Each selector revokes exactly the media it references, and lists each item once."""
    got = await Takedowns(store.db).revoke_referenced(selector, value)
    assert sorted(r.media.media_id for r in got) == sorted(expected)
    assert all(r.newly for r in got)
    assert await revoked(store, *ALL) == expected


async def test_already_redacted_media_is_listed_not_new(store: Store) -> None:
    """Media a redaction already revoked keeps its source and is reported as not new."""
    await commit(store, [redaction(ROOM, "$b")])
    takedowns = Takedowns(store.db)
    got = await takedowns.revoke_referenced(Selector.ROOM, ROOM)
    assert Revoked(media("b1"), False) in got
    assert await takedowns.source(media("b1")) == "redaction"
    assert await takedowns.source(media("d1")) == OPERATOR


async def test_homeserver_source(store: Store) -> None:
    """Revalidation's revocations are recorded with source homeserver."""
    takedowns = Takedowns(store.db)
    await takedowns.revoke(media("a1"), HOMESERVER)
    assert await takedowns.source(media("a1")) == HOMESERVER
    assert await revoked(store, *ALL) == {"a1"}


async def test_v3_database_upgrades_to_v4(database_url: str) -> None:
    """A v3 database keeps its revocations (as redactions) and gains the audit table."""
    v3_only = UpgradeTable(version_table_name="relay_schema_version", database_name="relay")
    v3_only.upgrades.extend(upgrade_table.upgrades[:3])
    url = database_url.replace("postgresql://", "postgres://", 1)
    old = Database.create(url, upgrade_table=v3_only)
    await old.start()
    await old.execute(
        "INSERT INTO revoked_media (server_name, media_id, event_id, revoked_at)"
        " VALUES ('example.org', 'gone', '$e', 2)"
    )
    await old.stop()

    db = await open_database(database_url)
    try:
        assert await db.fetchval("SELECT version FROM relay_schema_version") == len(
            upgrade_table.upgrades
        )
        assert await Takedowns(db).source(media("gone")) == "redaction"
        assert await db.fetchval("SELECT COUNT(*) FROM signing_audit") == 0
    finally:
        await db.stop()

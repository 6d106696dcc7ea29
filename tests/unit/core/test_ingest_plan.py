"""The pure transaction planner: which rooms are served, what is recorded, revoked, joined."""

from __future__ import annotations

from typing import Any

import pytest

from relay.core.ingest_plan import RoomPolicy, plan_transaction

BOT = "@mediarelay:example.org"


def member(room: str, sender: str, membership: str, state_key: str = BOT) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "room_id": room,
        "event_id": f"$m-{room}-{membership}",
        "sender": sender,
        "state_key": state_key,
        "origin_server_ts": 5,
        "content": {"membership": membership},
    }


def image(room: str, event_id: str = "$img", media_id: str = "abc") -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "room_id": room,
        "event_id": event_id,
        "sender": "@alice:example.org",
        "origin_server_ts": 7,
        "content": {"msgtype": "m.image", "body": "a.png", "url": f"mxc://example.org/{media_id}"},
    }


@pytest.mark.parametrize(
    ("allowed", "sender", "may"),
    [
        (("example.org",), "@alice:example.org", True),
        (("example.org",), "@mallory:evil.org", False),
        (("@admin:other.org",), "@admin:other.org", True),
        (("@admin:other.org",), "@alice:other.org", False),
        (("*",), "@anyone:anywhere", True),
        (("example.org",), "example.org", False),
    ],
)
def test_may_invite(allowed: tuple[str, ...], sender: str, may: bool) -> None:
    """Inviters are allowed by full user id, by server name, or by '*'."""
    assert RoomPolicy.build(BOT, allowed, []).may_invite(sender) is may


def test_invite_then_media_in_one_batch() -> None:
    """An allowed invite earlier in a batch makes the room served for later events."""
    policy = RoomPolicy.build(BOT, ["example.org"], [])
    plan = plan_transaction(
        [member("!r", "@alice:example.org", "invite"), image("!r")], set(), policy
    )
    assert plan.rooms_to_serve == {"!r": "@alice:example.org"}
    assert [r.ref.media.media_id for r in plan.references] == ["abc"]
    assert (plan.events, plan.rejected, plan.ignored) == (2, 0, 0)


def test_disallowed_invite_is_declined_and_media_ignored() -> None:
    """An invite from a disallowed server is declined; the room's media is ignored."""
    policy = RoomPolicy.build(BOT, ["example.org"], [])
    plan = plan_transaction([member("!r", "@m:evil.org", "invite"), image("!r")], set(), policy)
    assert plan.invites_to_decline == {"!r"}
    assert plan.rooms_to_serve == {}
    assert plan.references == []
    assert plan.ignored == 1


def test_kick_then_media_is_ignored() -> None:
    """Once the bot is kicked, later events of the room in the same batch are ignored."""
    policy = RoomPolicy.build(BOT, ["example.org"], [])
    plan = plan_transaction(
        [member("!r", "@alice:example.org", "leave"), image("!r")], {"!r"}, policy
    )
    assert plan.rooms_to_forget == {"!r"}
    assert plan.references == []


def test_other_users_membership_is_not_the_bots() -> None:
    """A member event for another user records its avatar, it does not change served rooms."""
    policy = RoomPolicy.build(BOT, ["example.org"], [])
    event = member("!r", "@alice:example.org", "join", state_key="@alice:example.org")
    event["content"]["avatar_url"] = "mxc://example.org/avatar1"
    plan = plan_transaction([event], {"!r"}, policy)
    assert plan.rooms_to_serve == {} and plan.rooms_to_forget == set()
    assert [(str(r.ref.role), r.ref.media.media_id) for r in plan.references] == [
        ("avatar", "avatar1")
    ]


def test_namespace_rooms_are_served_without_invite() -> None:
    """Rooms matching appservice.room_namespace are served and remembered as such."""
    policy = RoomPolicy.build(BOT, ["example.org"], [r"!bridged-.*"])
    plan = plan_transaction([image("!bridged-1"), image("!other", "$2")], set(), policy)
    assert plan.namespace_rooms == {"!bridged-1"}
    assert [r.room_id for r in plan.references] == ["!bridged-1"]
    assert plan.ignored == 1


def test_malformed_events_are_counted() -> None:
    """Malformed events are rejected and counted; invalid mxc references are counted apart."""
    policy = RoomPolicy.build(BOT, ["example.org"], [])
    bad_mxc = image("!r", "$bad", "..%2F..")
    plan = plan_transaction([42, {"type": "x"}, bad_mxc, image("!r")], {"!r"}, policy)
    assert (plan.events, plan.rejected, plan.invalid_references) == (4, 2, 1)
    assert len(plan.references) == 1


def test_redaction_planned_with_target() -> None:
    """Redactions in served rooms are planned with their target (v11 content form)."""
    policy = RoomPolicy.build(BOT, ["example.org"], [])
    redaction = {
        "type": "m.room.redaction",
        "room_id": "!r",
        "event_id": "$red",
        "sender": "@alice:example.org",
        "origin_server_ts": 9,
        "content": {"redacts": "$img"},
    }
    plan = plan_transaction([redaction], {"!r"}, policy)
    assert [(r.redaction_id, r.redacted_event_id) for r in plan.redactions] == [("$red", "$img")]


@pytest.mark.parametrize(
    ("relates_to", "expected"),
    [
        ({"rel_type": "m.replace", "event_id": "$orig"}, "$orig"),
        ({"rel_type": "m.thread", "event_id": "$orig"}, None),
        ({"rel_type": "m.replace", "event_id": "not-an-event-id"}, None),
        ({"rel_type": "m.replace"}, None),
        ("m.replace", None),
    ],
)
def test_edits_remember_the_original(relates_to: object, expected: str | None) -> None:
    """References of an m.replace edit carry the original event id (and nothing else does)."""
    policy = RoomPolicy.build(BOT, ["example.org"], [])
    event = image("!r", "$edit", "new1")
    event["content"]["m.relates_to"] = relates_to
    plan = plan_transaction([event], {"!r"}, policy)
    assert [r.replaces for r in plan.references] == [expected]

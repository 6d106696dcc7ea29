"""The pure transaction planner: which rooms are served, what is recorded, revoked, joined."""

from __future__ import annotations

from typing import Any

import pytest

from relay.core.ingest_plan import RoomPolicy, plan_transaction
from relay.core.redactions import PowerLevels

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


class _Exploding(dict[str, Any]):
    """An event whose content lookup fails with an error no validation anticipates."""

    def get(self, key: str, default: Any = None) -> Any:
        if key == "content":
            raise RuntimeError("boom")
        return super().get(key, default)


def test_an_event_that_raises_is_skipped_and_counted() -> None:
    """Any exception from one event's planning skips that event; the others are kept."""
    policy = RoomPolicy.build(BOT, [], [r"!r"])
    plan = plan_transaction([_Exploding(image("!r", "$bad")), image("!r", "$ok")], set(), policy)
    assert (plan.events, plan.rejected) == (2, 1)
    assert [r.event_id for r in plan.references] == ["$ok"]


def test_out_of_range_timestamp_is_zero_and_trimmed_counted() -> None:
    """origin_server_ts beyond canonical JSON is recorded as 0; a dropped field is counted."""
    policy = RoomPolicy.build(BOT, [], [r"!r"])
    event = image("!r")
    event["origin_server_ts"] = 2**64
    event["content"]["info"] = {"w": 2**31}
    plan = plan_transaction([event], set(), policy)
    assert [r.origin_ts for r in plan.references] == [0]
    assert plan.trimmed == 1


def power_levels(room: str, users: dict[str, int], event_id: str = "$pl") -> dict[str, Any]:
    return {
        "type": "m.room.power_levels",
        "state_key": "",
        "room_id": room,
        "event_id": event_id,
        "sender": "@admin:example.org",
        "origin_server_ts": 3,
        "content": {"users": users, "redact": 50},
    }


def redaction(room: str, sender: str, target: str = "$img") -> dict[str, Any]:
    return {
        "type": "m.room.redaction",
        "room_id": room,
        "event_id": f"$red-{sender}",
        "sender": sender,
        "origin_server_ts": 9,
        "redacts": target,
        "content": {},
    }


def test_power_levels_earlier_in_the_batch_decide_redaction_power() -> None:
    """A power-levels event counts for the redactions after it, and is kept for the store."""
    policy = RoomPolicy.build(BOT, [], [r"!r"])
    stored = {"!r": PowerLevels.from_content({"users": {"@old:other.org": 100}})}
    plan = plan_transaction(
        [
            redaction("!r", "@old:other.org"),
            redaction("!r", "@mod:other.org"),
            power_levels("!r", {"@mod:other.org": 50}),
            redaction("!r", "@mod:other.org", "$img2"),
            redaction("!r", "@old:other.org", "$img2"),
        ],
        set(),
        policy,
        stored,
    )
    assert [(r.sender, r.sender_may_redact) for r in plan.redactions] == [
        ("@old:other.org", True),
        ("@mod:other.org", False),
        ("@mod:other.org", True),
        ("@old:other.org", False),
    ]
    assert plan.power_levels["!r"].may_redact("@mod:other.org")

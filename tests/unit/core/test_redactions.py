"""The redaction rule and the power levels it reads (relay.core.redactions)."""

from __future__ import annotations

from typing import Any

import pytest

from relay.core.redactions import PowerLevels, redaction_applies, server_of

ROOM = "!r:example.org"


@pytest.mark.parametrize(
    ("redaction_room", "sender", "powerful", "applies"),
    [
        (ROOM, "@alice:example.org", False, True),  # the original sender
        (ROOM, "@admin:example.org", False, True),  # the original sender's server
        (ROOM, "@mod:other.org", True, True),  # enough power
        (ROOM, "@mallory:evil.org", False, False),  # foreign and powerless
        ("!elsewhere:example.org", "@alice:example.org", True, False),  # another room
        (ROOM, "@example.org", False, False),  # no server part at all
    ],
)
def test_redaction_applies(redaction_room: str, sender: str, powerful: bool, applies: bool) -> None:
    """Same room, and same sender, same server or enough power."""
    assert (
        redaction_applies(
            redaction_room=redaction_room,
            redaction_sender=sender,
            sender_may_redact=powerful,
            event_room=ROOM,
            event_sender="@alice:example.org",
        )
        is applies
    )


@pytest.mark.parametrize(
    ("content", "user", "may"),
    [
        ({}, "@a:x", False),  # users_default 0 < redact 50
        ({"users_default": 50}, "@a:x", True),
        ({"users": {"@mod:x": 50}}, "@mod:x", True),
        ({"users": {"@mod:x": 49}}, "@mod:x", False),
        ({"redact": 0}, "@a:x", True),
        ({"redact": "10", "users": {"@a:x": "10"}}, "@a:x", True),  # strings (room v1-9)
        ({"redact": True, "users": {"@a:x": 50}}, "@a:x", True),  # bool → default 50
        ({"redact": 2**60, "users": {"@a:x": 2**60}}, "@a:x", False),  # out of range → defaults
        ({"users": ["@a:x"]}, "@a:x", False),
    ],
)
def test_power_levels(content: dict[str, Any], user: str, may: bool) -> None:
    """m.room.power_levels is read leniently, with the spec's defaults."""
    levels = PowerLevels.from_content(content)
    assert levels.may_redact(user) is may
    assert PowerLevels.from_json(levels.to_json()) == levels


def test_server_of() -> None:
    """The server part keeps its port; an id without one has no server."""
    assert server_of("@a:example.org:8448") == "example.org:8448"
    assert server_of("nobody") == ""

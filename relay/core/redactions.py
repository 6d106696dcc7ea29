"""Who may redact whose event: the rule a redaction passes before the relay applies it (pure).

In room versions 3 and later the auth rules accept a redaction from anyone and leave
the decision to whoever applies it, so homeservers deliver redactions that they
themselves will not apply (Client-Server API, "Redactions"; Room version 3,
"Authorization rules" and "Handling redactions"). The relay applies a redaction of
event E only when

- it is in E's room, and
- its sender is E's sender, or on the same server as E's sender (the rule homeservers
  use), or has at least the room's ``redact`` power level.

Power levels come from the ``m.room.power_levels`` state events the relay receives in
the rooms it serves (tracked by ingest and stored per room). The relay does not ask
the homeserver per redaction: ingest stays free of upstream requests, so a slow or
down homeserver never holds a transaction. Until the relay has seen a room's power
levels nobody in that room counts as powerful; the same-sender and same-server rules
still apply, so a moderator on the original sender's server can always redact.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Client-Server API, "m.room.power_levels": defaults when the event leaves them out.
DEFAULT_REDACT = 50
DEFAULT_USERS = 0
# Canonical JSON integers; room versions 1-9 also allow integers written as strings.
_MAX_LEVEL = 2**53 - 1
_INTEGER_STRING = re.compile(r"[+-]?[0-9]{1,16}")


@dataclass(frozen=True, slots=True)
class PowerLevels:
    """The part of a room's ``m.room.power_levels`` that decides redactions."""

    redact: int = DEFAULT_REDACT
    users_default: int = DEFAULT_USERS
    users: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_content(cls, content: Mapping[str, Any]) -> PowerLevels:
        """Lenient: a malformed value falls back to its default, a malformed user is left out."""
        users = content.get("users")
        levels: dict[str, int] = {}
        if isinstance(users, Mapping):
            for user, value in users.items():
                level = _level(value)
                if isinstance(user, str) and level is not None:
                    levels[user] = level
        redact = _level(content.get("redact"))
        users_default = _level(content.get("users_default"))
        return cls(
            redact=DEFAULT_REDACT if redact is None else redact,
            users_default=DEFAULT_USERS if users_default is None else users_default,
            users=levels,
        )

    def level(self, user_id: str) -> int:
        return self.users.get(user_id, self.users_default)

    def may_redact(self, user_id: str) -> bool:
        """Whether ``user_id`` may redact other users' events."""
        return self.level(user_id) >= self.redact

    def to_json(self) -> str:
        return json.dumps(
            {"redact": self.redact, "users_default": self.users_default, "users": self.users},
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: str) -> PowerLevels:
        data = json.loads(raw)
        return cls.from_content(data if isinstance(data, dict) else {})


def _level(value: object) -> int | None:
    if isinstance(value, str) and _INTEGER_STRING.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > _MAX_LEVEL:
        return None
    return value


def server_of(user_id: str) -> str:
    """The server part of a user id (``@local:server``), or "" if it has none."""
    localpart, sep, server = user_id.partition(":")
    return server if sep and localpart.startswith("@") else ""


def redaction_applies(
    *,
    redaction_room: str,
    redaction_sender: str,
    sender_may_redact: bool,
    event_room: str,
    event_sender: str,
) -> bool:
    """The rule of the module docstring, for one redaction and one redacted event."""
    if redaction_room != event_room:
        return False
    if sender_may_redact or redaction_sender == event_sender:
        return True
    server = server_of(redaction_sender)
    return server != "" and server == server_of(event_sender)

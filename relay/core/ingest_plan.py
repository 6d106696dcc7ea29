"""Decide what one appservice transaction changes, without any I/O.

The ingest handler reads the rooms already served (and their power levels), calls
:func:`plan_transaction` and hands the plan to the store, which applies it in one
database transaction. Nothing one event says can fail the plan: an event that cannot
be understood, for whatever reason, is skipped and counted (DESIGN.md: a transaction
is answered 200 unless the relay's own database failed).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.core.events import (
    MAX_JSON_INT,
    MalformedEvent,
    MediaReference,
    extract_media,
    redacted_event_id,
    replaced_event_id,
    storable_text,
)
from relay.core.redactions import PowerLevels

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RoomPolicy:
    """Which rooms the relay serves: invites from allowed users, or the room namespace."""

    bot_user_id: str
    allowed_inviters: tuple[str, ...]  # user ids, server names, or "*"
    room_namespace: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def build(
        cls, bot_user_id: str, allowed_inviters: Iterable[str], room_namespace: Iterable[str]
    ) -> RoomPolicy:
        return cls(
            bot_user_id,
            tuple(allowed_inviters),
            tuple(re.compile(p) for p in room_namespace),
        )

    def may_invite(self, sender: str) -> bool:
        localpart, sep, server = sender.partition(":")
        if not (sender.startswith("@") and sep and len(localpart) > 1):
            return False
        if "*" in self.allowed_inviters or sender in self.allowed_inviters:
            return True
        return server in self.allowed_inviters

    def in_namespace(self, room_id: str) -> bool:
        return any(p.fullmatch(room_id) for p in self.room_namespace)


@dataclass(frozen=True, slots=True)
class RecordedReference:
    room_id: str
    event_id: str
    sender: str
    origin_ts: int
    ref: MediaReference
    replaces: str | None = None  # for edits: the original event, whose redaction revokes too


@dataclass(frozen=True, slots=True)
class Redaction:
    room_id: str
    redaction_id: str
    redacted_event_id: str
    origin_ts: int
    sender: str = ""
    # The sender's power at the time, from the room's tracked m.room.power_levels
    # (relay.core.redactions); same-sender and same-server are judged when applied.
    sender_may_redact: bool = False


@dataclass(slots=True)
class TransactionPlan:
    references: list[RecordedReference] = field(default_factory=list)
    redactions: list[Redaction] = field(default_factory=list)
    rooms_to_serve: dict[str, str] = field(default_factory=dict)  # room id -> inviter
    rooms_joined: set[str] = field(default_factory=set)
    namespace_rooms: set[str] = field(default_factory=set)  # served through the registration
    rooms_to_forget: set[str] = field(default_factory=set)
    invites_to_decline: set[str] = field(default_factory=set)
    power_levels: dict[str, PowerLevels] = field(default_factory=dict)  # room id -> newest
    events: int = 0
    rejected: int = 0
    ignored: int = 0
    invalid_references: int = 0
    trimmed: int = 0  # events recorded without a metadata field no column could store


def room_ids(events: Sequence[object]) -> set[str]:
    """Room ids mentioned by well-formed-enough events, to look up which are served.

    Only ids a query can carry: a NUL (PostgreSQL) or a lone surrogate (either driver)
    in one event's ``room_id`` would fail the lookup, and with it the whole transaction
    on every retry; such an event is dropped as malformed by the plan anyway.
    """
    return {
        e["room_id"]
        for e in events
        if isinstance(e, Mapping)
        and isinstance(e.get("room_id"), str)
        and storable_text(e["room_id"])
    }


def plan_transaction(
    events: Sequence[object],
    served_rooms: set[str],
    policy: RoomPolicy,
    power_levels: Mapping[str, PowerLevels] | None = None,
) -> TransactionPlan:
    """Walk the events in order; a room invited earlier in the batch is served for later events.

    ``power_levels`` are the stored ones of the batch's rooms; a power-levels event
    earlier in the batch counts for the redactions after it.
    """
    plan = TransactionPlan()
    served = set(served_rooms)
    levels = dict(power_levels or {})
    for event in events:
        plan.events += 1
        try:
            _plan_event(event, policy, plan, served, levels)
        except MalformedEvent as e:
            plan.rejected += 1
            log.warning("skipping malformed event: %s", e)
        except Exception:
            # A bug of ours that this event's shape provokes: skipping the event keeps
            # ingest moving (a 500 would be retried forever with the same event).
            plan.rejected += 1
            log.exception("skipping an event the relay could not process")
    return plan


def _plan_event(
    event: object,
    policy: RoomPolicy,
    plan: TransactionPlan,
    served: set[str],
    levels: dict[str, PowerLevels],
) -> None:
    """Add one event to ``plan`` (what can raise comes before the changes to it)."""
    if not isinstance(event, Mapping):
        raise MalformedEvent("event is not a JSON object")
    extraction = extract_media(event)  # also validates the event's envelope
    room_id: str = event["room_id"]
    if _membership_of_bot(event, policy, plan, served):
        return
    if room_id not in served:
        if not policy.in_namespace(room_id):
            plan.ignored += 1
            return
        plan.namespace_rooms.add(room_id)
        served.add(room_id)
    ts = _timestamp(event)
    sender: str = event["sender"]
    target = redacted_event_id(event)
    replaces = replaced_event_id(event)
    references = [
        RecordedReference(room_id, event["event_id"], sender, ts, ref, replaces)
        for ref in extraction.references
    ]
    if event.get("type") == "m.room.power_levels" and event.get("state_key") == "":
        levels[room_id] = plan.power_levels[room_id] = PowerLevels.from_content(event["content"])
    if target is not None:
        known = levels.get(room_id)
        may_redact = known is not None and known.may_redact(sender)
        plan.redactions.append(
            Redaction(room_id, event["event_id"], target, ts, sender, may_redact)
        )
    plan.invalid_references += extraction.invalid
    if extraction.dropped:
        plan.trimmed += 1
    plan.references.extend(references)


def _membership_of_bot(
    event: Mapping[str, Any], policy: RoomPolicy, plan: TransactionPlan, served: set[str]
) -> bool:
    """Handle the bot's own membership; True when the event needs nothing more."""
    if event.get("type") != "m.room.member" or event.get("state_key") != policy.bot_user_id:
        return False
    room_id: str = event["room_id"]
    membership = event["content"].get("membership")
    sender: str = event["sender"]
    if membership == "invite":
        if policy.may_invite(sender):
            plan.rooms_to_serve[room_id] = sender
            plan.rooms_to_forget.discard(room_id)
            served.add(room_id)
        else:
            log.info("declining invite to %s from %s: inviter not allowed", room_id, sender)
            plan.invites_to_decline.add(room_id)
    elif membership == "join":
        if room_id in served or policy.in_namespace(room_id):
            plan.rooms_joined.add(room_id)
    elif membership in ("leave", "ban"):
        # Kicked, banned or left: stop serving the room's media from now on.
        plan.rooms_to_forget.add(room_id)
        plan.rooms_to_serve.pop(room_id, None)
        plan.rooms_joined.discard(room_id)
        served.discard(room_id)
    return True


def _timestamp(event: Mapping[str, Any]) -> int:
    ts = event.get("origin_server_ts")
    # Stored as BIGINT: an integer beyond canonical JSON's range is no real timestamp.
    if isinstance(ts, int) and not isinstance(ts, bool) and 0 <= ts <= MAX_JSON_INT:
        return ts
    return 0

"""Events as a homeserver pushes them, for tests of the store and what reads it."""

from __future__ import annotations

import base64
import secrets
from typing import Any

from relay.core.ingest_plan import RoomPolicy, TransactionPlan, plan_transaction
from relay.store import Store

BOT = "@mediarelay:example.org"
POLICY = RoomPolicy.build(BOT, ["example.org"], [])


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def invite(room_id: str, sender: str = "@admin:example.org") -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "room_id": room_id,
        "event_id": "$i" + secrets.token_hex(6),
        "sender": sender,
        "state_key": BOT,
        "origin_server_ts": 1,
        "content": {"membership": "invite"},
    }


def kick(room_id: str) -> dict[str, Any]:
    return {**invite(room_id), "content": {"membership": "leave"}}


def image(
    room_id: str, event_id: str, media_id: str, ts: int = 10, **content: Any
) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "room_id": room_id,
        "event_id": event_id,
        "sender": "@alice:example.org",
        "origin_server_ts": ts,
        "content": {
            "msgtype": "m.image",
            "body": "photo.jpg",
            "url": f"mxc://example.org/{media_id}",
            "info": {"mimetype": "image/jpeg", "size": 10},
            **content,
        },
    }


def redaction(room_id: str, target: str, sender: str = "@alice:example.org") -> dict[str, Any]:
    return {
        "type": "m.room.redaction",
        "room_id": room_id,
        "event_id": "$r" + secrets.token_hex(6),
        "sender": sender,
        "origin_server_ts": 20,
        "content": {"redacts": target},
    }


async def commit(store: Store, events: list[dict[str, Any]]) -> TransactionPlan:
    rooms = {e["room_id"] for e in events}
    served = await store.served_rooms(rooms)
    plan = plan_transaction(events, served, POLICY, await store.power_levels(rooms))
    assert await store.commit_transaction(secrets.token_hex(8), plan) is not None
    return plan


def edit(room_id: str, event_id: str, original: str, media_id: str) -> dict[str, Any]:
    """An m.replace edit whose new content brings in another image."""
    new = {"msgtype": "m.image", "body": "new.jpg", "url": f"mxc://example.org/{media_id}"}
    return {
        "type": "m.room.message",
        "room_id": room_id,
        "event_id": event_id,
        "sender": "@alice:example.org",
        "origin_server_ts": 15,
        "content": {
            "msgtype": "m.image",
            "body": "* new.jpg",
            "url": f"mxc://example.org/{media_id}",
            "m.new_content": new,
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        },
    }


def from_sender(event: dict[str, Any], sender: str) -> dict[str, Any]:
    return {**event, "sender": sender}


def power_levels(room_id: str, users: dict[str, int]) -> dict[str, Any]:
    return {
        "type": "m.room.power_levels",
        "state_key": "",
        "room_id": room_id,
        "event_id": "$pl" + secrets.token_hex(6),
        "sender": "@admin:example.org",
        "origin_server_ts": 5,
        "content": {"users": users, "users_default": 0, "redact": 50},
    }

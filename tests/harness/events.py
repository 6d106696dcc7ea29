"""Room events as a homeserver pushes them in transactions, for tests that push them directly."""

from __future__ import annotations

from typing import Any


def image_event(event_id: str, media_id: str, room_id: str, **content: Any) -> dict[str, Any]:
    """An ``m.image`` message by ``@someone:localhost`` of ``mxc://localhost/{media_id}``.

    ``content`` keys replace the defaults (``body``, ``info``…) or add fields.
    """
    return {
        "type": "m.room.message",
        "room_id": room_id,
        "event_id": event_id,
        "sender": "@someone:localhost",
        "origin_server_ts": 1_700_000_000_000,
        "content": {
            "msgtype": "m.image",
            "body": "cat.png",
            "url": f"mxc://localhost/{media_id}",
            "info": {"mimetype": "image/png", "size": 1234, "w": 64, "h": 48},
            **content,
        },
    }

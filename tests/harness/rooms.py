"""Scenario helpers: a room the relay serves, as a user would set it up."""

from __future__ import annotations

from relay.app import Relay
from tests.harness.matrix_client import MatrixUser
from tests.harness.waiting import eventually


async def served_room(relay: Relay, user: MatrixUser) -> str:
    """Create a room, invite the relay's bot, and wait until the bot has joined."""
    assert relay.store is not None
    room_id = await user.create_room(invite=[relay.config.bot_user_id])

    async def joined() -> bool:
        assert relay.store is not None
        return room_id in await relay.store.served_rooms([room_id]) and (
            room_id not in await relay.store.rooms_joining()
        )

    await eventually(joined)
    return room_id

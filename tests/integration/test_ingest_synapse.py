"""Ingest against the real Synapse: invites, media events, redactions, redelivery after downtime."""

from __future__ import annotations

import pytest

from relay.app import Relay
from relay.core.mxc import MediaId, parse_mxc
from relay.core.records import MediaRecord
from tests.harness import make_png
from tests.harness.matrix_client import MatrixRequestError, MatrixUser, image_content, seg
from tests.harness.relay import MakeConfig, StartRelay
from tests.harness.rooms import served_room
from tests.harness.waiting import eventually

pytestmark = pytest.mark.synapse


async def record_of(relay: Relay, media: MediaId) -> MediaRecord | None:
    assert relay.store is not None
    return await relay.store.media_record(media)


async def bot_membership(user: MatrixUser, room_id: str, bot: str) -> str | None:
    try:
        state = await user.request(
            "GET", f"/_matrix/client/v3/rooms/{seg(room_id)}/state/m.room.member/{seg(bot)}"
        )
    except MatrixRequestError as e:
        if e.status == 404:
            return None
        raise
    return state.get("membership")


async def test_image_recorded_then_redaction_revokes(
    start_relay: StartRelay, alice: MatrixUser
) -> None:
    """An image in a room the bot was invited to is recorded; redacting it revokes the media."""
    relay = await start_relay()
    room_id = await served_room(relay, alice)
    png = make_png(64, 48)
    mxc = await alice.upload(png, "image/png", "cat.png")
    event_id = await alice.send_message(
        room_id, image_content(mxc, body="cat.png", size=len(png), width=64, height=48)
    )
    media = parse_mxc(mxc)
    record = await eventually(lambda: record_of(relay, media))
    assert (record.event_id, record.room_id) == (event_id, room_id)
    assert (record.mimetype, record.size, record.filename) == ("image/png", len(png), "cat.png")

    await alice.redact(room_id, event_id)
    assert relay.store is not None
    store = relay.store
    await eventually(lambda: store.is_revoked(media))
    assert relay.metrics.value("relay_revocations") == 1


async def test_avatar_and_sticker_recorded(start_relay: StartRelay, alice: MatrixUser) -> None:
    """A member avatar and a sticker in a served room are both recorded."""
    relay = await start_relay()
    room_id = await served_room(relay, alice)
    avatar = await alice.upload(make_png(8, 8), "image/png")
    sticker = await alice.upload(make_png(16, 16), "image/png")
    await alice.send_state(
        room_id, "m.room.member", {"membership": "join", "avatar_url": avatar}, alice.user_id
    )
    await alice.send_event(
        room_id, "m.sticker", {"body": "wave", "url": sticker, "info": {"mimetype": "image/png"}}
    )
    for mxc in (avatar, sticker):
        media = parse_mxc(mxc)
        await eventually(lambda media=media: record_of(relay, media))
    assert relay.metrics.value("relay_media_references", {"role": "avatar"}) >= 1
    assert relay.metrics.value("relay_media_references", {"role": "content"}) >= 1


async def test_events_sent_while_down_arrive_once(
    make_config: MakeConfig, start_relay: StartRelay, alice: MatrixUser
) -> None:
    """With the relay stopped, events sent meanwhile arrive after restart (Synapse retries)."""
    config = make_config()
    relay = await start_relay(config)
    room_id = await served_room(relay, alice)
    await relay.stop()

    mxc = await alice.upload(make_png(10, 10), "image/png", "while-down.png")
    await alice.send_message(room_id, image_content(mxc, body="while-down.png"))

    restarted = await start_relay(config)
    media = parse_mxc(mxc)
    await eventually(lambda: record_of(restarted, media), within=60)
    assert restarted.store is not None
    rows = await restarted.store.db.fetchval(
        "SELECT COUNT(*) FROM media_reference WHERE server_name = $1 AND media_id = $2",
        media.server_name,
        media.media_id,
    )
    assert rows == 1


async def test_invite_from_disallowed_user_is_declined(
    make_config: MakeConfig, start_relay: StartRelay, alice: MatrixUser
) -> None:
    """An invite from someone outside appservice.allowed_inviters is declined, room not served."""
    relay = await start_relay(make_config(appservice={"allowed_inviters": ["@admin:localhost"]}))
    bot = relay.config.bot_user_id
    room_id = await alice.create_room(invite=[bot])

    async def declined() -> bool:
        return await bot_membership(alice, room_id, bot) == "leave"

    await eventually(declined)
    assert relay.store is not None
    assert await relay.store.served_rooms([room_id]) == set()


async def test_kick_stops_serving_the_room(start_relay: StartRelay, alice: MatrixUser) -> None:
    """After the bot is kicked, the room's media is no longer known as signable."""
    relay = await start_relay()
    room_id = await served_room(relay, alice)
    mxc = await alice.upload(make_png(12, 12), "image/png")
    await alice.send_message(room_id, image_content(mxc))
    media = parse_mxc(mxc)
    await eventually(lambda: record_of(relay, media))
    await alice.kick(room_id, relay.config.bot_user_id)

    async def forgotten() -> bool:
        return await record_of(relay, media) is None

    await eventually(forgotten)

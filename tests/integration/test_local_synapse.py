"""The test harness against a real Synapse: the homeserver facts the relay relies on.

Appservice identity, as observed on Synapse 1.163: the as_token alone is accepted;
``GET /account/whoami`` answers the registration's ``sender_localpart`` user even
though that user was never registered, and the same token can already download
media and join rooms. Registering the sender (``POST /_matrix/client/v3/register``
with ``{"type": "m.login.application_service", "username": "<sender_localpart>"}``
and the as_token) is only needed for it to have a profile (before it, ``GET
/profile/@mediarelay:…`` answers 404); a second registration answers 400
``M_USER_IN_USE``, which a restarting appservice must treat as success.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import pytest

from relay.core.mxc import parse_mxc
from relay.devtools.local_synapse import LocalSynapse, pid_is_running
from tests.harness import make_png
from tests.harness.fixtures import MakeUser, RelayRegistration
from tests.harness.matrix_client import MatrixRequestError, MatrixUser, image_content

pytestmark = pytest.mark.synapse

PNG = make_png(64, 48)


async def test_versions_lists_v1_11_or_later(alice: MatrixUser) -> None:
    """/versions advertises Matrix 1.11+ (authenticated media, MSC3916)."""
    async with alice.session.get(alice.base_url + "/_matrix/client/versions") as response:
        assert response.status == 200
        body = await response.json()
    versions = {
        (int(match[1]), int(match[2]))
        for version in body["versions"]
        if (match := re.fullmatch(r"v(\d+)\.(\d+)", version))
    }
    assert max(versions) >= (1, 11)


async def test_upload_and_authenticated_download_round_trip(alice: MatrixUser) -> None:
    """Uploaded bytes come back unchanged from /_matrix/client/v1/media/download."""
    data = secrets.token_bytes(64 * 1024)
    mxc = await alice.upload(data, "application/octet-stream", "blob.bin")
    media = parse_mxc(mxc)
    assert media.server_name == alice.server_name

    status, headers, body = await alice.download_authenticated(media.server_name, media.media_id)

    assert status == 200
    assert body == data
    assert headers["Content-Type"] == "application/octet-stream"


async def test_authenticated_download_without_token_is_401(alice: MatrixUser) -> None:
    """Without an access token the authenticated endpoint answers 401 M_MISSING_TOKEN, no bytes."""
    data = b"secret bytes"
    media = parse_mxc(await alice.upload(data, "text/plain"))

    status, _, body = await alice.download_authenticated(
        media.server_name, media.media_id, authenticated=False
    )

    assert status == 401
    assert json.loads(body)["errcode"] == "M_MISSING_TOKEN"
    assert data not in body


async def test_legacy_download_path_is_frozen(alice: MatrixUser) -> None:
    """New media is 404 M_NOT_FOUND on the unauthenticated /_matrix/media/v3/download path."""
    data = b"frozen legacy path"
    media = parse_mxc(await alice.upload(data, "text/plain"))

    status, _, body = await alice.download_legacy(media.server_name, media.media_id)

    assert status == 404
    assert json.loads(body)["errcode"] == "M_NOT_FOUND"
    assert data not in body


async def test_as_token_whoami_is_the_bot_without_registration(
    relay_bot: MatrixUser, relay_registration: RelayRegistration
) -> None:
    """The as_token is accepted as the sender_localpart user before any registration."""
    assert await relay_bot.whoami() == f"@mediarelay:{relay_registration.server_name}"


async def test_as_token_downloads_media(alice: MatrixUser, relay_bot: MatrixUser) -> None:
    """The appservice's own identity can fetch any local media through the v1 endpoint."""
    data = secrets.token_bytes(1024)
    media = parse_mxc(await alice.upload(data, "application/octet-stream"))

    status, _, body = await relay_bot.download_authenticated(media.server_name, media.media_id)

    assert status == 200
    assert body == data


async def test_room_invite_and_image_message(alice: MatrixUser, make_user: MakeUser) -> None:
    """A created room, an accepted invite and an m.image event that the invitee can read."""
    bob = await make_user("bob")
    room_id = await alice.create_room(invite=[bob.user_id], name="harness")
    await bob.join(room_id)
    mxc = await alice.upload(PNG, "image/png", "dot.png")

    event_id = await alice.send_message(
        room_id, image_content(mxc, body="dot.png", size=len(PNG), width=64, height=48)
    )

    event = await bob.get_event(room_id, event_id)
    assert event["type"] == "m.room.message"
    assert event["sender"] == alice.user_id
    assert event["content"]["msgtype"] == "m.image"
    assert event["content"]["url"] == mxc


async def test_redact_removes_the_media_reference(alice: MatrixUser) -> None:
    """A redacted m.image loses its content (and with it the mxc URI)."""
    room_id = await alice.create_room()
    mxc = await alice.upload(PNG, "image/png")
    event_id = await alice.send_message(room_id, image_content(mxc))

    redaction_id = await alice.redact(room_id, event_id, reason="test")

    event = await alice.get_event(room_id, event_id)
    assert redaction_id != event_id
    assert event["content"] == {}


async def test_errors_carry_status_and_errcode(alice: MatrixUser, make_user: MakeUser) -> None:
    """A refused client request raises MatrixRequestError with the status and errcode."""
    outsider = await make_user("outsider")
    room_id = await alice.create_room()

    with pytest.raises(MatrixRequestError) as caught:
        await outsider.send_message(room_id, {"msgtype": "m.text", "body": "let me in"})

    assert caught.value.status == 403
    assert caught.value.errcode == "M_FORBIDDEN"


async def test_register_user_twice_is_refused(synapse: LocalSynapse) -> None:
    """Shared-secret registration of a taken localpart raises with M_USER_IN_USE."""
    localpart = f"twice-{secrets.token_hex(4)}"
    user_id, _ = await synapse.register_user(localpart)
    assert user_id == f"@{localpart}:{synapse.server_name}"

    with pytest.raises(RuntimeError, match="M_USER_IN_USE"):
        await synapse.register_user(localpart)


async def test_stop_ends_the_process_and_is_idempotent(tmp_path: Path) -> None:
    """stop() terminates Synapse (pid gone, port closed) and a second stop() is harmless."""
    homeserver = LocalSynapse(workdir=tmp_path / "hs", registration_files=[])
    async with homeserver:
        pid = homeserver.pid
        assert pid is not None
        assert pid_is_running(pid)
    assert homeserver.pid is None
    assert not pid_is_running(pid)

    await homeserver.stop()

    assert "Received SIGTERM" in homeserver.log_tail()


async def test_start_failure_raises_with_log_tail(tmp_path: Path) -> None:
    """A Synapse that cannot start raises RuntimeError quoting its log, and leaves no process."""
    missing = tmp_path / "no-such-registration.yaml"
    homeserver = LocalSynapse(workdir=tmp_path / "hs", registration_files=[missing])

    with pytest.raises(RuntimeError, match="exited during start-up") as caught:
        await homeserver.start(timeout=60)

    assert "no-such-registration.yaml" in str(caught.value)
    assert homeserver.pid is None

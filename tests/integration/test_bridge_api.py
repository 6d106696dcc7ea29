"""The bridge API against a real relay and Synapse: tokens, body checks, ttl caps, rewrite."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest

from relay.app import Relay
from tests.harness import make_png
from tests.harness.encryption import encrypt_attachment, encrypted_file_json
from tests.harness.links import fetch, post_media, wait_recorded
from tests.harness.matrix_client import MatrixUser, image_content
from tests.harness.relay import BRIDGE_TOKEN, MakeConfig, StartRelay
from tests.harness.rooms import served_room
from tests.harness.waiting import eventually

pytestmark = pytest.mark.synapse

SIGN = "/_relay/v1/sign"
REWRITE = "/_relay/v1/rewrite"
BRIDGE_TTL = 7200  # bridges[0].ttl in the harness config
SIGNING_TTL = 3600  # signing.ttl in the harness config
UNSEEN = "mxc://localhost/NeverPostedAnywhere"


async def call(
    session: aiohttp.ClientSession,
    relay: Relay,
    path: str,
    body: object = None,
    *,
    raw: bytes | None = None,
    token: str | None = BRIDGE_TOKEN,
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    async with session.post(relay.internal_url + path, data=data, headers=headers) as resp:
        return resp.status, await resp.json()


def signed_count(relay: Relay) -> float:
    return relay.metrics.value("relay_signed_urls", {"source": "testbridge"})


@pytest.fixture
async def relay(start_relay: StartRelay) -> Relay:
    return await start_relay()


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [(None, 401, "M_MISSING_TOKEN"), ("wrong-token", 403, "M_FORBIDDEN"), ("", 403, "M_FORBIDDEN")],
)
async def test_bridge_token_is_required(
    relay: Relay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    token: str | None,
    status: int,
    code: str,
) -> None:
    """Missing token → 401 M_MISSING_TOKEN, wrong → 403 M_FORBIDDEN, and nothing is signed."""
    _, mxc, _ = await post_media(relay, alice, make_png(24, 24), "image/png", "cat.png")
    for path, body in ((SIGN, {"mxc": mxc}), (REWRITE, {"content": image_content(mxc)})):
        got_status, answer = await call(http_session, relay, path, body, token=token)
        assert (got_status, answer["errcode"]) == (status, code)
        assert "url" not in answer and "content" not in answer
    assert signed_count(relay) == 0


@pytest.mark.parametrize(
    ("body", "raw", "status", "code"),
    [
        (None, b"{not json", 400, "M_NOT_JSON"),
        (None, b"\xff\xfe", 400, "M_NOT_JSON"),
        (["mxc://localhost/abc"], None, 400, "M_BAD_JSON"),
        ({}, None, 400, "M_MISSING_PARAM"),
        ({"mxc": 12}, None, 400, "M_INVALID_PARAM"),
        ({"mxc": "https://localhost/abc"}, None, 400, "M_INVALID_PARAM"),
        ({"mxc": "mxc://example.org/../../v3/joined_rooms"}, None, 400, "M_INVALID_PARAM"),
        ({"mxc": "mxc://localhost/a%2Fb"}, None, 400, "M_INVALID_PARAM"),
        ({"mxc": "mxc://localhost/abc", "ttl": 0}, None, 400, "M_INVALID_PARAM"),
        ({"mxc": "mxc://localhost/abc", "ttl": "60"}, None, 400, "M_INVALID_PARAM"),
        ({"mxc": "mxc://localhost/abc", "ttl": True}, None, 400, "M_INVALID_PARAM"),
        ({"mxc": "mxc://localhost/abc", "ttl": 1.5}, None, 400, "M_INVALID_PARAM"),
        ({"mxc": "mxc://localhost/abc", "filename": ""}, None, 400, "M_INVALID_PARAM"),
        ({"mxc": "mxc://localhost/abc", "filename": 7}, None, 400, "M_INVALID_PARAM"),
        ({"mxc": "mxc://localhost/abc", "filename": "x" * 256}, None, 400, "M_INVALID_PARAM"),
        ({"mxc": "mxc://localhost/abc", "thumbnail": []}, None, 400, "M_INVALID_PARAM"),
        (
            {"mxc": "mxc://localhost/abc", "thumbnail": {"width": 0, "height": 5}},
            None,
            400,
            "M_INVALID_PARAM",
        ),
        (
            {"mxc": "mxc://localhost/abc", "thumbnail": {"width": 5, "height": 10**6}},
            None,
            400,
            "M_INVALID_PARAM",
        ),
        (
            {"mxc": "mxc://localhost/abc", "thumbnail": {"width": 5, "height": 5, "method": "x"}},
            None,
            400,
            "M_INVALID_PARAM",
        ),
        ({"mxc": UNSEEN}, None, 404, "M_NOT_FOUND"),
    ],
)
async def test_sign_refuses_bad_requests(
    relay: Relay,
    http_session: aiohttp.ClientSession,
    body: object,
    raw: bytes | None,
    status: int,
    code: str,
) -> None:
    """Bad bodies and unseen media get the exact status and errcode, and no URL."""
    got_status, answer = await call(http_session, relay, SIGN, body, raw=raw)
    assert (got_status, answer["errcode"]) == (status, code)
    assert "url" not in answer
    assert signed_count(relay) == 0


async def test_sign_filename_that_cannot_be_a_path_segment(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """A filename of '.' or '..' (which a browser would resolve away) is 400 M_INVALID_PARAM."""
    _, mxc, _ = await post_media(relay, alice, make_png(24, 24), "image/png", "cat.png")
    for name in (".", ".."):
        status, answer = await call(http_session, relay, SIGN, {"mxc": mxc, "filename": name})
        assert (status, answer["errcode"]) == (400, "M_INVALID_PARAM")
    assert signed_count(relay) == 0


@pytest.mark.parametrize(
    ("asked", "granted"),
    [(None, SIGNING_TTL), (60, 60), (BRIDGE_TTL, BRIDGE_TTL), (10**6, BRIDGE_TTL)],
)
async def test_ttl_default_and_bridge_cap(
    relay: Relay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    asked: int | None,
    granted: int,
) -> None:
    """No ttl → signing.ttl; a larger ask is clamped to the bridge's ttl; expires_at says so."""
    _, mxc, _ = await post_media(relay, alice, make_png(24, 24), "image/png", "cat.png")
    body: dict[str, Any] = {"mxc": mxc}
    if asked is not None:
        body["ttl"] = asked
    before = time.time()
    status, answer = await call(http_session, relay, SIGN, body)
    after = time.time()
    assert status == 200
    expires_at = answer["expires_at"]
    assert isinstance(expires_at, int) and expires_at % 1000 == 0
    assert (before + granted) * 1000 <= expires_at <= (after + granted + 1) * 1000
    token = answer["url"].rsplit("/", 1)[1]
    assert int(token.split(".")[2]) * 1000 == expires_at
    assert signed_count(relay) == 1


async def test_sign_with_filename_and_thumbnail(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """The filename ends the URL and a thumbnail is bound into the token's variant field."""
    _, mxc, _ = await post_media(relay, alice, make_png(24, 24), "image/png", "cat.png")
    status, answer = await call(
        http_session,
        relay,
        SIGN,
        {
            "mxc": mxc,
            "filename": "a b.png",
            "thumbnail": {"width": 64, "height": 48, "method": "crop"},
        },
    )
    assert status == 200
    assert answer["url"].startswith(relay.config.public.url)
    token, filename = answer["url"].rsplit("/", 2)[1:]
    assert filename == "a%20b.png"
    assert token.split(".")[3] == "c64x48"


async def test_redacted_media_is_not_signed(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """Once its event is redacted, media is refused with 410 and left out of rewrites."""
    room_id, mxc, event_id = await post_media(
        relay, alice, make_png(24, 24), "image/png", "cat.png"
    )
    await alice.redact(room_id, event_id)

    async def refused() -> bool:
        return (await call(http_session, relay, SIGN, {"mxc": mxc}))[0] == 410

    await eventually(refused)
    status, answer = await call(http_session, relay, SIGN, {"mxc": mxc})
    assert (status, answer["errcode"]) == (410, "M_NOT_FOUND")
    status, answer = await call(http_session, relay, REWRITE, {"content": image_content(mxc)})
    assert status == 200
    assert answer["media"] == []
    assert "url_https" not in answer["content"]


async def test_require_seen_off_signs_unseen_media(
    make_config: MakeConfig, start_relay: StartRelay, http_session: aiohttp.ClientSession
) -> None:
    """With signing.require_seen false, any valid mxc is signed."""
    relay = await start_relay(make_config(signing={"require_seen": False}))
    status, answer = await call(http_session, relay, SIGN, {"mxc": UNSEEN})
    assert status == 200
    assert answer["url"].startswith(relay.config.public.url)


async def test_rewrite_every_reference_and_serve_decrypted(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """Rewrite adds <key>_https beside url, thumbnail_url and file; the file link is plaintext."""
    room_id = await served_room(relay, alice)
    image = make_png(48, 48)
    thumb = make_png(8, 8)
    image_mxc = await alice.upload(image, "image/png", "photo.png")
    thumb_mxc = await alice.upload(thumb, "image/png", "thumb.png")
    plaintext = b"secret report contents " * 50
    ciphertext, enc = encrypt_attachment(plaintext)
    file_mxc = await alice.upload(ciphertext, "application/octet-stream")
    encrypted_file = encrypted_file_json(file_mxc, enc)
    image_msg = image_content(image_mxc, body="photo.png")
    image_msg["info"]["thumbnail_url"] = thumb_mxc
    file_msg = {
        "msgtype": "m.file",
        "body": "report.txt",
        "file": encrypted_file,
        "info": {"mimetype": "text/plain"},
    }
    await alice.send_message(room_id, image_msg)
    await alice.send_message(room_id, file_msg)
    for mxc in (image_mxc, thumb_mxc, file_mxc):
        await wait_recorded(relay, mxc)

    spoofed = {**image_msg, "url_https": "https://evil.example/x"}
    status, answer = await call(http_session, relay, REWRITE, {"content": spoofed})
    assert status == 200
    content = answer["content"]
    assert content["url"] == image_mxc
    assert content["url_https"] != "https://evil.example/x"
    assert content["url_https"].endswith("/photo.png")
    by_path = {tuple(item["path"]): item for item in answer["media"]}
    assert set(by_path) == {("url",), ("info", "thumbnail_url")}
    assert by_path[("info", "thumbnail_url")]["role"] == "thumbnail"
    for path, data in ((("url",), image), (("info", "thumbnail_url"), thumb)):
        assert isinstance(by_path[path]["expires_at"], int)
        status, _, body = await fetch(http_session, by_path[path]["url"])
        assert (status, body) == (200, data)

    status, answer = await call(
        http_session, relay, REWRITE, {"content": file_msg, "type": "m.room.message"}
    )
    assert status == 200
    link = answer["content"]["file_https"]
    assert link.endswith("/report.txt")
    assert answer["content"]["file"] == encrypted_file
    status, headers, body = await fetch(http_session, link)
    assert (status, body) == (200, plaintext)
    assert headers["Content-Type"] == "text/plain"
    # Image, its thumbnail_url, its rendered preview (thumbnail_url in media), the file.
    assert signed_count(relay) == 4


async def test_rewrite_leaves_unseen_media_alone(
    relay: Relay, http_session: aiohttp.ClientSession
) -> None:
    """Unseen references get no link and are not listed; other content is untouched."""
    content = image_content(UNSEEN, body="x.png", extra_field={"keep": [1, 2]})
    status, answer = await call(http_session, relay, REWRITE, {"content": content})
    assert (status, answer) == (200, {"content": content, "media": []})
    assert signed_count(relay) == 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "M_BAD_JSON"),
        ({"content": "text"}, "M_BAD_JSON"),
        ({"content": {}, "type": 5}, "M_INVALID_PARAM"),
        ({"content": {}, "ttl": -5}, "M_INVALID_PARAM"),
    ],
)
async def test_rewrite_refuses_bad_bodies(
    relay: Relay, http_session: aiohttp.ClientSession, body: dict[str, Any], code: str
) -> None:
    """A rewrite body without an object 'content', or with bad 'type'/'ttl', is a 400."""
    status, answer = await call(http_session, relay, REWRITE, body)
    assert (status, answer["errcode"]) == (400, code)


async def test_ready(relay: Relay, http_session: aiohttp.ClientSession) -> None:
    """GET /_relay/ready is 200 while the database answers and the token is accepted."""
    async with http_session.get(relay.internal_url + "/_relay/ready") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"
    async with http_session.get(relay.public_url + "/_relay/ready") as resp:
        assert resp.status == 404

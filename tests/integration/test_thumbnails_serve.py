"""Thumbnails and metadata-stripped originals, end to end: real Synapse, real relay."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from relay.app import Relay
from relay.core.exit_codes import EXIT_OK, EXIT_USAGE
from relay.core.mxc import parse_mxc
from relay.media.downloads import MediaSource
from relay.media.renditions import derived_key
from tests.harness.encryption import encrypt_attachment, encrypted_file_json
from tests.harness.images import GPS_IFD, bomb_png, gps_jpeg, image_bytes
from tests.harness.links import errcode, fetch, post_media, run_sign, sign, wait_recorded
from tests.harness.matrix_client import MatrixUser
from tests.harness.relay import BRIDGE_TOKEN, MakeConfig, StartRelay
from tests.harness.rooms import served_room
from tests.harness.waiting import eventually

pytestmark = pytest.mark.synapse


@pytest.fixture
async def relay(start_relay: StartRelay) -> Relay:
    return await start_relay()


def generated(relay: Relay) -> float:
    return relay.metrics.value("relay_thumbnails_generated")


def decoded(data: bytes) -> tuple[str | None, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as im:
        return im.format, im.size


def thumb(width: int, height: int, method: str = "scale") -> dict[str, Any]:
    return {"thumbnail": {"width": width, "height": height, "method": method}}


async def test_exact_sizes_for_scale_and_crop(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """Scale fits inside keeping the aspect, crop fills exactly; tiny sources are never enlarged."""
    room_id = await served_room(relay, alice)
    cases = {
        (400, 300): [((64, 48, "scale"), (64, 48)), ((64, 64, "crop"), (64, 64))],
        (300, 400): [((64, 48, "scale"), (36, 48)), ((50, 20, "crop"), (50, 20))],
        (10, 6): [((64, 48, "scale"), (10, 6)), ((64, 48, "crop"), (8, 6))],
    }
    for source, requests in cases.items():
        data = image_bytes("PNG", source)
        _, mxc, _ = await post_media(relay, alice, data, "image/png", "p.png", room_id=room_id)
        for (width, height, method), expected in requests:
            url = (await sign(http_session, relay, mxc, **thumb(width, height, method)))["url"]
            status, headers, body = await fetch(http_session, url)
            assert status == 200, (source, method, body[:200])
            assert decoded(body) == ("JPEG", expected), (source, width, height, method)
            assert headers["Content-Type"] == "image/jpeg"
    assert generated(relay) == 6


async def test_thumbnail_headers_and_cache(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """A thumbnail has its own type, name, ETag and length; the second request is a cache hit."""
    _, mxc, _ = await post_media(
        relay, alice, image_bytes("PNG", (200, 100)), "image/png", "cat.png"
    )
    url = (await sign(http_session, relay, mxc, **thumb(80, 80)))["url"]
    status, headers, body = await fetch(http_session, url)
    assert status == 200
    assert decoded(body) == ("JPEG", (80, 40))
    assert headers["Content-Type"] == "image/jpeg"
    assert headers["Content-Disposition"] == "inline; filename=cat.jpg"
    tag = f'"{hashlib.sha256(body).hexdigest()}"'
    assert headers["ETag"] == tag
    assert headers["Content-Length"] == str(len(body))
    assert generated(relay) == 1

    status, headers, again = await fetch(http_session, url)
    assert (status, again, headers["ETag"]) == (200, body, tag)
    status, _, empty = await fetch(http_session, url, **{"If-None-Match": tag})
    assert (status, empty) == (304, b"")
    status, headers, part = await fetch(http_session, url, Range="bytes=0-9")
    assert (status, part, headers["Content-Range"]) == (206, body[:10], f"bytes 0-9/{len(body)}")
    status, headers, none = await fetch(http_session, url, "HEAD")
    assert (status, none, headers["Content-Length"]) == (200, b"", str(len(body)))
    assert generated(relay) == 1


async def test_fifty_concurrent_requests_render_once(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """Fifty simultaneous requests for one uncached thumbnail cause exactly one render."""
    _, mxc, _ = await post_media(
        relay, alice, image_bytes("PNG", (640, 480)), "image/png", "big.png"
    )
    url = (await sign(http_session, relay, mxc, **thumb(100, 100, "crop")))["url"]
    answers = await asyncio.gather(*(fetch(http_session, url) for _ in range(50)))
    assert {status for status, _, _ in answers} == {200}
    assert len({body for _, _, body in answers}) == 1
    assert decoded(answers[0][2]) == ("JPEG", (100, 100))
    assert generated(relay) == 1
    assert relay.metrics.value("relay_upstream_requests", {"outcome": "ok"}) == 1


async def test_decompression_bomb_is_refused(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """A 400-megapixel PNG of a few kilobytes is refused with 422 M_UNKNOWN, nothing rendered."""
    data = bomb_png(20_000, 20_000)
    assert len(data) < 200_000
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "bomb.png")
    url = (await sign(http_session, relay, mxc, **thumb(64, 64)))["url"]
    status, headers, body = await fetch(http_session, url)
    assert status == 422
    assert errcode(body) == "M_UNKNOWN"
    assert "pixels" in json.loads(body)["error"]
    assert headers["Cache-Control"] == "no-store"
    assert generated(relay) == 0
    assert relay.media_source is not None
    original = MediaSource.cache_key(parse_mxc(mxc))
    assert derived_key(original, "thumb-64x64-scale") not in relay.media_source.cache


async def test_gps_is_removed_from_thumbnail_and_original(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """GPS EXIF leaves the thumbnail and the served original; the original's pixels stay."""
    data = gps_jpeg()
    _, mxc, _ = await post_media(relay, alice, data, "image/jpeg", "trip.jpg")
    with Image.open(io.BytesIO(data)) as uploaded:
        assert uploaded.getexif().get_ifd(GPS_IFD)
        pixels = uploaded.tobytes()

    url = (await sign(http_session, relay, mxc, **thumb(60, 40)))["url"]
    status, _, small = await fetch(http_session, url)
    assert status == 200
    with Image.open(io.BytesIO(small)) as im:
        assert not im.getexif()
        assert "exif" not in im.info and "icc_profile" not in im.info
    assert b"PhoneMaker" not in small

    url = (await sign(http_session, relay, mxc))["url"]
    for method in ("GET", "GET", "HEAD"):  # first from the download, then from the cache
        status, headers, served = await fetch(http_session, url, method)
        assert status == 200
        if method == "GET":
            body = served
        assert headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"'
        assert headers["Content-Length"] == str(len(body))
        assert headers["Content-Type"] == "image/jpeg"
    assert body != data
    assert b"PhoneMaker" not in body
    with Image.open(io.BytesIO(body)) as im:
        assert not im.getexif().get_ifd(GPS_IFD)
        assert im.tobytes() == pixels


async def test_strip_metadata_false_serves_the_original_bytes(
    make_config: MakeConfig,
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
) -> None:
    """With media.strip_metadata: false the original is served byte for byte, GPS included."""
    relay = await start_relay(make_config(media={"strip_metadata": False}))
    data = gps_jpeg()
    _, mxc, _ = await post_media(relay, alice, data, "image/jpeg", "trip.jpg")
    url = (await sign(http_session, relay, mxc))["url"]
    status, _, body = await fetch(http_session, url)  # streamed while downloading
    assert (status, body) == (200, data)
    status, headers, body = await fetch(http_session, url)  # from the cache
    assert (status, body) == (200, data)
    assert headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'


@pytest.mark.parametrize(
    ("data", "content_type", "filename", "msgtype", "message"),
    [
        (
            b"<html><script>alert(1)</script></html>",
            "image/png",
            "fake.png",
            "m.image",
            "not a JPEG, PNG, WebP or GIF image",
        ),
        (b"just some words\n" * 20, "text/plain", "notes.txt", "m.file", "Only images"),
    ],
)
async def test_non_images_have_no_thumbnail(
    relay: Relay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    data: bytes,
    content_type: str,
    filename: str,
    msgtype: str,
    message: str,
) -> None:
    """HTML named .png (type image/png) and text/plain → 400 M_UNKNOWN with a clear message."""
    _, mxc, _ = await post_media(relay, alice, data, content_type, filename, msgtype=msgtype)
    url = (await sign(http_session, relay, mxc, **thumb(32, 32)))["url"]
    for method in ("GET", "HEAD"):
        status, headers, body = await fetch(http_session, url, method)
        assert status == 400, method
        assert headers["Content-Type"] == "application/json"
    assert errcode(body := (await fetch(http_session, url))[2]) == "M_UNKNOWN"
    assert message in json.loads(body)["error"]
    assert data not in body
    assert generated(relay) == 0


async def test_redacted_event_thumbnail_is_410_and_purged(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """After a redaction a thumbnail link answers 410 and the rendered thumbnail is removed."""
    room_id, mxc, event_id = await post_media(
        relay, alice, image_bytes("PNG"), "image/png", "cat.png"
    )
    url = (await sign(http_session, relay, mxc, **thumb(32, 32)))["url"]
    assert (await fetch(http_session, url))[0] == 200
    assert relay.media_source is not None
    cache = relay.media_source.cache
    key = derived_key(MediaSource.cache_key(parse_mxc(mxc)), "thumb-32x32-scale")
    entry = cache.lookup(key)
    assert entry is not None

    await alice.redact(room_id, event_id)

    async def revoked() -> bool:
        return (await fetch(http_session, url))[0] == 410

    await eventually(revoked)
    status, _, body = await fetch(http_session, url)
    assert (status, errcode(body)) == (410, "M_NOT_FOUND")
    assert key not in cache
    assert not entry.path.exists()
    assert generated(relay) == 1


async def test_encrypted_image_thumbnail(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """An encrypted image is thumbnailed from its decrypted plaintext."""
    room_id = await served_room(relay, alice)
    ciphertext, enc = encrypt_attachment(image_bytes("PNG", (90, 60)))
    mxc = await alice.upload(ciphertext, "application/octet-stream")
    encrypted_file = encrypted_file_json(mxc, enc)
    content = {"msgtype": "m.image", "body": "secret.png", "file": encrypted_file}
    content["info"] = {"mimetype": "image/png"}
    await alice.send_message(room_id, content)
    await wait_recorded(relay, mxc)
    url = (await sign(http_session, relay, mxc, **thumb(30, 30, "crop")))["url"]
    status, headers, body = await fetch(http_session, url)
    assert status == 200, body[:200]
    assert decoded(body) == ("JPEG", (30, 30))
    assert headers["Content-Disposition"] == "inline; filename=secret.jpg"


async def test_rewrite_offers_a_thumbnail_beside_images_only(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """/rewrite lists thumbnail_url for an image (a working 320x240 scale), none for a file."""
    room_id, image_mxc, _ = await post_media(
        relay, alice, image_bytes("PNG", (800, 400)), "image/png", "wide.png"
    )
    _, file_mxc, _ = await post_media(
        relay, alice, b"words", "text/plain", "a.txt", room_id=room_id, msgtype="m.file"
    )
    answers = []
    for mxc, mimetype in ((image_mxc, "image/png"), (file_mxc, "text/plain")):
        content = {"msgtype": "m.image", "body": "x", "url": mxc, "info": {"mimetype": mimetype}}
        async with http_session.post(
            relay.internal_url + "/_relay/v1/rewrite",
            json={"content": content},
            headers={"Authorization": f"Bearer {BRIDGE_TOKEN}"},
        ) as resp:
            assert resp.status == 200
            answers.append(await resp.json())
    image_entry, file_entry = answers[0]["media"][0], answers[1]["media"][0]
    assert "thumbnail_url" not in answers[0]["content"]
    assert "thumbnail_url" not in file_entry
    assert image_entry["thumbnail_expires_at"] == image_entry["expires_at"]
    status, _, body = await fetch(http_session, image_entry["thumbnail_url"])
    assert status == 200
    assert decoded(body) == ("JPEG", (320, 160))


async def test_sign_command_thumbnail_url_works(
    make_config: MakeConfig,
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """`media-relay sign --width --height --method` prints a URL serving that thumbnail."""
    relay = await start_relay(make_config(thumbnails={"max_side": 512}))
    _, mxc, _ = await post_media(
        relay, alice, image_bytes("PNG", (120, 90)), "image/png", "cat.png"
    )
    config = tmp_path / "config.yaml"
    code, out, err = await run_sign(
        config, mxc, "--width", "40", "--height", "30", "--method", "crop"
    )
    assert code == EXIT_OK, err
    status, _, body = await fetch(http_session, out.strip())
    assert status == 200
    assert decoded(body) == ("JPEG", (40, 30))
    code, out, err = await run_sign(config, mxc, "--width", "513", "--height", "30")
    assert (code, out) == (EXIT_USAGE, "")
    assert "thumbnails.max_side" in err

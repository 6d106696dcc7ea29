"""Metadata stripping goes by the bytes: a stub homeserver labels a GPS photo every way.

The whole pipeline (fetcher, download, cache, renditions) over the stub: what leaves is
stripped and typed by what the file is, the first time (while downloading) and from
the cache; a JPEG damaged before its image data is refused (422), never served whole.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from PIL import Image

from relay.core.errors import MatrixError
from relay.core.mxc import MediaId
from relay.core.signing import LinkClaims
from relay.media.cache import MediaCache
from relay.media.downloads import MediaBody, MediaSource
from relay.media.pipeline import MediaPipeline
from relay.media.renditions import Renditions
from relay.media.revocation import RevocationCheck
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.fetcher import MediaFetcher
from tests.harness.images import GPS_IFD, image_bytes
from tests.harness.stub_homeserver import AS_TOKEN, SERVER, NoRecords, NothingRevoked, StubServer

EXIF_IFD = 0x8769
BODY_SERIAL = 0xA431
SERIAL = "SN-0042-SECRET"


def camera_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (52.0, 22.0, 1.5), 3: "E", 4: (4.0, 53.0, 2.0)})
    exif.get_ifd(EXIF_IFD)[BODY_SERIAL] = SERIAL
    return image_bytes("JPEG", exif=exif.tobytes(), quality=90)


def labelled(data: bytes, content_type: str | None) -> web.StreamResponse:
    response = web.StreamResponse()
    if content_type is not None:
        response.headers["Content-Type"] = content_type
    response.content_length = len(data)
    return response


@pytest_asyncio.fixture
async def pipeline(stub: StubServer, tmp_path: Path) -> AsyncIterator[MediaPipeline]:
    metrics = Metrics()
    async with aiohttp.ClientSession() as session:
        caps = Capabilities(stub.url, AS_TOKEN)
        fetcher = MediaFetcher(session, stub.url, AS_TOKEN, caps, metrics, max_size=1 << 22)
        cache = MediaCache(tmp_path / "cache", 1 << 24, metrics)
        await cache.start()
        source = MediaSource(fetcher, cache, metrics)
        renditions = Renditions(source, metrics)
        made = MediaPipeline(NoRecords(), RevocationCheck(NothingRevoked()), source, renditions)
        yield made
        await made.close()


def serve(stub: StubServer, media_id: str, data: bytes, content_type: str | None) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = labelled(data, content_type)
        await response.prepare(request)
        await response.write(data)
        return response

    stub.media[media_id] = handler


async def _read(body: MediaBody) -> bytes:
    return b"".join([chunk async for chunk in body.iter_chunks()])


def claims(media_id: str) -> LinkClaims:
    return LinkClaims(MediaId(SERVER, media_id), None, None, 2_000_000_000)


@pytest.mark.parametrize(
    "label", ["image/jpg", "image/pjpeg", "application/octet-stream", None, "text/plain"]
)
async def test_mislabelled_photo_leaves_without_gps_or_serial(
    pipeline: MediaPipeline, stub: StubServer, label: str | None
) -> None:
    """Whatever the label, a JPEG is served stripped, as image/jpeg, first time and cached."""
    data = camera_jpeg()
    assert SERIAL.encode() in data and b"PhoneMaker" in data
    serve(stub, "photo", data, label)
    for _ in range(2):  # downloading, then from the cache
        served = await pipeline.open(claims("photo"))
        out = await _read(served.body)
        assert served.content_type == "image/jpeg"
        assert SERIAL.encode() not in out and b"PhoneMaker" not in out
        with Image.open(io.BytesIO(out)) as im:
            assert not im.getexif().get_ifd(GPS_IFD)
            assert im.size == (120, 80)
    assert len(stub.media_requests()) == 1


async def test_truncated_photo_is_stripped_or_refused(
    pipeline: MediaPipeline, stub: StubServer
) -> None:
    """Cut in its image data: stripped as far as it goes; cut in its EXIF: 422, nothing out."""
    data = camera_jpeg()
    sos = data.index(b"\xff\xda")
    serve(stub, "cut-scan", data[: sos + 100], "image/jpeg")
    served = await pipeline.open(claims("cut-scan"))
    out = await _read(served.body)
    assert SERIAL.encode() not in out and out.endswith(b"\xff\xd9")

    serial_at = data.index(SERIAL.encode())
    serve(stub, "cut-exif", data[: serial_at + 4], "application/octet-stream")
    with pytest.raises(MatrixError) as info:
        await pipeline.open(claims("cut-exif"))
    assert (info.value.status, info.value.errcode) == (422, "M_UNKNOWN")

"""Renditions: thumbnails and stripped originals derived from cached originals.

The cache is real (a temporary directory); the original is put in it directly, so the
fetcher is never needed: a stub that records calls and answers 404 proves that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from PIL import Image

from relay.core.attachment_keys import EncryptionInfo
from relay.core.mxc import MediaId
from relay.core.variant import Thumbnail, variant_key
from relay.media.cache import MediaCache
from relay.media.cache_layout import CacheEntry, CacheKey
from relay.media.downloads import MediaSource
from relay.media.renditions import (
    STRIPPED,
    RenditionFailed,
    Renditions,
    derived_key,
    thumbnail_filename,
    to_matrix_error,
)
from relay.media.thumbnails import (
    BadThumbnailRequest,
    ImageTooLarge,
    NotAnImage,
    ThumbnailError,
    ThumbnailLimits,
    UnreadableImage,
)
from relay.support.metrics import Metrics
from relay.upstream.errors import UpstreamNotFound
from relay.upstream.fetcher import MediaFetcher
from tests.harness.cache import put_bytes
from tests.harness.images import GPS_IFD, bomb_png, gps_jpeg, image_bytes
from tests.harness.waiting import eventually

MEDIA = MediaId("example.org", "abcDEF123")
THUMB = Thumbnail(64, 48, "scale")
ENCRYPTION = EncryptionInfo(key=b"k" * 32, iv=b"i" * 16, sha256=b"h" * 32)


class NoFetcher:
    """Stands in for MediaFetcher: records every call and answers 404."""

    def __init__(self) -> None:
        self.calls: list[MediaId] = []

    @contextlib.asynccontextmanager
    async def open(self, media: MediaId, thumbnail: object = None) -> AsyncIterator[None]:
        self.calls.append(media)
        raise UpstreamNotFound("not here")
        yield  # pragma: no cover - makes this an async generator


class World:
    def __init__(self, cache: MediaCache, metrics: Metrics, fetcher: NoFetcher) -> None:
        self.cache = cache
        self.metrics = metrics
        self.fetcher = fetcher
        self.source = MediaSource(cast(MediaFetcher, fetcher), cache, metrics)

    def renditions(self, **options: object) -> Renditions:
        return Renditions(self.source, self.metrics, **options)  # type: ignore[arg-type]

    async def put_original(
        self, data: bytes, content_type: str, encryption: EncryptionInfo | None = None
    ) -> CacheEntry:
        key = MediaSource.cache_key(MEDIA, encryption)
        entry = await put_bytes(self.cache, key, data, content_type, "photo.orig")
        assert entry is not None
        return entry

    def temp_files(self) -> list[Path]:
        return list(self.cache.work_dir.iterdir())

    async def render_started(self) -> None:
        """Wait until a render has opened its cache writer (its temporary file exists)."""

        async def started() -> bool:
            return bool(self.temp_files())

        await eventually(started, within=10, interval=0)


@pytest.fixture
async def world(tmp_path: Path) -> World:
    metrics = Metrics()
    cache = MediaCache(tmp_path / "cache", 1 << 26, metrics)
    await cache.start()
    return World(cache, metrics, NoFetcher())


# -- pure helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        CacheKey("a.org", "x", "original"),
        CacheKey("a.org", "x", "enc-0123456789abcdef0123456789abcdef-original"),
    ],
)
@pytest.mark.parametrize("rendition", [variant_key(THUMB), STRIPPED])
def test_derived_keys_never_collide(source: CacheKey, rendition: str) -> None:
    """A derived key differs from its source, from homeserver thumbnails and from ciphertext."""
    key = derived_key(source, rendition)
    others = {
        source,
        CacheKey("a.org", "x", "original"),
        CacheKey("a.org", "x", variant_key(THUMB)),
        CacheKey("a.org", "x", "enc-0123456789abcdef0123456789abcdef-original"),
    }
    assert (key.server_name, key.media_id) == (source.server_name, source.media_id)
    assert key not in others
    assert key.digest() not in {k.digest() for k in others}
    assert derived_key(source, rendition) == key


@pytest.mark.parametrize(
    ("filename", "content_type", "expected"),
    [
        ("cat.png", "image/jpeg", "cat.jpg"),
        ("cat.tar.gz", "image/png", "cat.tar.png"),
        ("noext", "image/png", "noext.png"),
        (".hidden", "image/gif", ".hidden.gif"),
        ("anim.gif", "image/webp", "anim.webp"),
        (None, "image/jpeg", None),
        ("cat.png", "application/octet-stream", None),
    ],
)
def test_thumbnail_filename(filename: str | None, content_type: str, expected: str | None) -> None:
    """A thumbnail is named after the original with the extension of its own type."""
    assert thumbnail_filename(filename, content_type) == expected


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotAnImage("Content is not a JPEG, PNG, WebP or GIF image"), 400),
        (BadThumbnailRequest("Thumbnail width must be between 1 and 2048"), 400),
        (UnreadableImage("Image cannot be decoded"), 400),
        (ImageTooLarge("Image has too many pixels"), 422),
    ],
)
def test_thumbnail_errors_become_client_errors(error: ThumbnailError, status: int) -> None:
    """Thumbnail errors are 400/422 M_UNKNOWN carrying the error's own (safe) message."""
    matrix = to_matrix_error(error)
    assert (matrix.status, matrix.errcode, matrix.message) == (status, "M_UNKNOWN", str(error))


def test_local_failure_is_503_without_details() -> None:
    """A local failure (disk full) is 503 with Retry-After, and no path or OS detail leaks."""
    matrix = to_matrix_error(RenditionFailed("[Errno 28] No space left: /var/cache/x"))
    assert (matrix.status, matrix.errcode) == (503, "M_UNKNOWN")
    assert "Errno" not in matrix.message and "/var" not in matrix.message
    assert int(matrix.headers["Retry-After"]) > 0


# -- thumbnails ----------------------------------------------------------------------------


async def test_concurrent_requests_render_once_then_hit_the_cache(world: World) -> None:
    """Twenty concurrent requests for one uncached thumbnail share one render; later ones hit."""
    await world.put_original(image_bytes("PNG"), "image/png")
    renditions = world.renditions()
    bodies = await asyncio.gather(*(renditions.thumbnail(MEDIA, None, THUMB) for _ in range(20)))
    assert world.metrics.value("relay_thumbnails_generated") == 1
    assert len({body.path for body in bodies}) == 1
    first = bodies[0]
    assert first.path is not None
    with Image.open(first.path) as im:
        assert (im.format, im.size) == ("JPEG", (64, 43))
    assert first.content_type == "image/jpeg"
    assert first.filename == "photo.orig"
    assert first.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()
    again = await renditions.thumbnail(MEDIA, None, THUMB)
    assert again.path == first.path
    assert world.metrics.value("relay_thumbnails_generated") == 1
    assert renditions.renders_in_progress == 0
    assert world.fetcher.calls == []
    assert world.temp_files() == []


async def test_encrypted_media_is_thumbnailed_from_its_plaintext(world: World) -> None:
    """An encrypted attachment's thumbnail is made from the decrypted entry, under its own key."""
    await world.put_original(image_bytes("PNG"), "application/octet-stream", ENCRYPTION)
    body = await world.renditions().thumbnail(MEDIA, ENCRYPTION, Thumbnail(30, 30, "crop"))
    assert body.path is not None
    with Image.open(body.path) as im:
        assert im.size == (30, 30)
    plaintext_key = MediaSource.cache_key(MEDIA, ENCRYPTION)
    assert derived_key(plaintext_key, "thumb-30x30-crop") in world.cache
    assert CacheKey(MEDIA.server_name, MEDIA.media_id, "thumb-30x30-crop") not in world.cache
    assert world.fetcher.calls == []


@pytest.mark.parametrize("declared", ["text/plain", "video/mp4", "audio/ogg; codecs=opus"])
async def test_declared_non_images_are_refused_before_fetching(world: World, declared: str) -> None:
    """A thumbnail of media the sender called text, video or audio is refused without a download."""
    with pytest.raises(NotAnImage, match="Only images have thumbnails"):
        await world.renditions().thumbnail(MEDIA, None, THUMB, declared)
    assert world.fetcher.calls == []
    assert len(world.cache) == 0


async def test_out_of_bounds_size_is_refused_before_fetching(world: World) -> None:
    """A size above thumbnails.max_side is BadThumbnailRequest, with no download."""
    renditions = world.renditions(limits=ThumbnailLimits(max_side=100))
    with pytest.raises(BadThumbnailRequest):
        await renditions.thumbnail(MEDIA, None, Thumbnail(101, 10, "scale"))
    assert world.fetcher.calls == []


@pytest.mark.parametrize(
    "data",
    [b"<html><body>not a picture</body></html>", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20],
)
async def test_non_image_content_is_refused_and_nothing_cached(world: World, data: bytes) -> None:
    """HTML or garbage stored as image/png is refused by content; no rendition, no temp file."""
    await world.put_original(data, "image/png")
    renditions = world.renditions()
    with pytest.raises((NotAnImage, UnreadableImage)):
        await renditions.thumbnail(MEDIA, None, THUMB, "image/png")
    assert len(world.cache) == 1  # the original only
    assert world.temp_files() == []
    assert world.metrics.value("relay_thumbnails_generated") == 0


async def test_decompression_bomb_is_too_large(world: World) -> None:
    """A 400-megapixel PNG of a few kilobytes is ImageTooLarge, never decoded."""
    await world.put_original(bomb_png(20_000, 20_000), "image/png")
    with pytest.raises(ImageTooLarge):
        await world.renditions().thumbnail(MEDIA, None, THUMB)
    assert len(world.cache) == 1
    assert world.temp_files() == []


async def test_missing_original_keeps_its_fetch_error(world: World) -> None:
    """An original the homeserver does not have is UpstreamNotFound (404), nothing cached."""
    with pytest.raises(UpstreamNotFound):
        await world.renditions().thumbnail(MEDIA, None, THUMB)
    assert world.fetcher.calls == [MEDIA]
    assert len(world.cache) == 0


async def test_purge_during_render_commits_nothing(world: World) -> None:
    """A revocation while a thumbnail renders leaves no rendition (the waiter gets 404)."""
    await world.put_original(image_bytes("PNG", (600, 400)), "image/png")
    renditions = world.renditions()
    task = asyncio.create_task(renditions.thumbnail(MEDIA, None, THUMB))
    await world.render_started()
    await world.source.purge(MEDIA)
    with pytest.raises(UpstreamNotFound):
        await task
    assert len(world.cache) == 0
    assert world.temp_files() == []


async def test_close_cancels_renders(world: World) -> None:
    """close() cancels a render under way and leaves no temporary file."""
    await world.put_original(image_bytes("PNG", (600, 400)), "image/png")
    renditions = world.renditions()
    task = asyncio.create_task(renditions.thumbnail(MEDIA, None, THUMB))
    await world.render_started()
    await renditions.close()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert renditions.renders_in_progress == 0

    async def cleaned_up() -> bool:
        # The worker thread cannot be stopped; its output goes once it has finished.
        return not world.temp_files()

    await eventually(cleaned_up, within=10, interval=0.01)
    assert len(world.cache) == 1  # the original only


# -- stripped originals --------------------------------------------------------------------


async def test_gps_is_stripped_and_pixels_kept(world: World) -> None:
    """A JPEG with GPS EXIF is served without it, same pixels, hash and length of what is sent."""
    data = gps_jpeg()
    source = await world.put_original(data, "image/jpeg")
    renditions = world.renditions()
    body = await renditions.stripped(MEDIA, None, source, "image/jpeg")
    assert body.path is not None and body.path != source.path
    served = body.path.read_bytes()
    assert body.sha256 == hashlib.sha256(served).hexdigest()
    assert body.length == len(served) < len(data)
    assert body.content_type == "image/jpeg"
    with Image.open(io.BytesIO(served)) as out, Image.open(io.BytesIO(data)) as original:
        assert original.getexif().get_ifd(GPS_IFD)  # the test image really has GPS
        assert not out.getexif().get_ifd(GPS_IFD)
        assert 0x010F not in out.getexif()
        assert out.tobytes() == original.tobytes()
    assert b"PhoneMaker" not in served
    assert derived_key(MediaSource.cache_key(MEDIA), STRIPPED) in world.cache
    again = await renditions.stripped(MEDIA, None, source, "image/jpeg")
    assert again.path == body.path
    assert world.temp_files() == []


async def test_clean_original_is_served_as_is_and_remembered(world: World) -> None:
    """An image with nothing to strip is served as the original and not scanned again."""
    source = await world.put_original(image_bytes("PNG"), "image/png")
    renditions = world.renditions()
    body = await renditions.stripped(MEDIA, None, source, "image/png")
    assert (body.path, body.sha256) == (source.path, source.sha256)
    assert len(world.cache) == 1
    misses = world.metrics.value("relay_cache_misses")
    assert await renditions.stripped(MEDIA, None, source, "image/png") is source
    assert world.metrics.value("relay_cache_misses") == misses


@pytest.mark.parametrize(
    ("content_type", "head", "strip"),
    [
        ("image/jpeg", b"\xff\xd8\xff\xe0", False),
        ("image/gif", b"GIF89a", True),
        ("text/plain", b"hello", True),
        ("video/mp4", b"\x00\x00\x00\x18ftypmp42", True),
    ],
)
async def test_stripping_off_or_unhandled_type_serves_the_body_as_is(
    world: World, content_type: str, head: bytes, strip: bool
) -> None:
    """strip_metadata: false, and types strip_metadata cannot clean, pass the body through."""
    renditions = world.renditions(strip_metadata=strip)
    assert renditions.strips(content_type, head) is False


async def test_stripped_copy_reserves_room_in_the_cache(world: World) -> None:
    """Stripping reserves the original's size (never evicting the original it reads);
    with the cache full of downloads in progress it is a 503, not a write past the cap."""
    data = gps_jpeg()
    small = MediaCache(world.cache.root.parent / "small", len(data) + 100, world.metrics)
    await small.start()
    small_world = World(small, world.metrics, world.fetcher)
    source = await small_world.put_original(data, "image/jpeg")
    body = await small_world.renditions().stripped(MEDIA, None, source, "image/jpeg")
    assert body.length < len(data)
    assert small.pending_bytes == 0
    # The copy is in; the original, least recently used, made room for it.
    assert small.total_bytes == body.length
    assert world.fetcher.calls == []

    busy = MediaCache(world.cache.root.parent / "busy", 3 * len(data), world.metrics)
    await busy.start()
    busy_world = World(busy, world.metrics, world.fetcher)
    original = await busy_world.put_original(data, "image/jpeg")
    download = busy.begin(CacheKey("example.org", "other", "original"))
    await download.write(b"d" * (2 * len(data) + 10))  # in flight: no room left for a copy
    with pytest.raises(RenditionFailed):
        await busy_world.renditions().stripped(MEDIA, None, original, "image/jpeg")
    assert to_matrix_error(RenditionFailed("full")).status == 503
    download.abort()
    assert busy.pending_bytes == 0

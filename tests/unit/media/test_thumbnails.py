"""Tests for relay.media.thumbnails: exact sizes, crops, animation, orientation, hostile input."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from relay.core.variant import Thumbnail
from relay.media.thumbnail_encoding import RenderedThumbnail
from relay.media.thumbnails import (
    BadThumbnailRequest,
    ImageTooLarge,
    NotAnImage,
    ThumbnailError,
    ThumbnailLimits,
    UnreadableImage,
    check_request,
    render_thumbnail,
    sniff_format,
    target_size,
)

LIMITS = ThumbnailLimits()
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _write(path: Path, im: Image.Image, fmt: str, **options: object) -> Path:
    im.save(path, format=fmt, **options)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels but that has no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 16)  # far too little data for the claimed size
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def _close(actual: object, expected: tuple[int, ...], tolerance: int = 40) -> bool:
    """Whether a pixel value is within ``tolerance`` of ``expected`` in every band."""
    assert isinstance(actual, tuple)
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


@pytest.mark.parametrize(
    ("source", "thumb", "expected"),
    [
        ((400, 300), Thumbnail(100, 100, "scale"), (100, 75)),
        ((300, 400), Thumbnail(100, 100, "scale"), (75, 100)),
        ((400, 300), Thumbnail(33, 17, "scale"), (23, 17)),
        ((300, 400), Thumbnail(33, 17, "scale"), (13, 17)),
        ((400, 300), Thumbnail(399, 1000, "scale"), (399, 299)),
        ((400, 300), Thumbnail(400, 300, "scale"), (400, 300)),
        ((400, 300), Thumbnail(800, 600, "scale"), (400, 300)),  # never upscaled
        ((20000, 1), Thumbnail(32, 32, "scale"), (32, 1)),  # never below one pixel
        ((1, 1), Thumbnail(32, 32, "scale"), (1, 1)),
        ((3, 2), Thumbnail(2, 2, "scale"), (2, 1)),
        ((3, 2), Thumbnail(1, 1, "scale"), (1, 1)),
        ((400, 300), Thumbnail(33, 17, "crop"), (33, 17)),
        ((300, 400), Thumbnail(101, 51, "crop"), (101, 51)),
        ((400, 300), Thumbnail(400, 300, "crop"), (400, 300)),
        ((400, 300), Thumbnail(1, 299, "crop"), (1, 299)),
        ((1, 1), Thumbnail(32, 32, "crop"), (1, 1)),
        ((3, 2), Thumbnail(32, 32, "crop"), (2, 2)),  # largest region with the requested aspect
        ((3, 2), Thumbnail(5, 1, "crop"), (3, 1)),
        ((3, 2), Thumbnail(2, 1, "crop"), (2, 1)),
        ((400, 10), Thumbnail(32, 32, "crop"), (10, 10)),
        ((400, 300), Thumbnail(800, 300, "crop"), (400, 150)),
    ],
)
def test_target_size(source: tuple[int, int], thumb: Thumbnail, expected: tuple[int, int]) -> None:
    """Scale fits inside (one side equal), crop is exact, and neither ever upscales."""
    assert target_size(source, thumb) == expected


@pytest.mark.parametrize("source_format", ["PNG", "JPEG"])
@pytest.mark.parametrize(
    ("source", "thumb", "expected"),
    [
        ((400, 300), Thumbnail(100, 100, "scale"), (100, 75)),
        ((300, 400), Thumbnail(100, 100, "scale"), (75, 100)),
        ((400, 300), Thumbnail(33, 17, "scale"), (23, 17)),
        ((400, 300), Thumbnail(33, 17, "crop"), (33, 17)),
        ((300, 400), Thumbnail(33, 17, "crop"), (33, 17)),
        ((300, 400), Thumbnail(101, 51, "crop"), (101, 51)),
        ((400, 300), Thumbnail(97, 301, "crop"), (97, 300)),
        ((1, 1), Thumbnail(32, 32, "scale"), (1, 1)),
        ((1, 1), Thumbnail(32, 32, "crop"), (1, 1)),
        ((3, 2), Thumbnail(2, 2, "scale"), (2, 1)),
        ((3, 2), Thumbnail(32, 32, "crop"), (2, 2)),
        ((3, 2), Thumbnail(1, 1, "crop"), (1, 1)),
    ],
)
def test_rendered_dimensions(
    tmp_path: Path,
    source_format: str,
    source: tuple[int, int],
    thumb: Thumbnail,
    expected: tuple[int, int],
) -> None:
    """The file written has exactly the target size, for landscape, portrait and tiny sources."""
    src = _write(tmp_path / "src", Image.new("RGB", source, (10, 120, 200)), source_format)
    dst = tmp_path / "dst"
    result = render_thumbnail(src, dst, thumb, LIMITS)
    assert result == RenderedThumbnail("image/jpeg", *expected)
    with Image.open(dst) as out:
        assert out.format == "JPEG"
        assert out.size == expected


def test_large_jpeg_uses_draft_and_keeps_exact_size(tmp_path: Path) -> None:
    """A big photo decoded at reduced scale still yields the exact size and the right colours."""
    im = Image.new("RGB", (3000, 2000), RED)
    im.paste(BLUE, (1500, 0, 3000, 2000))
    src = _write(tmp_path / "big.jpg", im, "JPEG")
    result = render_thumbnail(src, tmp_path / "dst", Thumbnail(61, 61, "scale"), LIMITS)
    assert (result.width, result.height) == (61, 41)
    with Image.open(tmp_path / "dst") as out:
        assert _close(out.getpixel((5, 20)), RED)
        assert _close(out.getpixel((55, 20)), BLUE)


def test_crop_is_centred(tmp_path: Path) -> None:
    """Crop keeps the middle of the image: the centre third of a three-colour strip."""
    im = Image.new("RGB", (300, 100), RED)
    im.paste(GREEN, (100, 0, 200, 100))
    im.paste(BLUE, (200, 0, 300, 100))
    src = _write(tmp_path / "src.png", im, "PNG")
    render_thumbnail(src, tmp_path / "dst", Thumbnail(50, 50, "crop"), LIMITS)
    with Image.open(tmp_path / "dst") as out:
        rgb = out.convert("RGB")
    for xy in [(2, 2), (25, 25), (47, 47)]:
        assert _close(rgb.getpixel(xy), GREEN)


@pytest.mark.parametrize(
    ("thumb", "limits"),
    [
        (Thumbnail(0, 10, "scale"), LIMITS),
        (Thumbnail(10, 0, "crop"), LIMITS),
        (Thumbnail(-5, 10, "crop"), LIMITS),
        (Thumbnail(2049, 10, "scale"), LIMITS),
        (Thumbnail(10, 2049, "crop"), LIMITS),
        (Thumbnail(31, 64, "crop"), ThumbnailLimits(min_side=32)),
        (Thumbnail(10, 10, "fit"), LIMITS),  # type: ignore[arg-type]
        (Thumbnail(True, 10, "scale"), LIMITS),
        (Thumbnail(10.0, 10, "scale"), LIMITS),  # type: ignore[arg-type]
    ],
)
def test_out_of_bounds_requests_are_refused(
    tmp_path: Path, thumb: Thumbnail, limits: ThumbnailLimits
) -> None:
    """Out-of-limit sizes and unknown methods raise BadThumbnailRequest; nothing is written."""
    with pytest.raises(BadThumbnailRequest):
        check_request(thumb, limits)
    src = _write(tmp_path / "src.png", Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(BadThumbnailRequest):
        render_thumbnail(src, tmp_path / "dst", thumb, limits)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "thumb", [Thumbnail(1, 1, "crop"), Thumbnail(2048, 2048, "scale"), Thumbnail(32, 2048, "crop")]
)
def test_requests_at_the_bounds_are_accepted(thumb: Thumbnail) -> None:
    """The limits are inclusive."""
    check_request(thumb, LIMITS)


def _animated_gif(path: Path, colours: list[tuple[int, int, int]]) -> Path:
    frames = [Image.new("RGB", (40, 30), colour) for colour in colours]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=70, loop=0)
    return path


def test_animated_gif_gives_first_frame_by_default(tmp_path: Path) -> None:
    """Without animated=True an animation becomes a still of its first frame."""
    src = _animated_gif(tmp_path / "src.gif", [RED, GREEN, BLUE])
    result = render_thumbnail(src, tmp_path / "dst", Thumbnail(20, 20, "crop"), LIMITS)
    assert result == RenderedThumbnail("image/jpeg", 20, 20)
    with Image.open(tmp_path / "dst") as out:
        assert not getattr(out, "is_animated", False)
        assert _close(out.getpixel((10, 10)), RED)


@pytest.mark.parametrize(("limits", "frames"), [(LIMITS, 3), (ThumbnailLimits(max_frames=2), 2)])
def test_animated_gif_stays_animated_when_asked(
    tmp_path: Path, limits: ThumbnailLimits, frames: int
) -> None:
    """animated=True resizes every frame (up to max_frames) into an animated GIF."""
    src = _animated_gif(tmp_path / "src.gif", [RED, GREEN, BLUE])
    thumb = Thumbnail(21, 13, "crop", animated=True)
    result = render_thumbnail(src, tmp_path / "dst", thumb, limits)
    assert result == RenderedThumbnail("image/gif", 21, 13)
    with Image.open(tmp_path / "dst") as out:
        assert out.format == "GIF"
        assert getattr(out, "n_frames", 1) == frames
        assert not out.info.get("comment")
        colours = []
        for index in range(frames):
            out.seek(index)
            assert out.size == (21, 13)
            assert out.info["duration"] == 70
            colours.append(out.convert("RGB").getpixel((10, 6)))
    assert [_close(c, e) for c, e in zip(colours, [RED, GREEN, BLUE], strict=False)] == [
        True
    ] * frames


def test_animated_request_on_still_image_gives_still(tmp_path: Path) -> None:
    """animated=True on a single-frame image is an ordinary still thumbnail."""
    src = _write(tmp_path / "src.gif", Image.new("RGB", (40, 30), RED), "GIF")
    thumb = Thumbnail(20, 20, "scale", animated=True)
    assert render_thumbnail(src, tmp_path / "dst", thumb, LIMITS).content_type == "image/jpeg"


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """EXIF orientation 6 (rotate 90 degrees clockwise) turns a landscape photo portrait."""
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    src = _write(tmp_path / "src.jpg", im, "JPEG", exif=exif)
    result = render_thumbnail(src, tmp_path / "dst", Thumbnail(10, 20, "scale"), LIMITS)
    assert (result.width, result.height) == (10, 20)
    with Image.open(tmp_path / "dst") as out:
        assert out.size == (10, 20)
        assert _close(out.getpixel((5, 3)), RED)  # stored left is displayed top
        assert _close(out.getpixel((5, 16)), BLUE)
        assert 0x0112 not in out.getexif()


_IGNORE_PILLOW_BOMB_WARNING = pytest.mark.filterwarnings(
    "ignore::PIL.Image.DecompressionBombWarning"
)


@pytest.mark.parametrize(
    "warning_filter",
    ["error", pytest.param("ignore", marks=_IGNORE_PILLOW_BOMB_WARNING)],
)
@pytest.mark.parametrize(
    ("width", "height"),
    [
        (100_000, 100_000),  # over twice Pillow's limit: Pillow raises on open
        (10_000, 10_000),  # over Pillow's limit: Pillow warns
        (6_000, 6_000),  # under Pillow's limit, over ours
    ],
)
def test_decompression_bombs_are_refused_from_the_header(
    tmp_path: Path, warning_filter: str, width: int, height: int
) -> None:
    """Huge claimed sizes are ImageTooLarge whether or not Pillow's bomb warning is an error."""
    src = _png_header_only(tmp_path / "bomb.png", width, height)
    with pytest.raises(ImageTooLarge):
        render_thumbnail(src, tmp_path / "dst", Thumbnail(32, 32, "crop"), LIMITS)
    assert not (tmp_path / "dst").exists()


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    """Over the limit is ImageTooLarge, not a decode error: the pixels were never decoded."""
    src = _png_header_only(tmp_path / "src.png", 2000, 2000)
    with pytest.raises(UnreadableImage):  # decoding this file fails...
        render_thumbnail(src, tmp_path / "dst", Thumbnail(32, 32, "crop"), LIMITS)
    with pytest.raises(ImageTooLarge):  # ...so this refusal happened before any decoding
        render_thumbnail(
            src, tmp_path / "dst", Thumbnail(32, 32, "crop"), ThumbnailLimits(max_pixels=3_999_999)
        )
    assert not (tmp_path / "dst").exists()


def test_pixel_limit_is_inclusive(tmp_path: Path) -> None:
    """An image of exactly max_pixels is rendered."""
    src = _write(tmp_path / "src.png", Image.new("RGB", (50, 40)), "PNG")
    limits = ThumbnailLimits(max_pixels=2000)
    assert render_thumbnail(src, tmp_path / "dst", Thumbnail(5, 4, "crop"), limits).width == 5


def _bmp(path: Path) -> Path:
    return _write(path, Image.new("RGB", (8, 8)), "BMP")


def _tiff(path: Path) -> Path:
    return _write(path, Image.new("RGB", (8, 8)), "TIFF")


def _html(path: Path) -> Path:
    path.write_bytes(b"<!DOCTYPE html><html><script>alert(1)</script></html>")
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _png_magic_then_garbage(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return path


@pytest.mark.parametrize("make", [_bmp, _tiff, _html, _empty, _png_magic_then_garbage])
def test_non_images_are_refused(tmp_path: Path, make: object) -> None:
    """Content that is not JPEG, PNG, WebP or GIF is NotAnImage, whatever the file is called."""
    assert callable(make)
    src = make(tmp_path / "image.png")
    with pytest.raises(NotAnImage):
        render_thumbnail(src, tmp_path / "dst", Thumbnail(32, 32, "crop"), LIMITS)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_jpeg_is_a_thumbnail_error(tmp_path: Path, keep: float) -> None:
    """A cut-off JPEG raises ThumbnailError (UnreadableImage), never another exception."""
    im = Image.effect_noise((200, 150), 64).convert("RGB")
    full = _write(tmp_path / "full.jpg", im, "JPEG").read_bytes()
    src = tmp_path / "cut.jpg"
    src.write_bytes(full[: int(len(full) * keep)])
    with pytest.raises(ThumbnailError) as caught:
        render_thumbnail(src, tmp_path / "dst", Thumbnail(50, 50, "scale"), LIMITS)
    assert isinstance(caught.value, UnreadableImage | NotAnImage)
    assert not (tmp_path / "dst").exists()


def test_missing_source_is_an_os_error(tmp_path: Path) -> None:
    """A vanished cache file is the caller's I/O problem, not a bad image."""
    with pytest.raises(FileNotFoundError):
        render_thumbnail(tmp_path / "gone", tmp_path / "dst", Thumbnail(8, 8, "crop"), LIMITS)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG"),
        (b"GIF87a\x01\x00", "GIF"),
        (b"GIF89a\x01\x00", "GIF"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", None),
        (b"BM\x00\x00", None),
        (b"II*\x00", None),
        (b"<html>", None),
        (b"", None),
    ],
)
def test_sniff_format(head: bytes, expected: str | None) -> None:
    """Formats are recognised by their magic bytes only."""
    assert sniff_format(head) == expected

"""The render budget: mode, decoder, frames and output all count, and bombs are refused.

The budget's model is checked against what Pillow really holds by
``bench/thumbnail_memory.py`` (peak RSS of real renders, figures in the README); here
the decisions it leads to are pinned, on the issue's tiny hostile files.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from PIL import Image

from relay.core.variant import Thumbnail
from relay.media.render_budget import (
    DEFAULT_MAX_MEMORY,
    Source,
    animated_frames_allowed,
    bytes_per_pixel,
    static_cost,
)
from relay.media.thumbnail_encoding import RenderedThumbnail
from relay.media.thumbnails import (
    ImageTooLarge,
    ThumbnailLimits,
    render_thumbnail,
)

LIMITS = ThumbnailLimits()


def tiny_gif(width: int, height: int, frames: int = 1) -> bytes:
    """A GIF declaring a ``width`` x ``height`` screen, each frame a single pixel."""
    out = bytearray(b"GIF89a" + struct.pack("<HH", width, height) + bytes([0xF0, 0, 0]))
    out += b"\x00\x00\x00\xff\xff\xff"
    if frames > 1:
        out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    for _ in range(frames):
        if frames > 1:
            out += b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # 100 ms
        out += b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00\x02\x02\x44\x01\x00"
    return bytes(out + b"\x3b")


@pytest.fixture(scope="module")
def tiny_webp() -> bytes:
    """A WebP of one colour, 5000 x 5000: about a kilobyte, 25 megapixels."""
    buf = io.BytesIO()
    Image.new("RGB", (5000, 5000), (10, 20, 30)).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def test_bytes_per_pixel_follow_pillow_storage() -> None:
    """Palette and grey take one byte, 16-bit grey two, RGB four (Pillow pads it)."""
    assert [bytes_per_pixel(m) for m in ("P", "L", "1", "I;16", "RGB", "RGBA", "CMYK")] == [
        1,
        1,
        1,
        2,
        4,
        4,
        4,
    ]


def test_cost_counts_mode_decoder_and_rotation() -> None:
    """The same pixels cost more as RGBA than as RGB, more as WebP, more when rotated."""
    px, out = 1_000_000, 10_000
    rgb = static_cost(Source("PNG", "RGB", px), out)
    assert static_cost(Source("PNG", "RGBA", px), out) > rgb
    assert static_cost(Source("WEBP", "RGB", px), out) > rgb
    assert static_cost(Source("PNG", "RGB", px, rotated=True), out) > rgb
    assert static_cost(Source("PNG", "L", px), out) < rgb


def test_frames_are_bounded_by_memory_and_by_work() -> None:
    """Big outputs fit fewer frames; big canvases fit fewer decodes; none fit: zero."""
    small = Source("GIF", "P", 1_000_000)
    assert (
        animated_frames_allowed(
            small, 10_000, max_frames=100, max_memory=DEFAULT_MAX_MEMORY, max_frame_pixels=10**9
        )
        == 100
    )
    assert (
        animated_frames_allowed(
            small, 4_000_000, max_frames=100, max_memory=DEFAULT_MAX_MEMORY, max_frame_pixels=10**9
        )
        < 5
    )
    assert (
        animated_frames_allowed(
            small,
            10_000,
            max_frames=100,
            max_memory=DEFAULT_MAX_MEMORY,
            max_frame_pixels=20_000_000,
        )
        == 20
    )
    huge = Source("GIF", "P", 25_000_000)
    assert (
        animated_frames_allowed(
            huge, 10_000, max_frames=100, max_memory=DEFAULT_MAX_MEMORY, max_frame_pixels=10**9
        )
        == 0
    )


@pytest.mark.parametrize("animated", [False, True])
def test_tiny_gif_declaring_5000_squared_is_refused(tmp_path: Path, animated: bool) -> None:
    """A 62-byte-class GIF of 25 megapixels is refused before decoding (it passes max_pixels)."""
    src = tmp_path / "bomb.gif"
    src.write_bytes(tiny_gif(5000, 5000, frames=20 if animated else 1))
    assert len(src.read_bytes()) < 500
    assert LIMITS.max_pixels >= 5000 * 5000
    with pytest.raises(ImageTooLarge, match="memory"):
        render_thumbnail(src, tmp_path / "dst", Thumbnail(640, 480, "scale", animated), LIMITS)
    assert not (tmp_path / "dst").exists()


def test_tiny_webp_declaring_5000_squared_is_refused(tmp_path: Path, tiny_webp: bytes) -> None:
    """A kilobyte WebP of 25 megapixels (libwebp would hold ~380 MiB) is refused."""
    src = tmp_path / "bomb.webp"
    src.write_bytes(tiny_webp)
    with pytest.raises(ImageTooLarge, match="memory"):
        render_thumbnail(src, tmp_path / "dst", Thumbnail(640, 480, "scale"), LIMITS)


def test_long_animation_is_cut_to_the_work_budget(tmp_path: Path) -> None:
    """20 frames of a 2000x2000 canvas (499 bytes): only what max_frame_pixels allows."""
    src = tmp_path / "long.gif"
    src.write_bytes(tiny_gif(2000, 2000, frames=20))
    assert len(src.read_bytes()) == 499
    thumb = Thumbnail(64, 64, "scale", animated=True)
    result = render_thumbnail(src, tmp_path / "dst", thumb, LIMITS)
    assert result == RenderedThumbnail("image/gif", 64, 64)
    kept = LIMITS.max_frame_pixels // (2000 * 2000)
    assert kept == 12
    with Image.open(tmp_path / "dst") as out:
        # The encoder merges identical frames, adding up their durations (100 ms each).
        total = 0
        for index in range(out.n_frames):
            out.seek(index)
            total += out.info["duration"]
    assert total == kept * 100


def test_animation_too_big_to_keep_becomes_a_still(tmp_path: Path) -> None:
    """When not two full-size frames fit the memory budget, the first frame is rendered still."""
    src = tmp_path / "big-frames.gif"
    src.write_bytes(tiny_gif(2048, 2048, frames=5))
    thumb = Thumbnail(2048, 2048, "scale", animated=True)
    limits = ThumbnailLimits(max_memory=96 * 1024 * 1024)
    result = render_thumbnail(src, tmp_path / "dst", thumb, limits)
    assert result.content_type == "image/jpeg"
    with Image.open(tmp_path / "dst") as out:
        assert not getattr(out, "is_animated", False)

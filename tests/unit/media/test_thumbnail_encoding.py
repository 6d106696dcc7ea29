"""Tests for relay.media.thumbnail_encoding: the output format follows transparency,
animations keep their container, and no metadata reaches the output."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageCms

from relay.core.variant import Thumbnail
from relay.media.thumbnail_encoding import RenderedThumbnail
from relay.media.thumbnails import ThumbnailLimits, render_thumbnail

LIMITS = ThumbnailLimits()
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _write(path: Path, im: Image.Image, fmt: str, **options: object) -> Path:
    im.save(path, format=fmt, **options)
    return path


def _opaque_rgba() -> Image.Image:
    return Image.new("RGBA", (40, 30), (10, 20, 30, 255))


def _transparent_rgba() -> Image.Image:
    im = Image.new("RGBA", (40, 30), (10, 20, 30, 255))
    im.paste((0, 0, 0, 0), (0, 0, 20, 30))
    return im


def _transparent_palette() -> Image.Image:
    im = Image.new("P", (40, 30), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (0, 0, 20, 30))
    im.info["transparency"] = 1
    return im


def _rgb_colour_key() -> Image.Image:
    im = Image.new("RGB", (40, 30), (1, 2, 3))
    im.paste((200, 200, 200), (0, 0, 20, 30))
    im.info["transparency"] = (1, 2, 3)  # written as a PNG tRNS colour key
    return im


@pytest.mark.parametrize(
    ("make", "fmt", "content_type", "out_mode"),
    [
        (lambda: Image.new("RGB", (40, 30), RED), "PNG", "image/jpeg", "RGB"),
        (lambda: Image.new("L", (40, 30), 128), "PNG", "image/jpeg", "L"),
        (lambda: Image.new("1", (40, 30), 1), "PNG", "image/jpeg", "L"),
        (lambda: Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", "image/jpeg", "RGB"),
        (_opaque_rgba, "PNG", "image/jpeg", "RGB"),  # an unused alpha channel does not count
        (_transparent_rgba, "PNG", "image/png", "RGBA"),
        (lambda: Image.new("LA", (40, 30), (128, 0)), "PNG", "image/png", "LA"),
        (_transparent_palette, "PNG", "image/png", "RGBA"),
        (_transparent_palette, "GIF", "image/png", "RGBA"),
        (_rgb_colour_key, "PNG", "image/png", "RGBA"),
        (_transparent_rgba, "WEBP", "image/png", "RGBA"),
        (lambda: Image.new("RGB", (40, 30), RED), "WEBP", "image/jpeg", "RGB"),
    ],
)
def test_output_format_follows_transparency(
    tmp_path: Path, make: object, fmt: str, content_type: str, out_mode: str
) -> None:
    """Opaque images become JPEG, images that use transparency become PNG."""
    assert callable(make)
    src = _write(tmp_path / "src", make(), fmt)
    result = render_thumbnail(src, tmp_path / "dst", Thumbnail(20, 15, "scale"), LIMITS)
    assert result.content_type == content_type
    with Image.open(tmp_path / "dst") as out:
        assert out.format == content_type.removeprefix("image/").upper()
        assert out.mode == out_mode
        assert out.size == (20, 15)


def test_transparency_is_preserved_in_png_output(tmp_path: Path) -> None:
    """The transparent half stays transparent and the opaque half keeps its colour."""
    src = _write(tmp_path / "src.png", _transparent_palette(), "PNG")
    render_thumbnail(src, tmp_path / "dst", Thumbnail(40, 30, "scale"), LIMITS)
    with Image.open(tmp_path / "dst") as out:
        transparent, opaque = out.getpixel((5, 15)), out.getpixel((35, 15))
    assert isinstance(transparent, tuple)
    assert transparent[3] == 0
    assert opaque == (255, 0, 0, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    """A 16-bit greyscale PNG keeps its brightness (a plain convert would clip to white)."""
    src = _write(tmp_path / "src.png", Image.new("I;16", (8, 8), 32768), "PNG")
    with Image.open(src) as check:
        assert check.mode == "I;16"
    render_thumbnail(src, tmp_path / "dst", Thumbnail(4, 4, "scale"), LIMITS)
    with Image.open(tmp_path / "dst") as out:
        assert out.mode == "L"
        grey = out.getpixel((2, 2))
    assert isinstance(grey, int)
    assert abs(grey - 128) <= 3


def test_animated_webp_stays_animated_webp(tmp_path: Path) -> None:
    """An animated WebP asked for as animated stays an animated WebP of the right size."""
    frames = [Image.new("RGB", (40, 30), colour) for colour in (RED, BLUE)]
    src = tmp_path / "src.webp"
    frames[0].save(src, format="WEBP", save_all=True, append_images=frames[1:], duration=50)
    thumb = Thumbnail(20, 20, "scale", animated=True)
    result = render_thumbnail(src, tmp_path / "dst", thumb, LIMITS)
    assert result == RenderedThumbnail("image/webp", 20, 15)
    with Image.open(tmp_path / "dst") as out:
        assert out.format == "WEBP"
        assert getattr(out, "n_frames", 1) == 2


def test_metadata_is_not_carried_into_the_thumbnail(tmp_path: Path) -> None:
    """GPS EXIF, XMP, comments and ICC profiles of the source never reach the output."""
    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0)})
    exif[0x010F] = "PhoneMaker"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = _write(
        tmp_path / "src.jpg",
        Image.new("RGB", (64, 48), RED),
        "JPEG",
        exif=exif,
        comment=b"taken at home",
        icc_profile=icc,
        xmp=b"<x:xmpmeta>secret</x:xmpmeta>",
    )
    with Image.open(src) as check:  # the fixture really carries the metadata
        assert check.getexif().get_ifd(0x8825)
    render_thumbnail(src, tmp_path / "dst", Thumbnail(32, 24, "scale"), LIMITS)
    data = (tmp_path / "dst").read_bytes()
    for needle in (b"Exif", b"PhoneMaker", b"taken at home", b"ICC_PROFILE", b"xmpmeta"):
        assert needle not in data
    with Image.open(tmp_path / "dst") as out:
        assert not out.getexif()
        assert set(out.info) <= {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi"}


def test_png_text_chunks_are_not_carried_into_the_thumbnail(tmp_path: Path) -> None:
    """A transparent PNG's text chunks and ICC profile are dropped from the PNG output."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Author", "Alice Example")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = _write(tmp_path / "src.png", _transparent_rgba(), "PNG", pnginfo=info, icc_profile=icc)
    render_thumbnail(src, tmp_path / "dst", Thumbnail(20, 15, "scale"), LIMITS)
    data = (tmp_path / "dst").read_bytes()
    for needle in (b"tEXt", b"iCCP", b"Alice", b"eXIf"):
        assert needle not in data

"""Encoding a rendered thumbnail: the output format, and no metadata at all.

A still image becomes JPEG when it is opaque and PNG when transparency is really used;
an animation stays in its source's container (GIF stays GIF, WebP stays WebP).

Output carries no metadata at all: no EXIF (orientation is applied to the pixels
instead), no XMP, no comments, no text chunks and no ICC profile. Pixels are not
converted from a wide-gamut profile to sRGB, so such photos look slightly duller.
Decoding, orienting and resizing are :mod:`relay.media.thumbnails`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# Animated sources we keep animated: Pillow format -> (output format, content type).
ANIMATED_FORMATS = {"GIF": ("GIF", "image/gif"), "WEBP": ("WEBP", "image/webp")}
JPEG_QUALITY = 80


@dataclass(frozen=True, slots=True)
class RenderedThumbnail:
    """What :func:`~relay.media.thumbnails.render_thumbnail` wrote to ``dst``."""

    content_type: str
    width: int
    height: int


def displayable(im: Image.Image) -> Image.Image:
    """Convert to a mode we can encode: RGB or L if opaque, RGBA or LA otherwise."""
    if im.mode in ("RGBA", "LA"):
        return im
    if "transparency" in im.info and im.mode in ("RGB", "L", "P", "1"):
        return im.convert("RGBA")  # a tRNS colour key or a transparent palette entry
    if im.mode in ("RGB", "L"):
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit grey: scale to 8 bits (a plain convert would clip everything to white).
        return im.convert("I").point(lambda v: v / 256).convert("L")
    if im.mode == "1":
        return im.convert("L")
    if im.mode in ("P", "PA"):
        return im.convert("RGBA")
    return im.convert("RGB")  # CMYK, YCbCr, ...


def _has_alpha(im: Image.Image) -> bool:
    """Whether any pixel is not fully opaque (an unused alpha channel does not count)."""
    if im.mode not in ("RGBA", "LA"):
        return False
    low = im.getchannel("A").getextrema()[0]  # one band: (min, max)
    return isinstance(low, int | float) and low < 255


def save_static(frame: Image.Image, dst: Path) -> RenderedThumbnail:
    """JPEG for opaque images, PNG when transparency is really used; no metadata."""
    if _has_alpha(frame):
        out, fmt, content_type = frame, "PNG", "image/png"
        options: dict[str, object] = {"optimize": False}
    else:
        out = frame.convert("L" if frame.mode in ("L", "LA") else "RGB")
        fmt, content_type = "JPEG", "image/jpeg"
        options = {"quality": JPEG_QUALITY, "optimize": True}
    # Pillow copies ``info`` through convert/resize and writes some of it back (JPEG
    # comment, PNG ICC profile): start from nothing so no metadata reaches the output.
    out = out.copy()
    out.info = {}
    out.save(dst, format=fmt, **options)
    return RenderedThumbnail(content_type, out.width, out.height)


def save_animated(
    frames: list[Image.Image],
    durations: list[int],
    loop: object,
    fmt: str,
    dst: Path,
) -> RenderedThumbnail:
    """An animation in the source's container (GIF stays GIF, WebP stays WebP)."""
    out_format, content_type = ANIMATED_FORMATS[fmt]
    first, rest = frames[0].copy(), frames[1:]
    first.info = {}
    for frame in rest:
        frame.info = {}
    options: dict[str, object] = {
        "save_all": True,
        "append_images": rest,
        "duration": durations,
    }
    if isinstance(loop, int):
        options["loop"] = loop  # absent in a GIF means "play once"; keep that
    if out_format == "GIF":
        # Frames are full composites: clear each before drawing the next.
        options["disposal"] = 2
    else:
        options["quality"] = JPEG_QUALITY
    first.save(dst, format=out_format, **options)
    return RenderedThumbnail(content_type, first.width, first.height)

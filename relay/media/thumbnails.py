"""Thumbnails of exactly the requested size, rendered with Pillow.

Synapse pre-generates a few sizes and answers the nearest one; outside networks
want exactly the size they asked for, so we render on demand from the cached
original. Everything here is synchronous and CPU-bound (the serving layer runs
it in a thread executor) and has no side effect other than writing ``dst``.

Size rules (Client-Server API, "Content repository" > "Thumbnails"): a thumbnail
is never larger than the original, because "when the content is smaller than the
requested dimensions, servers should return the original content rather than
thumbnail it". We never upscale; a source smaller than the request is re-encoded
at (at most) its own size, which still drops its metadata. See :func:`target_size`.

The output is encoded, with no metadata at all, by :mod:`relay.media.thumbnail_encoding`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

from relay.core.variant import THUMBNAIL_METHODS, Thumbnail
from relay.media.render_budget import (
    DEFAULT_MAX_FRAME_PIXELS,
    DEFAULT_MAX_MEMORY,
    Source,
    animated_frames_allowed,
    static_cost,
)
from relay.media.thumbnail_encoding import (
    ANIMATED_FORMATS,
    RenderedThumbnail,
    displayable,
    save_animated,
    save_static,
)

# Formats we decode at all; everything else (BMP, TIFF, PSD, SVG, HTML...) is refused
# before Pillow sees it, so a rarely used plugin's parser is never reached.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
# How many leading bytes sniff_format needs (RIFF....WEBP is the longest signature).
SNIFF_BYTES = 16
# EXIF orientations 5-8 rotate by 90 degrees: the displayed width is the stored height.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112

# What a hostile or broken file can make Pillow raise while decoding. Errors while
# *writing* dst are not caught: a full disk is the caller's problem, not the image's.
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    struct.error,
    ZeroDivisionError,
)


@dataclass(frozen=True, slots=True)
class ThumbnailLimits:
    """Bounds on what we agree to render (operator-tunable)."""

    min_side: int = 1
    max_side: int = 2048
    # Source pixel limit, checked from the header before anything is decoded.
    max_pixels: int = 32_000_000
    # Frames kept in animated output; longer animations are cut short.
    max_frames: int = 100
    # Peak bytes one render may hold, and canvas pixels an animation may decode
    # (relay.media.render_budget): over them an animation is cut short, or rendered
    # still, and a still image refused.
    max_memory: int = DEFAULT_MAX_MEMORY
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS


class ThumbnailError(Exception):
    """A thumbnail cannot be made; ``str(error)`` is safe to show to the client."""


class NotAnImage(ThumbnailError):
    """The content is not a JPEG, PNG, WebP or GIF image (judged by content, not by name)."""


class ImageTooLarge(ThumbnailError):
    """The source has more pixels than allowed (or is a decompression bomb)."""


class BadThumbnailRequest(ThumbnailError):
    """The requested size or method is outside the limits."""


class UnreadableImage(ThumbnailError):
    """The content looks like a supported image but cannot be decoded (truncated, corrupt)."""


def check_request(thumb: Thumbnail, limits: ThumbnailLimits) -> None:
    """Refuse a thumbnail request whose size or method is outside ``limits``."""
    if thumb.method not in THUMBNAIL_METHODS:
        raise BadThumbnailRequest("Thumbnail method must be 'crop' or 'scale'")
    for name, value in (("width", thumb.width), ("height", thumb.height)):
        # bool is an int subclass; True is not a width.
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadThumbnailRequest(f"Thumbnail {name} must be an integer")
        if not limits.min_side <= value <= limits.max_side:
            raise BadThumbnailRequest(
                f"Thumbnail {name} must be between {limits.min_side} and {limits.max_side}"
            )


def sniff_format(head: bytes) -> str | None:
    """The Pillow format name of a supported image from its first bytes, else ``None``."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    return None


def target_size(source: tuple[int, int], thumb: Thumbnail) -> tuple[int, int]:
    """The output size for a source of ``source`` (width, height) as displayed.

    ``scale`` fits inside the request keeping the aspect ratio: one side equals the
    requested side, unless the source already fits, in which case it keeps its size.
    ``crop`` is exactly the requested size when the source covers it; otherwise it is
    the largest centred region of the source with the requested aspect ratio.
    Neither ever exceeds the source (spec: thumbnails are never larger than the content).
    """
    sw, sh = source
    w, h = thumb.width, thumb.height
    if thumb.method == "scale":
        if sw <= w and sh <= h:
            return sw, sh
        # Compare w/sw with h/sh exactly, in integers, to pick the binding side.
        if w * sh <= h * sw:
            return w, _clamp(_round_div(sh * w, sw), 1, h)
        return _clamp(_round_div(sw * h, sh), 1, w), h
    if sw >= w and sh >= h:
        return w, h
    # The source cannot cover the request: shrink the request by the factor that fits.
    if w * sh >= h * sw:  # width binds
        return sw, _clamp(_round_div(h * sw, w), 1, sh)
    return _clamp(_round_div(w * sh, h), 1, sw), sh


def render_thumbnail(
    src: Path, dst: Path, thumb: Thumbnail, limits: ThumbnailLimits
) -> RenderedThumbnail:
    """Render ``src`` as ``thumb`` into ``dst``, with no metadata; see module docstring.

    Raises :class:`BadThumbnailRequest`, :class:`NotAnImage`, :class:`ImageTooLarge` or
    :class:`UnreadableImage`; ``OSError`` only for failures to read ``src`` or write ``dst``.
    """
    check_request(thumb, limits)
    with src.open("rb") as fp:
        fmt = sniff_format(fp.read(SNIFF_BYTES))
        if fmt is None:
            raise NotAnImage("Content is not a JPEG, PNG, WebP or GIF image")
        fp.seek(0)
        with _open(fp, fmt, limits) as im:
            animated = thumb.animated and fmt in ANIMATED_FORMATS and _is_animated(im)
            if animated:
                made = _animated_frames(im, fmt, thumb, limits)
                if made is not None:
                    frames, durations = made
                    return save_animated(frames, durations, im.info.get("loop"), fmt, dst)
                # Not two frames fit the budget: a still of the first frame, if that fits.
                im.seek(0)
            frame = _static_frame(im, fmt, thumb, limits)
    return save_static(frame, dst)


def _open(fp: BinaryIO, fmt: str, limits: ThumbnailLimits) -> Image.Image:
    """Open (not decode) ``fp`` as ``fmt`` and check its size from the header."""
    try:
        # Pillow's own bomb check is a module global we must not change. It raises an
        # Error above twice its limit and emits a Warning above it: the warning is an
        # exception when warnings are errors (as under our tests) and is caught here;
        # otherwise it is only printed and our own check below refuses the image
        # (our default limit is below Pillow's). We do not use warnings.catch_warnings:
        # it swaps process-global state and is not thread-safe, and we run in threads.
        im = Image.open(fp, formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge("Image has too many pixels") from e
    except _DECODE_ERRORS as e:  # UnidentifiedImageError is an OSError
        raise NotAnImage("Content is not a readable image") from e
    if im.format != fmt:
        im.close()
        raise NotAnImage("Content is not a JPEG, PNG, WebP or GIF image")
    try:
        _check_pixels(im, limits)
    except ThumbnailError:
        im.close()
        raise
    return im


def _check_pixels(im: Image.Image, limits: ThumbnailLimits) -> None:
    width, height = im.size
    if width < 1 or height < 1:
        raise UnreadableImage("Image has no pixels")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"Image has more than {limits.max_pixels} pixels")


def _is_animated(im: Image.Image) -> bool:
    try:
        return bool(getattr(im, "is_animated", False))
    except _DECODE_ERRORS as e:
        raise UnreadableImage("Image cannot be decoded") from e


def _static_frame(
    im: Image.Image, fmt: str, thumb: Thumbnail, limits: ThumbnailLimits
) -> Image.Image:
    """Decode the first frame, orient it, and resize it to the target size."""
    try:
        orientation = _orientation(im)
        raw_w, raw_h = im.size
        shown = (raw_h, raw_w) if orientation in _SWAPPING_ORIENTATIONS else (raw_w, raw_h)
        size, box = _resize_plan(shown, thumb)
        if fmt == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the
            # output: a 24-megapixel photo then never exists at full size in memory.
            factor = size[0] / (box[2] - box[0])
            if factor < 1:
                im.draft("RGB", (math.ceil(raw_w * factor), math.ceil(raw_h * factor)))
        rotated = orientation != 1
        source = Source(fmt, im.mode, im.width * im.height, "transparency" in im.info, rotated)
        if static_cost(source, size[0] * size[1]) > limits.max_memory:
            raise ImageTooLarge("Image needs more memory to thumbnail than this relay allows")
        im.load()
        # exif_transpose copies even when there is nothing to turn: only call it to turn.
        frame = displayable(ImageOps.exif_transpose(im) if rotated else im)
        return _resize(frame, shown, size, box)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge("Image has too many pixels") from e
    except _DECODE_ERRORS as e:
        raise UnreadableImage("Image cannot be decoded") from e


def _animated_frames(
    im: Image.Image, fmt: str, thumb: Thumbnail, limits: ThumbnailLimits
) -> tuple[list[Image.Image], list[int]] | None:
    """The frames that fit the budget (up to ``limits.max_frames``), composited, oriented
    and resized; None when fewer than two fit (the caller renders a still)."""
    frames: list[Image.Image] = []
    durations: list[int] = []
    try:
        orientation = _orientation(im)
        rotated = orientation != 1
        allowed, canvas, decoded = limits.max_frames, 0, 0
        for _ in _frame_indices(im, limits.max_frames):
            # A GIF frame may grow the canvas; check again before this frame is decoded.
            _check_pixels(im, limits)
            raw_w, raw_h = im.size
            swap = orientation in _SWAPPING_ORIENTATIONS
            shown = (raw_h, raw_w) if swap else (raw_w, raw_h)
            size, box = _resize_plan(shown, thumb)
            if raw_w * raw_h > canvas:
                canvas = raw_w * raw_h
                source = Source(fmt, im.mode, canvas, rotated=rotated)
                allowed = animated_frames_allowed(
                    source,
                    size[0] * size[1],
                    max_frames=limits.max_frames,
                    max_memory=limits.max_memory,
                    max_frame_pixels=limits.max_frame_pixels,
                )
            decoded += raw_w * raw_h
            if len(frames) >= allowed or decoded > limits.max_frame_pixels:
                break  # the rest of the animation does not fit: cut it short here
            im.load()
            frame = ImageOps.exif_transpose(im) if rotated else im
            if frame.mode not in ("RGB", "RGBA"):
                frame = frame.convert("RGBA")  # the first, palette frame of a GIF
            # Resized before anything else is done at full size; kept as small RGBA.
            small = _resize(frame, shown, size, box)
            frames.append(small if small.mode == "RGBA" else small.convert("RGBA"))
            durations.append(int(im.info.get("duration", 100)))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge("Image has too many pixels") from e
    except _DECODE_ERRORS as e:
        raise UnreadableImage("Image cannot be decoded") from e
    if len(frames) < 2:
        return None
    # Frames of one animation share one size; a canvas that grew mid-way is rescaled.
    first = frames[0].size
    frames = [f if f.size == first else f.resize(first, Image.Resampling.LANCZOS) for f in frames]
    return frames, durations


def _frame_indices(im: Image.Image, max_frames: int) -> Iterator[int]:
    """Seek ``im`` to each frame in turn, stopping at the end or at ``max_frames``."""
    for index in range(max_frames):
        try:
            im.seek(index)
        except EOFError:
            return
        yield index


def _orientation(im: Image.Image) -> int:
    """The EXIF Orientation (1-8) of ``im``, 1 when absent or invalid."""
    value = im.getexif().get(_EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _resize_plan(
    shown: tuple[int, int], thumb: Thumbnail
) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """Output size and the source box (in displayed coordinates) that maps onto it."""
    size = target_size(shown, thumb)
    sw, sh = shown
    if thumb.method == "scale":
        return size, (0.0, 0.0, float(sw), float(sh))
    # crop: the largest centred region of the source with the output's aspect ratio.
    ow, oh = size
    scale = min(sw / ow, sh / oh)
    bw, bh = ow * scale, oh * scale
    if scale == 1:
        # Not scaled: whole-pixel offsets, so the crop copies pixels instead of blending.
        left, top = float((sw - ow) // 2), float((sh - oh) // 2)
    else:
        left, top = (sw - bw) / 2, (sh - bh) / 2
    return size, (left, top, left + bw, top + bh)


def _resize(
    frame: Image.Image,
    shown: tuple[int, int],
    size: tuple[int, int],
    box: tuple[float, float, float, float],
) -> Image.Image:
    """Resize ``box`` of ``frame`` to ``size``; ``box`` is relative to the undrafted size."""
    # JPEG draft mode may have decoded at a fraction of the header's size.
    fx, fy = frame.width / shown[0], frame.height / shown[1]
    scaled = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    left, top, right, bottom = scaled
    if (right - left, bottom - top) == size and left.is_integer() and top.is_integer():
        return frame.crop((int(left), int(top), int(right), int(bottom)))
    # reducing_gap=2: a cheap box reduction first, then LANCZOS over the last factor of
    # two; visually the same as pure LANCZOS, and ~5x faster on large PNGs (no draft mode).
    return frame.resize(size, Image.Resampling.LANCZOS, box=scaled, reducing_gap=2.0)


def _round_div(a: int, b: int) -> int:
    """``round(a / b)`` for non-negative integers, halves rounded up, without floats."""
    return (2 * a + b) // (2 * b)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))

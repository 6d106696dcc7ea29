"""What a thumbnail render costs, in bytes of memory and pixels of work, before it runs.

A pixel count alone is no budget: a 62-byte GIF may declare a 5000x5000 canvas, a
136-byte WebP decodes to 25 megapixels through libwebp's own buffers, and an
animation does its work once per frame. So :mod:`relay.media.thumbnails` asks here,
from the header alone, what the render would hold at its peak, and refuses (422) or
shortens an animation before decoding anything.

The model is an upper bound of what Pillow (13) allocates, per decoded pixel:

- the decoded image in its own mode (Pillow stores ``1``/``L``/``P`` in one byte,
  ``I;16`` in two, everything else in four);
- the decoder's own buffers: libwebp decodes into RGBA canvases of its own and hands
  Pillow a copy (measured: about 16 bytes per pixel in all for an RGB WebP);
- a full-size conversion when the mode cannot be resized or encoded as it is
  (palette, CMYK, 16-bit grey: four bytes, nine for 16-bit grey's three steps);
- a full-size transposed copy when EXIF says the image is rotated;
- a full-size premultiplied copy when the image has alpha (Pillow resizes RGBA as
  RGBa, and palette images are converted to RGBA first);
- the resize's intermediates (``reduce()`` and the two-pass resampling, each at most
  a quarter of the source at four bytes per pixel);
- the output, held once and once more while encoding.

Animations add a previous canvas (GIF disposal composites onto it) and keep every
resized frame until the encoder has them all; their time is bounded by the sum of the
canvas pixels decoded (``max_frame_pixels``), as each frame costs a decode and a
resize of the whole canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024
# Per render; two renders run at once (relay.media.renditions.MAX_CONCURRENT_RENDERS).
DEFAULT_MAX_MEMORY = 128 * MIB
# Canvas pixels decoded per animated render: about a second of Pillow work on the
# 2-core reference machine (20 frames of 1600x1600).
DEFAULT_MAX_FRAME_PIXELS = 50_000_000

# Extra bytes per pixel a decoder holds beside Pillow's image (see the docstring).
_DECODER_BYTES = {"WEBP": 12}
# Modes that are resized and encoded as they are; others are converted at full size.
_DIRECT_MODES = frozenset({"RGB", "RGBA", "L", "LA"})
_RESIZE_BYTES = 2  # reduce() output and the resampling pass: px/4 x 4 bytes each
_ALPHA_BYTES = 4  # the premultiplied (RGBa/La) copy Pillow resizes alpha images through
_OUTPUT_BYTES = 8  # the output, and the encoder's copy of it (four bytes per pixel each)


def bytes_per_pixel(mode: str) -> int:
    """How many bytes Pillow stores one pixel of ``mode`` in."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def _conversion_bytes(mode: str, transparent: bool) -> int:
    if mode.startswith("I;16"):
        return 9  # convert("I"), point() and convert("L"), all at full size
    if mode in _DIRECT_MODES and not (transparent and mode in ("RGB", "L")):
        return 0
    return 4


def _has_alpha(mode: str, transparent: bool) -> bool:
    return mode in ("RGBA", "LA", "PA", "P") or transparent


@dataclass(frozen=True, slots=True)
class Source:
    """What the header says about the image to render."""

    fmt: str  # Pillow format name: JPEG, PNG, GIF, WEBP
    mode: str
    pixels: int  # decoded pixels (after JPEG draft scaling)
    transparent: bool = False
    rotated: bool = False


def static_cost(source: Source, output_pixels: int) -> int:
    """Peak bytes of rendering one frame of ``source`` into ``output_pixels``."""
    per_pixel = (
        bytes_per_pixel(source.mode)
        + _DECODER_BYTES.get(source.fmt, 0)
        + _conversion_bytes(source.mode, source.transparent)
        + (4 if source.rotated else 0)
        + (_ALPHA_BYTES if _has_alpha(source.mode, source.transparent) else 0)
        + _RESIZE_BYTES
    )
    return source.pixels * per_pixel + output_pixels * _OUTPUT_BYTES


def animation_canvas_cost(source: Source) -> int:
    """Peak bytes of decoding and resizing one frame of an animation (its canvas)."""
    # The canvas (frames after the first are RGB/RGBA in Pillow), the previous canvas,
    # the decoder's buffers, a conversion of the first (palette) frame, its
    # premultiplied copy, a turned copy, the resize.
    per_pixel = (
        4 + 4 + _DECODER_BYTES.get(source.fmt, 0) + 4 + _ALPHA_BYTES + (4 if source.rotated else 0)
    )
    return source.pixels * (per_pixel + _RESIZE_BYTES)


def animated_frames_allowed(
    source: Source,
    output_pixels: int,
    *,
    max_frames: int,
    max_memory: int,
    max_frame_pixels: int,
) -> int:
    """How many frames of an animation fit the budget (0: not even one)."""
    room = max_memory - animation_canvas_cost(source)
    if room <= 0:
        return 0
    by_memory = room // max(1, output_pixels * _OUTPUT_BYTES)
    by_time = max_frame_pixels // max(1, source.pixels)
    return max(0, min(max_frames, by_memory, by_time))

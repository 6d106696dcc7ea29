"""Test harness: a real throwaway Synapse, a tiny client-server API helper, test media."""

from __future__ import annotations

import io

from PIL import Image


def make_png(
    width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 90)
) -> bytes:
    """A valid PNG of the given size (Synapse thumbnails real images only)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()

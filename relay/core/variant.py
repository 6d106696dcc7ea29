"""Which rendition of a media item is meant: the original or a thumbnail."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ThumbnailMethod = Literal["crop", "scale"]
THUMBNAIL_METHODS: tuple[ThumbnailMethod, ...] = ("crop", "scale")


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """A thumbnail of exactly ``width`` x ``height`` (``scale`` fits inside, ``crop`` fills)."""

    width: int
    height: int
    method: ThumbnailMethod
    animated: bool = False


# ``None`` is the original; everything that varies is in the type, so it can be signed and cached.
Variant = Thumbnail | None


def variant_key(variant: Variant) -> str:
    """A short stable name for cache keys and logs: ``original`` or ``thumb-64x48-crop``."""
    if variant is None:
        return "original"
    suffix = "-animated" if variant.animated else ""
    return f"thumb-{variant.width}x{variant.height}-{variant.method}{suffix}"

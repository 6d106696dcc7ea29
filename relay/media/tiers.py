"""The shared second tier behind the local cache, as the media layer sees it.

Local disk is always the first tier. A :class:`SharedTier` (``media.store``, an
S3-protocol bucket: :mod:`relay.media.shared_tier`) is shared by relays on several
machines: a local miss asks it before the homeserver, and what one relay downloads
or renders is copied up so the others need not download or render it again.
Revocation purges both tiers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from relay.media.cache_layout import CacheEntry, CacheKey


class TierObject(Protocol):
    """One object being read from the tier (the shape of an upstream response)."""

    content_type: str
    content_length: int | None
    filename: str | None

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The object's bytes, in order."""
        ...

    async def close(self) -> None:
        """Release the connection (also when not read to the end)."""
        ...


class SharedTier(Protocol):
    """What the media layer asks of the shared tier.

    ``get`` and ``put`` never raise for the tier's own trouble (unreachable, refused,
    throttled): they log it, count it and answer as if the object were absent, so the
    homeserver stays the source. ``purge`` raises, since a revocation that did not
    reach the tier must be retried (its callers log and retry).
    """

    def holds(self, key: CacheKey) -> bool:
        """Whether ``key`` may live in the tier at all (no plaintext of encrypted media)."""
        ...

    async def get(self, key: CacheKey) -> TierObject | None:
        """The object for ``key``, or None when the tier has none (or is unavailable)."""
        ...

    async def put(self, key: CacheKey, entry: CacheEntry) -> None:
        """Copy a committed local entry up (best effort)."""
        ...

    async def purge(self, server_name: str, media_id: str) -> int:
        """Remove every variant of a media item; returns how many objects were removed."""
        ...

"""Minting signed links under ``public.url``: one place, for the bridge API and the CLI."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.core.mxc import MediaId
from relay.core.signing import KeyRing, LinkClaims, build_url, sign
from relay.core.variant import Variant


@dataclass(frozen=True, slots=True)
class SignedLink:
    """A minted link and its expiry in unix seconds."""

    url: str
    expires_at: int

    def as_json(self) -> dict[str, Any]:
        """``url`` and ``expires_at`` in milliseconds since the epoch (the API's unit)."""
        return {"url": self.url, "expires_at": self.expires_at * 1000}


class LinkMinter:
    """Mints signed URLs under ``public.url``; shared by the bridge API and ``media-relay sign``."""

    def __init__(
        self, ring: KeyRing, public_url: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._ring = ring
        self._public_url = public_url
        self._clock = clock

    def mint(
        self,
        media: MediaId,
        ttl: int,
        *,
        filename: str | None = None,
        variant: Variant = None,
        reference: str | None = None,
    ) -> SignedLink:
        """A link valid for at least ``ttl`` seconds (expiry rounded up to a whole second).

        ``reference`` (a :func:`relay.core.records.reference_tag`) binds the link to the
        reference it was minted for, so later mentions of the mxc cannot change it.

        Raises ValueError for claims the signing module refuses (see ``signing.sign``).
        """
        if ttl < 1:
            raise ValueError("ttl must be at least one second")
        # Rounded up: a one-second link must not be dead on arrival.
        expires_at = math.ceil(self._clock() + ttl)
        token = sign(self._ring, LinkClaims(media, variant, filename, expires_at, reference))
        return SignedLink(build_url(self._public_url, token, filename), expires_at)

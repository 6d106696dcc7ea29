"""``compat.legacy_media``: the frozen unauthenticated media paths, for seen media only.

``GET``/``HEAD`` of ``/_matrix/media/{r0,v3}/download/{server}/{id}[/{filename}]`` and
``/_matrix/media/{r0,v3}/thumbnail/{server}/{id}?width=&height=&method=`` (Client-Server
API r0.6.1 / v1.10 "Content repository"; deprecated by MSC3916 in v1.11). For bridges
that still paste homeserver links (hookshot ``bridge.mediaUrl``, the Slack bridge's
``homeserver.media_url``, matterbridge).

A bare mxc is no capability, so this answers only for media the relay has seen in a
room it serves and that is not revoked, whatever ``signing.require_seen`` says: unknown
media answers 404 ``M_NOT_FOUND`` without an upstream request, so the relay never
becomes the anonymous CDN that MSC3916 closed. Thumbnails are rendered by the relay
(exact size; ``method`` defaults to ``scale`` as in the spec). The filename segment is
ignored (the event's own name is served), as for the other compat links.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from multidict import MultiMapping

from relay.core.compat.result import media_or_none
from relay.core.errors import Codes, MatrixError
from relay.core.mxc import MediaId
from relay.core.signing import LinkClaims
from relay.core.variant import THUMBNAIL_METHODS, Thumbnail, Variant
from relay.media.pipeline import MediaPipeline
from relay.web.access_log import LINK_KEY
from relay.web.compat import NO_EXPIRY_MAX_AGE, SeenCheck
from relay.web.public import MediaServer

LINK = ("legacy_media", "legacy_media")
_VERSION = "{version:(?:r0|v3)}"
_MEDIA = "{server}/{media_id}"


class LegacyMedia:
    """Handlers for the legacy download and thumbnail paths (see the module docstring)."""

    def __init__(
        self,
        media_server: MediaServer,
        pipeline: MediaPipeline,
        seen: SeenCheck,
        *,
        max_thumbnail_side: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._server = media_server
        self._pipeline = pipeline
        self._seen = seen
        self._max_side = max_thumbnail_side
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        base = f"/_matrix/media/{_VERSION}"
        return [
            web.get(f"{base}/download/{_MEDIA}", self.download),
            web.get(f"{base}/download/{_MEDIA}/{{filename}}", self.download),
            web.get(f"{base}/thumbnail/{_MEDIA}", self.thumbnail),
        ]

    async def download(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, None)

    async def thumbnail(self, request: web.Request) -> web.StreamResponse:
        # Parsed before any lookup: a bad query is the client's mistake, whatever the media.
        return await self._serve(request, thumbnail_variant(request.query, self._max_side))

    async def _serve(self, request: web.Request, variant: Variant) -> web.StreamResponse:
        request[LINK_KEY] = LINK
        now = self._clock()
        media = _media(request)
        await self._pipeline.admit(media)
        await self._seen.require(media)
        claims = LinkClaims(media, variant, None, int(now) + NO_EXPIRY_MAX_AGE)
        return await self._server.serve(request, claims, now)


def _media(request: web.Request) -> MediaId:
    media = media_or_none(request.match_info["server"], request.match_info["media_id"])
    if media is None:
        raise MatrixError(404, Codes.NOT_FOUND, "Not found")
    return media


def thumbnail_variant(query: MultiMapping[str], max_side: int) -> Thumbnail:
    """``width``, ``height`` (1..max_side), ``method`` (crop|scale, default scale), ``animated``.

    ``query`` is the request's query mapping; repeated parameters are refused, never
    guessed between.
    """
    get = query.getall
    width = _side(get("width", []), "width", max_side)
    height = _side(get("height", []), "height", max_side)
    methods = get("method", ["scale"])
    if len(methods) != 1 or methods[0] not in THUMBNAIL_METHODS:
        raise MatrixError(400, Codes.INVALID_PARAM, "'method' must be crop or scale")
    animated = get("animated", ["false"])
    if len(animated) != 1 or animated[0] not in ("true", "false"):
        raise MatrixError(400, Codes.INVALID_PARAM, "'animated' must be true or false")
    return Thumbnail(width, height, methods[0], animated=animated[0] == "true")


def _side(values: list[str], name: str, max_side: int) -> int:
    if not values:
        raise MatrixError(400, Codes.MISSING_PARAM, f"'{name}' is required")
    if len(values) != 1 or not values[0].isascii() or not values[0].isdigit():
        raise MatrixError(400, Codes.INVALID_PARAM, f"'{name}' must be an integer")
    side = int(values[0])
    if not 1 <= side <= max_side:
        raise MatrixError(400, Codes.INVALID_PARAM, f"'{name}' must be 1-{max_side}")
    return side

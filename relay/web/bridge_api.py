"""The bridge API on the internal listener: ``POST /_relay/v1/sign`` and ``/_relay/v1/rewrite``.

Each bridge authenticates with its own token from ``bridges:`` (compared in constant
time against every configured token), and its ``ttl`` caps the life of the links it
gets: a longer ``ttl`` is clamped, and the answer's ``expires_at`` says what was
granted. By default (``signing.require_seen``) only media the relay has seen in a
room it serves can be signed, so the relay never becomes an open CDN; redacted media
is never signed (410).

``/rewrite`` also offers a preview: every image attachment (``url``/``file`` of an
event whose ``info.mimetype`` is a JPEG, PNG, GIF or WebP, and every ``m.sticker``)
gets ``thumbnail_url`` and ``thumbnail_expires_at`` in its ``media`` list entry: a
:data:`REWRITE_THUMBNAIL` (320x240 ``scale``) rendered by the relay. The content
itself only gains ``<key>_https`` links to the attachments (rewrite.rewrite_content);
a bridge that wants another size asks ``/sign`` with ``thumbnail``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from aiohttp import web

from relay.config.settings import BridgeConfig
from relay.core.errors import Codes, MatrixError
from relay.core.events import MalformedEvent, MediaReference, Role, extract_from_content
from relay.core.limits import MAX_FILENAME_LENGTH
from relay.core.minting import LinkMinter, SignedLink
from relay.core.mxc import InvalidMxc, MediaId, parse_mxc
from relay.core.records import MediaRecord
from relay.core.rewrite import rewrite_content
from relay.core.signing import (
    MAX_THUMBNAIL_SIDE,
)
from relay.core.variant import THUMBNAIL_METHODS, Thumbnail, Variant
from relay.http.headers import media_type, safe_filename
from relay.media.revocation import RevocationCheck
from relay.support.metrics import Metrics
from relay.web.auth import bearer_token, matching_token
from relay.web.json_body import read_json_object

log = logging.getLogger(__name__)

SIGN_PATH = "/_relay/v1/sign"
REWRITE_PATH = "/_relay/v1/rewrite"
# The preview offered beside every image by /rewrite: the size chat clients commonly
# show inline (and one of the sizes Synapse pre-generates, so previews look alike).
REWRITE_THUMBNAIL = Thumbnail(320, 240, "scale")
# What the relay can render (relay.thumbnails); other image/* types get no preview.
THUMBNAILABLE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


class SeenMedia(Protocol):
    """What the bridge API needs from the store (``relay.store.Store`` provides it)."""

    async def media_references(self, media: MediaId) -> list[MediaRecord]: ...


class SigningAudit(Protocol):
    """Where every minted link is recorded (``relay.store.audit.AuditWriter``); no I/O."""

    def signed(self, bridge: str, media: MediaId, variant: Variant, expires_at: int) -> None: ...


class BridgeAPI:
    """Sign and rewrite for bridges; see the module docstring for the rules."""

    def __init__(
        self,
        bridges: Sequence[BridgeConfig],
        minter: LinkMinter,
        records: SeenMedia,
        revocations: RevocationCheck,
        metrics: Metrics,
        *,
        default_ttl: int,
        require_seen: bool,
        max_thumbnail_side: int = MAX_THUMBNAIL_SIDE,
        audit: SigningAudit | None = None,
    ) -> None:
        self._bridges = tuple(bridges)
        self._audit = audit
        self._minter = minter
        self._records = records
        self._revocations = revocations
        self._metrics = metrics
        self.default_ttl = default_ttl
        self.require_seen = require_seen
        self.max_thumbnail_side = max_thumbnail_side

    def routes(self) -> list[web.RouteDef]:
        return [web.post(SIGN_PATH, self.sign), web.post(REWRITE_PATH, self.rewrite)]

    # ------------------------------------------------------------ handlers

    async def sign(self, request: web.Request) -> web.Response:
        """``{"mxc", "ttl"?, "filename"?, "thumbnail"?}`` → ``{"url", "expires_at"}``."""
        bridge = self._authenticate(request)
        body = await read_json_object(request)
        raw_mxc = body.get("mxc")
        if raw_mxc is None:
            raise MatrixError(400, Codes.MISSING_PARAM, "'mxc' is required")
        try:
            media = parse_mxc(raw_mxc)
        except InvalidMxc as e:
            raise MatrixError(400, Codes.INVALID_PARAM, f"'mxc': {e}") from None
        ttl = self._ttl(bridge, body.get("ttl"))
        filename = _filename(body.get("filename"))
        variant = self._thumbnail(body.get("thumbnail"))
        if await self._revocations.is_revoked(media):
            raise MatrixError(410, Codes.NOT_FOUND, "The media was revoked")
        references = await self._records.media_references(media)
        if self.require_seen and not references:
            raise MatrixError(
                404, Codes.NOT_FOUND, "The relay has not seen this media in a room it serves"
            )
        # Bound to the newest reference: a later mention cannot change what it serves.
        reference = references[0].tag if references else None
        link = self._mint(bridge, media, ttl, filename, variant, reference)
        return web.json_response(link.as_json())

    async def rewrite(self, request: web.Request) -> web.Response:
        """``{"content", "type"?, "ttl"?}`` → ``{"content", "media"}`` (relay.core.rewrite).

        References the relay may not sign (unseen, redacted, or encrypted without a
        stored key) are left as they are and not listed.
        """
        bridge = self._authenticate(request)
        body = await read_json_object(request)
        content = body.get("content")
        if not isinstance(content, dict):
            raise MatrixError(400, Codes.BAD_JSON, "'content' must be an object")
        event_type = body.get("type")
        if event_type is not None and not isinstance(event_type, str):
            raise MatrixError(400, Codes.INVALID_PARAM, "'type' must be a string")
        ttl = self._ttl(bridge, body.get("ttl"))
        try:
            references = extract_from_content(content, event_type).references
        except MalformedEvent as e:
            raise MatrixError(400, Codes.BAD_JSON, str(e)) from None
        links: dict[tuple[MediaId, tuple[str, ...]], dict[str, Any]] = {}
        preview = self._preview_size()
        for ref in references:
            may_sign, tag = await self._reference_for(ref)
            if not may_sign:
                continue
            link = self._mint(bridge, ref.media, ttl, _link_filename(ref), None, tag).as_json()
            if _has_preview(ref, event_type):
                thumb = self._mint(bridge, ref.media, ttl, None, preview, tag).as_json()
                link["thumbnail_url"] = thumb["url"]
                link["thumbnail_expires_at"] = thumb["expires_at"]
            links[(ref.media, ref.path)] = link

        def url_for(ref: MediaReference) -> dict[str, Any] | None:
            return links.get((ref.media, ref.path))

        rewritten, media = rewrite_content(content, url_for, event_type)
        return web.json_response({"content": rewritten, "media": media})

    # ------------------------------------------------------------ helpers

    def _authenticate(self, request: web.Request) -> BridgeConfig:
        """The bridge whose token is presented: 401 M_MISSING_TOKEN, or 403 M_FORBIDDEN."""
        token = bearer_token(request)
        if token is None:
            raise MatrixError(401, Codes.MISSING_TOKEN, "Missing bridge token")
        index = matching_token(token, (bridge.token for bridge in self._bridges))
        if index is None:
            raise MatrixError(403, Codes.FORBIDDEN, "Invalid bridge token")
        return self._bridges[index]

    def _ttl(self, bridge: BridgeConfig, raw: object) -> int:
        """The asked lifetime, clamped to the bridge's ``ttl``; default ``signing.ttl``."""
        if raw is None:
            return min(self.default_ttl, bridge.ttl)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            raise MatrixError(400, Codes.INVALID_PARAM, "'ttl' must be a positive integer")
        return min(raw, bridge.ttl)

    def _thumbnail(self, raw: object) -> Thumbnail | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise MatrixError(400, Codes.INVALID_PARAM, "'thumbnail' must be an object")
        width, height = self._side(raw, "width"), self._side(raw, "height")
        method, animated = raw.get("method", "scale"), raw.get("animated", False)
        if method not in THUMBNAIL_METHODS:
            raise MatrixError(400, Codes.INVALID_PARAM, "'thumbnail.method' must be crop or scale")
        if not isinstance(animated, bool):
            raise MatrixError(400, Codes.INVALID_PARAM, "'thumbnail.animated' must be a boolean")
        return Thumbnail(width, height, method, animated=animated)

    def _side(self, thumbnail: dict[str, Any], name: str) -> int:
        side = thumbnail.get(name)
        if isinstance(side, bool) or not isinstance(side, int):
            side = 0
        if not 1 <= side <= self.max_thumbnail_side:
            raise MatrixError(
                400,
                Codes.INVALID_PARAM,
                f"'thumbnail.{name}' must be an integer 1-{self.max_thumbnail_side}",
            )
        return side

    def _preview_size(self) -> Thumbnail:
        """:data:`REWRITE_THUMBNAIL`, shrunk to ``thumbnails.max_side`` if that is smaller."""
        side = self.max_thumbnail_side
        base = REWRITE_THUMBNAIL
        return Thumbnail(min(base.width, side), min(base.height, side), base.method)

    async def _reference_for(self, ref: MediaReference) -> tuple[bool, str | None]:
        """Whether ``ref`` may be signed, and the stored reference its links are bound to.

        The stored reference is the newest one that says what this content says (the
        same key for an attachment, else the same type and name), so the link serves
        this content's plaintext, type and filename whatever is posted later. An
        attachment whose key the relay never saw is not signed: it could only serve
        ciphertext.
        """
        if await self._revocations.is_revoked(ref.media):
            return False, None
        stored = await self._records.media_references(ref.media)
        same_key = [r for r in stored if r.encryption == ref.encryption]
        alike = [r for r in same_key if (r.mimetype, r.filename) == (ref.mimetype, ref.filename)]
        chosen = alike[0] if alike else same_key[0] if same_key else None
        if chosen is not None:
            return True, chosen.tag
        return ref.encryption is None and not self.require_seen, None

    def _mint(
        self,
        bridge: BridgeConfig,
        media: MediaId,
        ttl: int,
        filename: str | None,
        variant: Variant,
        reference: str | None,
    ) -> SignedLink:
        try:
            link = self._minter.mint(
                media, ttl, filename=filename, variant=variant, reference=reference
            )
        except ValueError as e:
            raise MatrixError(400, Codes.INVALID_PARAM, str(e)) from None
        self._metrics.signed.labels(bridge.name).inc()
        if self._audit is not None:
            self._audit.signed(bridge.name, media, variant, link.expires_at)
        return link


def _filename(raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not 0 < len(raw) <= MAX_FILENAME_LENGTH:
        raise MatrixError(
            400,
            Codes.INVALID_PARAM,
            f"'filename' must be a string of 1-{MAX_FILENAME_LENGTH} characters",
        )
    return raw


def _has_preview(ref: MediaReference, event_type: str | None) -> bool:
    """Whether a rewritten reference gets a thumbnail link: image attachments and stickers."""
    if ref.role is not Role.CONTENT:
        return False
    mimetype = media_type(ref.mimetype)
    if mimetype in THUMBNAILABLE_TYPES:
        return True
    # m.sticker: "the image" (Client-Server API, "Sticker Messages"); its mimetype is optional.
    return event_type == "m.sticker" and not mimetype


def _link_filename(ref: MediaReference) -> str | None:
    """The name a rewritten attachment's URL ends in (path components removed)."""
    if ref.role is not Role.CONTENT:
        return None
    return safe_filename(ref.filename)

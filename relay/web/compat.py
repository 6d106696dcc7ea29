"""Links that existing bridges mint, served by the relay (``compat:`` in the config).

One request, in order:

1. the kind's verifier (:mod:`relay.core.compat`) checks the link against each entry
   whose route matched (several entries may share a path: two IRC networks behind one
   host, or the same path without the prefix), stopping at the first whose key signed
   it: none → 403 ``M_FORBIDDEN``, expired → 410. A link that verified is remembered by
   its path (so a repeat skips the MACs, as native tokens do), its expiry checked again
   on every request;
2. revoked → 410 (:meth:`MediaPipeline.admit <relay.media.pipeline.MediaPipeline.admit>`);
3. unless ``signing.require_seen`` is false, media the relay has not seen in a room it
   serves → 404 ``M_NOT_FOUND``, without an upstream request (native links are only
   minted for seen media, so they are checked when signed; these are minted by the
   bridge, so they are checked here);
4. :meth:`MediaServer.serve <relay.web.public.MediaServer.serve>`, as for a native link
   (cache, Range, ETag, headers, metadata stripping).

Filenames in these links are not covered by the bridges' MACs, so they are ignored: the
event's own filename is served. Links without an expiry get ``Cache-Control`` for
NO_EXPIRY_MAX_AGE seconds (a revoked link must not live on in browsers for long).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from urllib.parse import unquote

from aiohttp import web

from relay.config.settings import CompatConfig
from relay.core.compat import heisenbridge, mautrix, mediaproxy
from relay.core.compat.result import Checked, Verdict
from relay.core.errors import Codes, MatrixError
from relay.core.mxc import MediaId
from relay.core.signing import LinkClaims
from relay.media.pipeline import MediaPipeline, MediaRecords, database
from relay.support.memo import TTLCache
from relay.web.access_log import LINK_KEY
from relay.web.middleware import loggable_path
from relay.web.public import MediaServer

log = logging.getLogger(__name__)

NO_EXPIRY_MAX_AGE = 3600
# "Seen" answers are remembered briefly, so a hot compat link costs no query per hit;
# only "seen" is remembered (a redaction is caught by the revocation check, which runs
# on every request before this one).
SEEN_TTL = 5.0
SEEN_MEMO_ENTRIES = 4_096
# Links that verified, by path: a MAC that verified once verifies again under the same
# keys (fixed for the server's life), so a repeat skips it; expiry is checked every time.
# As in relay.web.public, only verified links are kept: a forgery costs its MAC each time.
LINK_MEMO_ENTRIES = 4_096

Verify = Callable[[web.UrlMappingMatchInfo, float], Checked]


class SeenCheck:
    """Refuses media the relay has not seen in a room it serves (404, no upstream request)."""

    def __init__(
        self, records: MediaRecords, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._records = records
        self._seen: TTLCache[MediaId, bool] = TTLCache(SEEN_TTL, SEEN_MEMO_ENTRIES, clock=monotonic)

    async def require(self, media: MediaId) -> None:
        if self._seen.get(media):
            return
        if not await database(self._records.media_references(media)):
            raise MatrixError(404, Codes.NOT_FOUND, "Not found")
        self._seen.put(media, True)


@dataclass(frozen=True, slots=True)
class Entry:
    """One configured bridge: its kind, name, URL prefix, link paths and verifier."""

    kind: str
    name: str
    url_prefix: str
    paths: tuple[str, ...]
    verify: Verify


def entries(config: CompatConfig) -> list[Entry]:
    """Every configured entry, its key bound into its verifier."""
    found: list[Entry] = []
    for proxy in config.mediaproxy:
        verify: Verify = partial(_mediaproxy, proxy.signing_key())
        paths: tuple[str, ...] = ("/v1/media/download/{token}",)
        found.append(Entry("mediaproxy", proxy.name, proxy.url_prefix, paths, verify))
    for hb in config.heisenbridge:
        verify = partial(_heisenbridge, hb.media_key.encode())
        base = "/_heisenbridge/media/{server}/{media_id}/{checksum}"
        paths = (base, base + "/{filename}")
        found.append(Entry("heisenbridge", hb.name, hb.url_prefix, paths, verify))
    for mx in config.mautrix_publicmedia:
        verify = partial(_mautrix, mx.signing_key.encode(), mx.hash_length, mx.expiry > 0)
        base = mx.path_prefix + "/{server}/{media_id}/{checksum}"
        paths = (base, base + "/{filename}")
        found.append(Entry("mautrix_publicmedia", mx.name, mx.url_prefix, paths, verify))
    return found


def _mediaproxy(key: bytes, m: web.UrlMappingMatchInfo, now: float) -> Checked:
    return mediaproxy.verify(key, m["token"], now)


def _heisenbridge(key: bytes, m: web.UrlMappingMatchInfo, now: float) -> Checked:
    return heisenbridge.verify(key, m["server"], m["media_id"], m["checksum"])


def _mautrix(
    key: bytes, hash_length: int, expiring: bool, m: web.UrlMappingMatchInfo, now: float
) -> Checked:
    return mautrix.verify(
        key, hash_length, expiring, m["server"], m["media_id"], m["checksum"], now
    )


class CompatServer:
    """Routes and handlers for every ``compat:`` entry (see the module docstring)."""

    def __init__(
        self,
        config: CompatConfig,
        media_server: MediaServer,
        pipeline: MediaPipeline,
        seen: SeenCheck,
        *,
        require_seen: bool,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries = entries(config)
        self._server = media_server
        self._pipeline = pipeline
        self._seen = seen
        self._require_seen = require_seen
        self._clock = clock
        self._verified: TTLCache[str, tuple[Entry, Checked]] = TTLCache(
            math.inf, LINK_MEMO_ENTRIES, clock=monotonic
        )

    def routes(self) -> list[web.RouteDef]:
        """Each entry's paths under its URL prefix and without it; shared paths grouped."""
        by_path: dict[str, list[Entry]] = {}
        for entry in self._entries:
            prefix = unquote(entry.url_prefix)
            if "{" in prefix or "}" in prefix:
                raise ValueError(f"compat entry {entry.name!r}: url path must not have braces")
            for path in entry.paths:
                for full in dict.fromkeys((prefix + path, path)):
                    group = by_path.setdefault(full, [])
                    if entry not in group:
                        group.append(entry)
        return [web.get(path, self._handler(tuple(group))) for path, group in by_path.items()]

    def _handler(
        self, group: Sequence[Entry]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.handle(request, group)

        return handle

    async def handle(self, request: web.Request, group: Sequence[Entry]) -> web.StreamResponse:
        """``GET``/``HEAD`` of one bridge link (see the module docstring for the order)."""
        request[LINK_KEY] = (group[0].kind, group[0].name)
        now = self._clock()
        remembered = self._verified.get(request.path)
        if remembered is None:
            entry, checked = _first_signed(group, request.match_info, now)
            if entry is None or checked.media is None:
                # The route, not the path: a link refused here (a key misconfigured) may be valid.
                kind, route = group[0].kind, loggable_path(request)
                log.info("refused %s link %s: %s", kind, route, checked.reason)
                raise MatrixError(403, Codes.FORBIDDEN, "Invalid or unsigned link")
            if checked.verdict is Verdict.VALID:
                self._verified.put(request.path, (entry, checked))
        else:
            entry, checked = remembered
        request[LINK_KEY] = (entry.kind, entry.name)
        # The verifiers' expiry rule, checked on every use (a NaN clock counts as expired).
        expired = checked.expires_at is not None and not now < checked.expires_at
        media = checked.media
        if checked.verdict is Verdict.EXPIRED or expired or media is None:
            raise MatrixError(410, Codes.NOT_FOUND, "This link has expired")
        # Revoked (410) before unseen (404): a redacted event's media has no live reference.
        await self._pipeline.admit(media)
        if self._require_seen:
            await self._seen.require(media)
        return await self._server.serve(request, claims_for(media, checked.expires_at, now), now)


def claims_for(media: MediaId, expires_at: float | None, now: float) -> LinkClaims:
    """What a bridge link grants: the original, under the event's filename, until it expires."""
    deadline = now + NO_EXPIRY_MAX_AGE if expires_at is None else expires_at
    return LinkClaims(media, None, None, math.floor(deadline))


def _first_signed(
    group: Sequence[Entry], match_info: web.UrlMappingMatchInfo, now: float
) -> tuple[Entry | None, Checked]:
    """The first entry whose key signed the link (valid or expired), and its result."""
    refused = Checked(Verdict.FORGED, reason="no entry")
    for entry in group:
        checked = entry.verify(match_info, now)
        if checked.verdict in (Verdict.VALID, Verdict.EXPIRED):
            return entry, checked
        if refused.reason == "no entry":
            refused = checked
    return None, refused

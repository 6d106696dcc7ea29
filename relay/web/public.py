"""The public media server: ``GET`` and ``HEAD`` of signed URLs, nothing else.

One request, in order (cheap and local checks first, so a forged link costs no I/O):

1. verify the token and the filename that came with it (:mod:`relay.core.signing`):
   tampered, unsigned or an unknown key → 403 ``M_FORBIDDEN``; expired → 410. A token
   that verified is remembered (by token and filename) so a repeat skips the MAC, and
   its expiry is checked again on every request;
2. revoked → 410 (:meth:`MediaPipeline.admit <relay.media.pipeline.MediaPipeline.admit>`);
3. a plain ``GET`` of an original (no Range, no If-None-Match) that was answered from
   a cached file within the last half second, under the same signed filename, is
   answered again from that ready response (headers, and the bytes of a small file or
   the path of a large one; Cache-Control from this link's own expiry): steps 4-5 are
   skipped. :mod:`relay.web.fast_path` answers such requests before aiohttp does
   (:meth:`MediaServer.remembered_answer`), and renews a small file's ready response
   in the background (steps 2 and 4-5, nothing sent) once it is half its age;
4. the body, its type and filename from the media pipeline
   (:meth:`MediaPipeline.open <relay.media.pipeline.MediaPipeline.open>`);
5. the response plan (:mod:`relay.http.response`: header policy, If-None-Match → 304,
   Range → 206 or 416), carried out by :mod:`relay.web.sending`: a cached file of up
   to 256 KiB read whole and written with its headers in one go, a larger one with the
   kernel's ``sendfile``, a download in progress as it arrives. A cached file that
   vanished before it was opened is looked up again (a retry, never a 500).

The short memories here never decide access: the token and revocation checks run on
every request, and :meth:`MediaServer.forget` drops what is remembered of revoked or
purged media. The verified-token memory relies on the key ring being fixed for the
server's life (keys change only at a restart, which builds a new server). Remembered
answers are not cache lookups: they count in ``relay_served_requests``, not
``relay_cache_hits``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from relay.core.errors import Codes, MatrixError
from relay.core.mxc import MediaId
from relay.core.signing import KeyRing, LinkClaims, Verdict, verify
from relay.core.variant import variant_key
from relay.http.headers import cache_control
from relay.http.response import ResponsePlan, plan_response
from relay.media.pipeline import MediaPipeline
from relay.support.memo import TTLCache
from relay.support.metrics import Metrics
from relay.web.access_log import LINK_KEY, MEDIA_KEY
from relay.web.inflight import InFlight
from relay.web.ready import ReadyAnswer, ReadyHead, ready_head
from relay.web.sending import Sender, read_cached

log = logging.getLogger(__name__)

HEALTH_PATH = "/_relay/health"
# Without the prefix only token-shaped first segments are links ("<version>.<…>"), so
# "/favicon.ico" or "/robots.txt" stay 404 M_UNRECOGNIZED instead of 403.
LINK_SHAPE = r"[0-9]+\.[A-Za-z0-9_.\-]+"
# A cached file can be evicted between lookup and open; look again this many times.
MAX_OPEN_ATTEMPTS = 3
# Cached files up to this size are read whole and sent with their headers in one write:
# for small bodies that beats sendfile, whose set-up costs more than the copy it saves.
SMALL_BODY = 256 * 1024
# Verified tokens: a MAC that verified once verifies again under the same keys. A key
# (token, filename) is at most ~2 KiB (tokens <= 1024 characters, bridge filenames <= 255).
TOKEN_MEMO_ENTRIES = 4_096
# Ready responses of plain GETs (see step 3 of the module docstring). A small file's
# bytes are kept with its answer, so this memory holds at most
# READY_MEMO_ENTRIES * SMALL_BODY = 8 MiB of bodies: room for the media that are hot
# right now, which is what it is for.
READY_TTL = 0.5
READY_MEMO_ENTRIES = 32


# Where a request's link came from, for relay_link_requests{kind, entry}: set by the
# handler (native links here, the compat kinds in relay.web.compat) before it verifies.
NATIVE = ("native", "relay")


@dataclass(frozen=True, slots=True)
class ReadyResponse:
    """A plain GET's answer from a cached file, without Cache-Control (it is per link)."""

    # The filename and reference the link signed: they decide the answer (its
    # Content-Disposition, type and bytes), so only a link with the same ones may reuse it.
    claimed_filename: str | None
    reference: str | None
    path: Path
    length: int
    # Reused for every answer: aiohttp copies the headers it is given into each response.
    plan: ResponsePlan
    # A file of at most SMALL_BODY bytes: read once, its head serialised once
    # (relay.web.ready); None for a larger one (sent by sendfile each time).
    head: ReadyHead | None
    # When it was made (monotonic): relay.web.fast_path's hits refresh it before it expires.
    made: float = 0.0


class MediaServer:
    """Handles signed media URLs on the public listener."""

    def __init__(
        self,
        ring: KeyRing,
        pipeline: MediaPipeline,
        metrics: Metrics,
        *,
        path_prefix: str,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (wall time) judges link expiry; ``monotonic`` times the memories."""
        prefix = unquote(path_prefix).rstrip("/")
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"public.url path must not contain braces: {path_prefix!r}")
        self._ring = ring
        self._pipeline = pipeline
        self._metrics = metrics
        self.sender = Sender(metrics)
        self.path_prefix = prefix
        self._clock = clock
        self._tokens: TTLCache[tuple[str, str | None], LinkClaims] = TTLCache(
            math.inf, TOKEN_MEMO_ENTRIES, clock=monotonic
        )
        self._ready: TTLCache[MediaId, ReadyResponse] = TTLCache(
            READY_TTL, READY_MEMO_ENTRIES, clock=monotonic
        )
        self._monotonic = monotonic
        self._refreshing: dict[MediaId, asyncio.Task[None]] = {}
        self.in_flight = InFlight()

    def forget(self, media: MediaId) -> None:
        """Drop what is remembered of ``media`` and cut its responses under way
        (called when it is revoked or purged)."""
        self._ready.discard(media)
        if cut := self.in_flight.cut(media):
            log.info("cut %d response(s) of %s under way", cut, media)

    def routes(self) -> list[web.RouteDef]:
        """Links under ``public.url``'s path, and the same without it (proxies differ)."""
        routes: list[web.RouteDef] = []
        if self.path_prefix:
            routes += [
                web.get(self.path_prefix + "/{token}", self.handle),
                web.get(self.path_prefix + "/{token}/{filename}", self.handle),
            ]
        token = "{token:" + LINK_SHAPE + "}"
        routes += [
            web.get(f"/{token}", self.handle),
            web.get(f"/{token}/{{filename}}", self.handle),
        ]
        return routes

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET``/``HEAD`` of one signed link (see the module docstring for the order)."""
        request[LINK_KEY] = NATIVE
        now = self._clock()
        return await self.serve(request, self._verified(request, now), now)

    async def serve(
        self, request: web.Request, claims: LinkClaims, now: float
    ) -> web.StreamResponse:
        """Serve what verified ``claims`` grant: steps 2-5 of the module docstring.

        The entry point for every kind of link (:mod:`relay.web.compat` verifies the
        bridges' own links, checks "seen", then calls this).
        """
        media = claims.media
        request[MEDIA_KEY] = (str(media), variant_key(claims.variant))
        # Before anything is fetched, rendered or remembered: a redacted event's media
        # and its thumbnails are never produced nor served again.
        await self._pipeline.admit(media)
        return await self._send_admitted(request, claims, now)

    async def _send_admitted(
        self, request: web.Request, claims: LinkClaims, now: float
    ) -> web.StreamResponse:
        """Steps 3-5 for media that :meth:`MediaPipeline.admit` let through."""
        media = claims.media
        method = request.method
        request_headers = request.headers
        plain = (
            method == "GET"
            and claims.variant is None
            and "Range" not in request_headers
            and "If-None-Match" not in request_headers
        )
        if plain:
            ready = await self._answer_ready(request, claims, now)
            if ready is not None:
                return ready
        # Cut on revocation while the body is looked up (a download, a render) or sent
        # from here; a small body is written after the handler, past any cut.
        with self.in_flight.track(media, request):
            return await self._open_and_send(request, claims, now, plain=plain)

    async def _open_and_send(
        self, request: web.Request, claims: LinkClaims, now: float, *, plain: bool
    ) -> web.StreamResponse:
        """Steps 4-5: the body from the pipeline, sent by its plan (remembered if plain)."""
        media = claims.media
        method = request.method
        request_headers = request.headers
        wants_range = method == "GET" and "Range" in request_headers
        sender = self.sender
        for _ in range(MAX_OPEN_ATTEMPTS):
            served = await self._pipeline.open(claims, need_file=wants_range)
            body = served.body
            plan = plan_response(
                method,
                request_headers,
                body,
                served.content_type,
                served.filename,
                claims.expires_at - now,
            )
            path, length = body.path, body.length
            if not plan.send_body or path is None or length is None or plan.length is None:
                return await sender.send(request, media, plan, stream=body)
            remember = plain and plan.status == 200 and body.sha256 is not None
            if plan.length <= SMALL_BODY:
                start = plan.byte_range.start if plan.byte_range is not None else 0
                data = read_cached(path, length, start, plan.length)
                if data is not None:
                    if remember:
                        self._remember_ready(claims, plan, path, length, data)
                    return sender.whole(plan, data)
            else:
                response = await sender.file(request, media, plan, path, length)
                if response is not None:
                    if remember:
                        self._remember_ready(claims, plan, path, length, None)
                    return response
            log.debug("cached file of %s vanished before sending; looking again", media)
        raise MatrixError(
            503, Codes.UNKNOWN, "The media is being replaced; try again", {"Retry-After": "1"}
        )

    def _verified(self, request: web.Request, now: float) -> LinkClaims:
        match_info = request.match_info
        token = match_info["token"]
        filename = match_info.get("filename")
        # A hit needs the exact token string, and only tokens that verified are kept
        # (forged ones cost their MAC every time), so the memo grants nothing verify
        # would refuse while the key ring stays the same (module docstring).
        claims = self._tokens.get((token, filename))
        if claims is None:
            result = verify(self._ring, token, filename, now)
            if result.verdict is Verdict.VALID and result.claims is not None:
                self._tokens.put((token, filename), result.claims)
                return result.claims
            if result.verdict is Verdict.EXPIRED:
                raise _expired()
            # MALFORMED and FORGED (unknown key, wrong MAC or filename) look the same outside.
            raise MatrixError(403, Codes.FORBIDDEN, "Invalid or unsigned link")
        # verify's rule, checked on every use: expired from expires_at on (NaN: expired).
        if not now < claims.expires_at:
            raise _expired()
        return claims

    async def _answer_ready(
        self, request: web.Request, claims: LinkClaims, now: float
    ) -> web.StreamResponse | None:
        """The remembered answer to a plain GET, or None (not remembered, or file gone)."""
        media = claims.media
        ready = self._ready.get(media)
        if ready is None or (ready.claimed_filename, ready.reference) != (
            claims.filename,
            claims.reference,
        ):
            return None
        freshness = cache_control(claims.expires_at - now)
        if ready.head is not None:
            return self.sender.ready(ready.head, freshness)
        with self.in_flight.track(media, request):
            response = await self.sender.file(
                request, media, ready.plan, ready.path, ready.length, freshness
            )
        if response is None:
            # Evicted or purged since: forget it and take the full path.
            self._ready.discard(media)
        return response

    def remembered_answer(
        self, token: str, filename: str | None
    ) -> tuple[LinkClaims, ReadyAnswer] | None:
        """Step 3 without aiohttp (relay.web.fast_path): the ready answer of a small file
        to a plain GET of this link, or None when anything would need more than memories
        (a token not verified before, expired, not admitted from memory alone, nothing
        small remembered for it, another filename or reference)."""
        claims = self._tokens.get((token, filename))
        now = self._clock()
        if claims is None or claims.variant is not None or not now < claims.expires_at:
            return None
        media = claims.media
        if not self._pipeline.admitted_now(media):
            return None
        ready = self._ready.get(media)
        if (
            ready is None
            or ready.head is None
            or ready.claimed_filename != claims.filename
            or ready.reference != claims.reference
        ):
            return None
        if self._monotonic() - ready.made >= READY_TTL / 2:
            self._renew(claims)
        return claims, self.sender.ready(ready.head, cache_control(claims.expires_at - now))

    def renewal(self, token: str, filename: str | None) -> asyncio.Future[None] | None:
        """The renewal of a lapsed ready answer (relay.web.fast_path waits for it), for a
        link that verified before and has not expired; None for any other link."""
        claims = self._tokens.get((token, filename))
        if claims is None or claims.variant is not None or not self._clock() < claims.expires_at:
            return None
        return self._renew(claims)

    def _renew(self, claims: LinkClaims) -> asyncio.Future[None]:
        """One renewal per media at a time (:meth:`_refresh_ready`), shared."""
        media = claims.media
        task = self._refreshing.get(media)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._refresh_ready(claims))
            self._refreshing[media] = task
            task.add_done_callback(lambda _: self._refreshing.pop(media, None))
        return task

    async def _refresh_ready(self, claims: LinkClaims) -> None:
        """Steps 2 and 4-5 of a plain GET, nothing sent: the fast path's connections
        never come back to aiohttp, so it renews the ready answer before it expires."""
        try:
            await self._pipeline.admit(claims.media)
            served = await self._pipeline.open(claims)
        except Exception:  # MatrixError, database: the next request takes aiohttp's way
            log.debug("renewing the ready answer of %s failed", claims.media, exc_info=True)
            return
        body = served.body
        seconds_left = claims.expires_at - self._clock()
        plan = plan_response(
            "GET", CIMultiDict(), body, served.content_type, served.filename, seconds_left
        )
        path, length = body.path, body.length
        if plan.status != 200 or body.sha256 is None or path is None or length is None:
            return
        if plan.length is not None and plan.length <= SMALL_BODY:
            data = read_cached(path, length, 0, plan.length)
            if data is not None:
                self._remember_ready(claims, plan, path, length, data)

    def _remember_ready(
        self,
        claims: LinkClaims,
        plan: ResponsePlan,
        path: Path,
        length: int,
        body: bytes | None,
    ) -> None:
        headers = plan.headers.copy()
        headers.popall("Cache-Control", None)
        ready_plan = ResponsePlan(plan.status, headers, plan.length, None, send_body=True)
        head = ready_head(headers, body) if body is not None else None
        if body is not None and head is None:
            return  # a header aiohttp would have to refuse: not remembered, never reused
        self._ready.put(
            claims.media,
            ReadyResponse(
                claims.filename, claims.reference, path, length, ready_plan, head, self._monotonic()
            ),
        )


def _expired() -> MatrixError:
    return MatrixError(410, Codes.NOT_FOUND, "This link has expired")

"""The public media server: ``GET`` and ``HEAD`` of signed URLs, nothing else.

One request, in order (cheap and local checks first, so a forged link costs no I/O):

1. verify the token and the filename that came with it (:mod:`relay.core.signing`):
   tampered, unsigned or an unknown key → 403 ``M_FORBIDDEN``; expired → 410. A token
   that verified is remembered (by token and filename) so a repeat skips the MAC, and
   its expiry is checked again on every request;
2. revoked (the event was redacted) → 410 (:mod:`relay.media.revocation`);
3. a plain ``GET`` of an original (no Range, no If-None-Match) that was answered from
   a cached file within the last half second, under the same signed filename, is
   answered again from that ready response (headers, and the bytes of a small file or
   the path of a large one; Cache-Control from this link's own expiry): steps 4-6 are
   skipped;
4. the media record (what the relay saw in the room): the decryption key of an
   encrypted attachment, and the filename/type the sender gave;
5. the body from :class:`~relay.media.downloads.MediaSource` (cache or one shared download);
   upstream failures keep their meaning (404, or 502/503/504 with ``Retry-After``);
   a thumbnail link, or an original whose metadata must go, gets its rendition from
   :class:`~relay.media.renditions.Renditions` instead (rendered once, cached; not an image
   → 400, too many pixels → 422);
6. the header policy of :mod:`relay.http.headers`, then If-None-Match → 304, Range → 206 or
   416 (:mod:`relay.http.ranges`), then the body: a cached file of up to 256 KiB read
   whole and written with its headers in one go, a larger one with the kernel's
   ``sendfile`` (:mod:`relay.web.sendfile`), a download in progress as it arrives. A cached
   file that vanished before it was opened is looked up again (a retry, never a 500).

The short memories (bounded :class:`~relay.support.memo.TTLCache` maps, one per server)
never decide access: the token and revocation checks run on every request, and
:meth:`MediaServer.forget` drops what is remembered of revoked or purged media. The
verified-token memory relies on the key ring being fixed for the server's life (keys
change only at a restart, which builds a new server). Remembered answers are not
cache lookups: they count in ``relay_served_requests``, not ``relay_cache_hits``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import Counter

from relay.core.errors import Codes, MatrixError
from relay.core.mxc import MediaId
from relay.core.records import MediaRecord
from relay.core.signing import KeyRing, LinkClaims, Verdict, verify
from relay.http.headers import (
    cache_control,
    content_disposition,
    etag,
    normalise_content_type,
    security_headers,
)
from relay.http.ranges import ByteRange, RangeNotSatisfiable, none_match, parse_range, range_applies
from relay.media.downloads import FileBody, MediaBody, MediaSource
from relay.media.renditions import RenditionFailed, Renditions, thumbnail_filename, to_matrix_error
from relay.media.revocation import RevocationCheck
from relay.media.thumbnails import ThumbnailError
from relay.support.memo import TTLCache
from relay.support.metrics import Metrics
from relay.upstream.fetcher import FetchError
from relay.web.middleware import Handler
from relay.web.sendfile import close_quietly, open_cached, read_cached, send_file

log = logging.getLogger(__name__)

HEALTH_PATH = "/_relay/health"
# Without the prefix only token-shaped first segments are links ("<version>.<…>"), so
# "/favicon.ico" or "/robots.txt" stay 404 M_UNRECOGNIZED instead of 403.
LINK_SHAPE = r"[0-9]+\.[A-Za-z0-9_.\-]+"
# A cached file can be evicted between lookup and open; look again this many times.
MAX_OPEN_ATTEMPTS = 3
DB_RETRY_AFTER = 5
# Cached files up to this size are read whole and sent with their headers in one write:
# for small bodies that beats sendfile, whose set-up costs more than the copy it saves.
SMALL_BODY = 256 * 1024
# Media records ("never seen" included) are trusted this long: they only supply the
# decryption key and filename/type fallbacks, never a decision about access. The
# memories are sized for what is requested repeatedly within their lifetimes.
RECORD_TTL = 1.0
RECORD_MEMO_ENTRIES = 1_000
# Verified tokens: a MAC that verified once verifies again under the same keys. A key
# (token, filename) is at most ~2 KiB (tokens <= 1024 characters, bridge filenames <= 255).
TOKEN_MEMO_ENTRIES = 4_096
# Ready responses of plain GETs (see step 3 of the module docstring). A small file's
# bytes are kept with its answer, so this memory holds at most
# READY_MEMO_ENTRIES * SMALL_BODY = 8 MiB of bodies: room for the media that are hot
# right now, which is what it is for.
READY_TTL = 0.5
READY_MEMO_ENTRIES = 32

T = TypeVar("T")


class MediaRecords(Protocol):
    """What the server needs from the store (``relay.store.Store`` provides it)."""

    async def media_record(self, media: MediaId) -> MediaRecord | None: ...


@dataclass(frozen=True, slots=True)
class ResponsePlan:
    """What to answer, decided before any byte is sent."""

    status: int
    headers: CIMultiDict[str]
    # Content-Length (None: unknown, sent chunked); 0 for 304.
    length: int | None
    byte_range: ByteRange | None
    send_body: bool


@dataclass(frozen=True, slots=True)
class ReadyResponse:
    """A plain GET's answer from a cached file, without Cache-Control (it is per link)."""

    # The filename the link signed: part of the answer (Content-Disposition).
    claimed_filename: str | None
    path: Path
    length: int
    # Reused for every answer: aiohttp copies the headers it is given into each response.
    plan: ResponsePlan
    # The whole file when it is at most SMALL_BODY bytes (read once, not per request).
    body: bytes | None


def choose_content_type(body: MediaBody, record: MediaRecord | None) -> str:
    """The served type: the homeserver's, or for decrypted media the sender's, normalised.

    The ciphertext's type says nothing about the plaintext, so an encrypted
    attachment gets the ``info.mimetype`` of its event (Client-Server API, "Sending
    encrypted attachments"); anything unusable becomes ``application/octet-stream``.
    """
    if record is not None and record.encryption is not None:
        return normalise_content_type(record.mimetype)
    return normalise_content_type(body.content_type)


def choose_filename(claims: LinkClaims, record: MediaRecord | None, body: MediaBody) -> str | None:
    """The signed filename, else the one in the event, else the homeserver's."""
    if claims.filename is not None:
        return claims.filename
    if record is not None and record.filename is not None:
        return record.filename
    return body.filename


def plan_response(
    method: str,
    request_headers: Mapping[str, str],
    body: MediaBody,
    content_type: str,
    filename: str | None,
    seconds_left: float,
) -> ResponsePlan:
    """Status and headers for a media body (pure; raises MatrixError 416).

    RFC 9110 section 13.2.2 order: If-None-Match (→ 304) before Range. Range is
    honoured only on a complete file (``body.path`` set) and only on GET; If-Range
    must name the current strong ETag (section 13.1.5).
    """
    headers: CIMultiDict[str] = CIMultiDict(security_headers())
    headers["Cache-Control"] = cache_control(seconds_left)
    headers["Accept-Ranges"] = "bytes"
    tag = etag(body.sha256) if body.sha256 else None
    if tag is not None:
        headers["ETag"] = tag
        if none_match(request_headers.get("If-None-Match"), tag):
            return ResponsePlan(304, headers, 0, None, send_body=False)
    headers["Content-Type"] = content_type
    headers["Content-Disposition"] = content_disposition(content_type, filename)
    length = body.length
    byte_range = None
    range_header = request_headers.get("Range")
    if (
        method == "GET"
        and range_header is not None
        and body.path is not None
        and length is not None
        and tag is not None
        and range_applies(request_headers.get("If-Range"), tag)
    ):
        try:
            byte_range = parse_range(range_header, length)
        except RangeNotSatisfiable as e:
            raise MatrixError(
                416,
                Codes.UNKNOWN,
                "Range not satisfiable",
                {"Content-Range": e.content_range, "Accept-Ranges": "bytes"},
            ) from None
    if byte_range is not None and length is not None:
        headers["Content-Range"] = byte_range.content_range(length)
        return ResponsePlan(206, headers, byte_range.length, byte_range, method == "GET")
    return ResponsePlan(200, headers, length, None, method == "GET")


async def _database(query: Awaitable[T]) -> T:
    """Await a database query; a failure is a 503 for the client (and a log line), not a 500."""
    try:
        return await query
    except Exception:
        log.exception("database query failed while serving a link")
        raise MatrixError(
            503, Codes.UNKNOWN, "Temporarily unavailable", {"Retry-After": str(DB_RETRY_AFTER)}
        ) from None


class MediaServer:
    """Handles signed media URLs on the public listener."""

    def __init__(
        self,
        ring: KeyRing,
        records: MediaRecords,
        revocations: RevocationCheck,
        media: MediaSource,
        metrics: Metrics,
        *,
        path_prefix: str,
        renditions: Renditions | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (wall time) judges link expiry; ``monotonic`` times the memories."""
        prefix = unquote(path_prefix).rstrip("/")
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"public.url path must not contain braces: {path_prefix!r}")
        self._ring = ring
        self._records = records
        self._revocations = revocations
        self._media = media
        self._renditions = renditions or Renditions(media, metrics)
        self._metrics = metrics
        self.path_prefix = prefix
        self._clock = clock
        self._tokens: TTLCache[tuple[str, str | None], LinkClaims] = TTLCache(
            math.inf, TOKEN_MEMO_ENTRIES, clock=monotonic
        )
        # One-element tuples, so that a remembered "never seen" (None) is not a miss.
        self._record_memo: TTLCache[MediaId, tuple[MediaRecord | None]] = TTLCache(
            RECORD_TTL, RECORD_MEMO_ENTRIES, clock=monotonic
        )
        self._ready: TTLCache[MediaId, ReadyResponse] = TTLCache(
            READY_TTL, READY_MEMO_ENTRIES, clock=monotonic
        )
        # status → its child of the served counter (labels() costs a lookup per call).
        self._served: dict[int, Counter] = {}
        # Cached-file bodies by how they left: sent by the kernel (sendfile), read whole
        # and written with the headers (small files), or copied through Python in chunks
        # (only on transports without sendfile). For tests and debugging.
        self.files_sent_zero_copy = 0
        self.files_sent_buffered = 0
        self.files_sent_copied = 0

    def forget(self, media: MediaId) -> None:
        """Drop what is remembered of ``media`` (called when it is revoked or purged)."""
        self._ready.discard(media)
        self._record_memo.discard(media)

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

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count answers by status; errors get the security headers and ``no-store``."""
        response = await handler(request)
        if not response.prepared:
            for name, value in security_headers().items():
                response.headers.setdefault(name, value)
            if response.status >= 400:
                # An error may be temporary (or the link revoked): never cache it.
                response.headers["Cache-Control"] = "no-store"
        if request.path != HEALTH_PATH:
            status = response.status
            counter = self._served.get(status)
            if counter is None:
                counter = self._served[status] = self._metrics.served.labels(str(status))
            counter.inc()
        return response

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET``/``HEAD`` of one signed link (see the module docstring for the order)."""
        now = self._clock()
        claims = self._verified(request, now)
        media = claims.media
        # Before anything is fetched, rendered or remembered: a redacted event's media
        # and its thumbnails are never produced nor served again.
        revoked = self._revocations.remembered(media)
        if revoked is None:
            revoked = await _database(self._revocations.is_revoked(media))
        if revoked:
            raise MatrixError(410, Codes.NOT_FOUND, "The media was redacted")
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
        record = await self._record(media)
        wants_range = method == "GET" and "Range" in request_headers
        for _ in range(MAX_OPEN_ATTEMPTS):
            body, content_type, filename = await self._rendition(
                claims, record, need_file=wants_range
            )
            plan = plan_response(
                method, request_headers, body, content_type, filename, claims.expires_at - now
            )
            path, length = body.path, body.length
            if not plan.send_body or path is None or length is None or plan.length is None:
                return await self._send(request, media, plan, stream=body)
            remember = plain and plan.status == 200 and body.sha256 is not None
            if plan.length <= SMALL_BODY:
                start = plan.byte_range.start if plan.byte_range is not None else 0
                data = read_cached(path, length, start, plan.length)
                if data is not None:
                    if remember:
                        self._remember_ready(claims, plan, path, length, data)
                    return self._whole(plan, data)
            else:
                response = await self._send_file_at(request, media, plan, path, length)
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

    async def _record(self, media: MediaId) -> MediaRecord | None:
        """The media record, remembered for RECORD_TTL seconds ("never seen" too)."""
        remembered = self._record_memo.get(media)
        if remembered is not None:
            return remembered[0]
        record = await _database(self._records.media_record(media))
        self._record_memo.put(media, (record,))
        return record

    async def _answer_ready(
        self, request: web.Request, claims: LinkClaims, now: float
    ) -> web.StreamResponse | None:
        """The remembered answer to a plain GET, or None (not remembered, or file gone)."""
        media = claims.media
        ready = self._ready.get(media)
        if ready is None or ready.claimed_filename != claims.filename:
            return None
        freshness = cache_control(claims.expires_at - now)
        if ready.body is not None:
            return self._whole(ready.plan, ready.body, freshness)
        response = await self._send_file_at(
            request, media, ready.plan, ready.path, ready.length, freshness
        )
        if response is None:
            # Evicted or purged since: forget it and take the full path.
            self._ready.discard(media)
        return response

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
        self._ready.put(
            claims.media, ReadyResponse(claims.filename, path, length, ready_plan, body)
        )

    async def _rendition(
        self, claims: LinkClaims, record: MediaRecord | None, *, need_file: bool
    ) -> tuple[MediaBody, str, str | None]:
        """The body to serve, its content type and filename.

        A thumbnail link gets the rendered thumbnail (its own type, the name's extension
        changed to match); an original gets the metadata-stripped rendition when
        ``media.strip_metadata`` covers its type, else the original as before.
        """
        media = claims.media
        encryption = record.encryption if record is not None else None
        try:
            if claims.variant is not None:
                declared = record.mimetype if record is not None else None
                thumb = await self._renditions.thumbnail(
                    media, encryption, claims.variant, declared
                )
                content_type = normalise_content_type(thumb.content_type)
                name = thumbnail_filename(choose_filename(claims, record, thumb), content_type)
                return thumb, content_type, name
            body = await self._open(media, record, need_file=need_file)
            content_type = choose_content_type(body, record)
            body = await self._renditions.original(media, encryption, body, content_type)
        except (ThumbnailError, RenditionFailed) as e:
            raise to_matrix_error(e) from None
        except FetchError as e:
            raise e.to_matrix_error() from None
        except ValueError:
            # A stored key of the wrong shape: nothing a client can fix, and not a crash.
            log.warning("cannot decrypt %s: stored encryption info is unusable", media)
            raise MatrixError(502, Codes.UNKNOWN, "The media could not be decrypted") from None
        return body, content_type, choose_filename(claims, record, body)

    async def _open(
        self, media: MediaId, record: MediaRecord | None, *, need_file: bool
    ) -> MediaBody:
        """The original; with ``need_file`` always a complete cached file (for Range).

        Raises what MediaSource raises; :meth:`_rendition` turns it into the answer.
        """
        encryption = record.encryption if record is not None else None
        body = await self._media.open(media, encryption)
        if need_file and body.path is None:
            body = FileBody(await self._media.open_file(media, encryption))
        return body

    def _whole(
        self, plan: ResponsePlan, data: bytes, cache_control: str | None = None
    ) -> web.Response:
        """A small body in one Response: aiohttp writes the headers and body together."""
        self.files_sent_buffered += 1
        self._metrics.served_bytes.inc(len(data))
        response = web.Response(status=plan.status, headers=plan.headers, body=data)
        if cache_control is not None:
            response.headers["Cache-Control"] = cache_control
        return response

    async def _send_file_at(
        self,
        request: web.Request,
        media: MediaId,
        plan: ResponsePlan,
        path: Path,
        length: int,
        cache_control: str | None = None,
    ) -> web.StreamResponse | None:
        """Send ``plan``'s part of a cached file by sendfile; None if it vanished (nothing sent)."""
        fobj = open_cached(path, length)
        if fobj is None:
            return None
        try:
            return await self._send(request, media, plan, fobj=fobj, cache_control=cache_control)
        finally:
            close_quietly(fobj)

    async def _send(
        self,
        request: web.Request,
        media: MediaId,
        plan: ResponsePlan,
        *,
        stream: MediaBody | None = None,
        fobj: BinaryIO | None = None,
        cache_control: str | None = None,
    ) -> web.StreamResponse:
        """Send headers, then the body from ``fobj`` (sendfile) or ``stream`` (chunks)."""
        response = web.StreamResponse(status=plan.status, headers=plan.headers)
        if cache_control is not None:
            response.headers["Cache-Control"] = cache_control
        if plan.length is not None:
            response.content_length = plan.length
        if not plan.send_body:
            await response.prepare(request)
            await response.write_eof()
            return response
        try:
            if fobj is not None:
                await self._send_file(request, response, plan, fobj)
            elif stream is not None:
                await self._stream(request, response, stream)
        except ConnectionError as e:
            log.debug("client left while %s was being sent: %s", media, e)
            _close_connection(request)
        except (FetchError, OSError) as e:
            # The status line is gone already: end the connection so the client sees
            # a truncated body (short of Content-Length, or no last chunk), never a whole one.
            # (Never log the path: the token in it is a capability.)
            log.warning("sending %s failed mid-body: %s: %s", media, type(e).__name__, e)
            _close_connection(request)
        return response

    async def _send_file(
        self,
        request: web.Request,
        response: web.StreamResponse,
        plan: ResponsePlan,
        fobj: BinaryIO,
    ) -> None:
        start = plan.byte_range.start if plan.byte_range is not None else 0
        count = plan.length or 0
        if await send_file(request, response, fobj, start, count):
            self.files_sent_zero_copy += 1
        else:
            self.files_sent_copied += 1
        self._metrics.served_bytes.inc(count)

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, body: MediaBody
    ) -> None:
        await response.prepare(request)
        async for chunk in body.iter_chunks():
            await response.write(chunk)
            self._metrics.served_bytes.inc(len(chunk))
        await response.write_eof()


def _expired() -> MatrixError:
    return MatrixError(410, Codes.NOT_FOUND, "This link has expired")


def _close_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()

"""The public media server: ``GET`` and ``HEAD`` of signed URLs, nothing else.

One request, in order (cheap and local checks first, so a forged link costs no I/O):

1. verify the token and the filename that came with it (:mod:`relay.signing`):
   tampered, unsigned or an unknown key → 403 ``M_FORBIDDEN``; expired → 410;
2. revoked (the event was redacted) → 410 (:mod:`relay.revocation`);
3. the media record (what the relay saw in the room): the decryption key of an
   encrypted attachment, and the filename/type the sender gave;
4. the body from :class:`~relay.media_source.MediaSource` (cache or one shared download);
   upstream failures keep their meaning (404, or 502/503/504 with ``Retry-After``);
   a thumbnail link, or an original whose metadata must go, gets its rendition from
   :class:`~relay.renditions.Renditions` instead (rendered once, cached; not an image
   → 400, too many pixels → 422);
5. the header policy of :mod:`relay.headers`, then If-None-Match → 304, Range → 206 or
   416 (:mod:`relay.http_ranges`), then the body: a cached file with the kernel's
   ``sendfile`` (:mod:`relay.sendfile`), a download in progress as it arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO, Protocol, TypeVar
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from relay.errors import Codes, Handler, MatrixError
from relay.fetcher import FetchError
from relay.headers import (
    cache_control,
    content_disposition,
    etag,
    normalise_content_type,
    security_headers,
)
from relay.http_ranges import ByteRange, RangeNotSatisfiable, none_match, parse_range, range_applies
from relay.media_source import FileBody, MediaBody, MediaSource
from relay.metrics import Metrics
from relay.mxc import MediaId
from relay.renditions import RenditionFailed, Renditions, thumbnail_filename, to_matrix_error
from relay.revocation import RevocationCheck
from relay.sendfile import close_quietly, open_cached, send_file
from relay.signing import KeyRing, LinkClaims, Verdict, verify
from relay.store import MediaRecord
from relay.thumbnails import ThumbnailError

log = logging.getLogger(__name__)

HEALTH_PATH = "/_relay/health"
# Without the prefix only token-shaped first segments are links ("<version>.<…>"), so
# "/favicon.ico" or "/robots.txt" stay 404 M_UNRECOGNIZED instead of 403.
LINK_SHAPE = r"[0-9]+\.[A-Za-z0-9_.\-]+"
# A cached file can be evicted between lookup and open; look again this many times.
MAX_OPEN_ATTEMPTS = 3
DB_RETRY_AFTER = 5

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
    ) -> None:
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
        # Bodies sent by the kernel (sendfile) and copied through Python: for tests
        # and debugging; the copy path is only taken on transports without sendfile.
        self.files_sent_zero_copy = 0
        self.files_sent_copied = 0

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
            self._metrics.served.labels(str(response.status)).inc()
        return response

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET``/``HEAD`` of one signed link (see the module docstring for the order)."""
        now = self._clock()
        claims = self._verified(request, now)
        media = claims.media
        # Before anything is fetched or rendered: a redacted event's media and its
        # thumbnails are never produced nor served again.
        if await _database(self._revocations.is_revoked(media)):
            raise MatrixError(410, Codes.NOT_FOUND, "The media was redacted")
        record = await _database(self._records.media_record(media))
        method = request.method
        wants_range = method == "GET" and "Range" in request.headers
        for _ in range(MAX_OPEN_ATTEMPTS):
            body, content_type, filename = await self._rendition(
                claims, record, need_file=wants_range
            )
            plan = plan_response(
                method, request.headers, body, content_type, filename, claims.expires_at - now
            )
            if not plan.send_body or body.path is None:
                return await self._send(request, media, plan, body, None)
            fobj = await open_cached(body.path, body.length or 0)
            if fobj is not None:
                try:
                    return await self._send(request, media, plan, body, fobj)
                finally:
                    close_quietly(fobj)
            log.debug("cached file of %s vanished before sending; looking again", media)
        raise MatrixError(
            503, Codes.UNKNOWN, "The media is being replaced; try again", {"Retry-After": "1"}
        )

    def _verified(self, request: web.Request, now: float) -> LinkClaims:
        result = verify(
            self._ring, request.match_info["token"], request.match_info.get("filename"), now
        )
        if result.verdict is Verdict.VALID and result.claims is not None:
            return result.claims
        if result.verdict is Verdict.EXPIRED:
            raise MatrixError(410, Codes.NOT_FOUND, "This link has expired")
        # MALFORMED and FORGED (unknown key, wrong MAC or filename) look the same outside.
        raise MatrixError(403, Codes.FORBIDDEN, "Invalid or unsigned link")

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

    async def _send(
        self,
        request: web.Request,
        media: MediaId,
        plan: ResponsePlan,
        body: MediaBody,
        fobj: BinaryIO | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=plan.status, headers=plan.headers)
        if plan.length is not None:
            response.content_length = plan.length
        if not plan.send_body:
            await response.prepare(request)
            await response.write_eof()
            return response
        try:
            if fobj is not None:
                await self._send_file(request, response, plan, fobj)
            else:
                await self._stream(request, response, body)
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


def _close_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()

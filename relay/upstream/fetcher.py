"""Streaming, authenticated media downloads from the homeserver, as the appservice.

One request in, one bounded stream out: the upstream URL is built only from a
validated :class:`~relay.core.mxc.MediaId` (each path segment quoted), nothing from the
client is forwarded, redirects are followed by hand under the policy of
:mod:`relay.upstream.redirects` (the token never leaves the homeserver's media API),
the body is counted against ``media.max_size`` as it arrives (by
:class:`~relay.upstream.response.UpstreamResponse`), and every upstream failure becomes
one of the exceptions of :mod:`relay.upstream.errors`.

Failures are remembered per media item (404 for ``not_found_ttl``, 401/403/5xx for
``failure_ttl``), so a dead link costs no upstream request per hit; a 429 backs off
every download (the homeserver limits the relay's identity, not one item), for at
most ``MAX_BACKOFF`` seconds. A media answer never decides readiness: one item the
homeserver refuses says nothing about the relay's token
(:mod:`relay.upstream.capabilities` checks that). Thumbnails are rendered by the relay itself
(:mod:`relay.media.renditions`), so only the download endpoint is used.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
from yarl import URL

from relay.core.errors import Codes
from relay.core.mxc import (
    InvalidMxc,
    MediaId,
    canonical_server_name,
    is_valid_media_id,
    is_valid_server_name,
)
from relay.support.memo import TTLCache
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.errors import (
    FetchError,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamTooLarge,
    UpstreamUnauthorized,
)
from relay.upstream.redirects import (
    GuardedResolver,
    Hop,
    RedirectPolicy,
    RedirectRefused,
    check_redirect,
)
from relay.upstream.response import (
    UpstreamResponse,
    errcode_of,
    read_error_body,
    retry_after_seconds,
)

log = logging.getLogger(__name__)

FAILURE_MEMO_SIZE = 10_000
# A homeserver's Retry-After is honoured up to this (seconds): a buggy or hostile
# retry_after_ms of days must not take every link down for days.
MAX_BACKOFF = 300
# Errcodes that speak of the token rather than of one media item (spec "Standard error
# response"): the identity check is asked to run again soon.
TOKEN_ERRCODES = frozenset({Codes.UNKNOWN_TOKEN, Codes.MISSING_TOKEN})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

AUTHENTICATED_PREFIX = "/_matrix/client/v1/media"
LEGACY_PREFIX = "/_matrix/media/v3"


@dataclass(frozen=True)
class Timeouts:
    """Seconds: TCP connect, between two reads, and for a whole download."""

    connect: float = 10
    read: float = 30
    total: float = 600


@dataclass(frozen=True, slots=True)
class _Failure:
    """A remembered upstream answer for one media item; rebuilt as a fresh exception."""

    status: int  # the homeserver's status
    message: str
    until: float

    def error(self, now: float) -> FetchError:
        remaining = max(1, math.ceil(self.until - now))
        if self.status == 404:
            return UpstreamNotFound(self.message)
        if self.status in (401, 403):
            return UpstreamUnauthorized(self.message, retry_after=remaining)
        return UpstreamError(
            self.message, status=504 if self.status == 504 else 502, retry_after=remaining
        )


def _capped(seconds: int) -> int:
    return min(seconds, MAX_BACKOFF)


class MediaFetcher:
    """Opens media on the homeserver with the appservice's token; safe to share."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        homeserver_url: str,
        as_token: str,
        capabilities: Capabilities,
        metrics: Metrics,
        *,
        max_size: int,
        timeouts: Timeouts = Timeouts(),
        not_found_ttl: float = 60.0,
        failure_ttl: float = 10.0,
        max_redirects: int = 3,
        redirect_policy: RedirectPolicy | None = None,
        local_server_name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._base = URL(homeserver_url.rstrip("/"))
        if self._base.scheme not in ("http", "https") or not self._base.host:
            raise ValueError(f"homeserver URL must be http(s)://host: {homeserver_url!r}")
        self._as_token = as_token
        self.capabilities = capabilities
        self._metrics = metrics
        self.max_size = max_size
        self.timeouts = timeouts
        self._client_timeout = aiohttp.ClientTimeout(
            total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.read
        )
        self.not_found_ttl = not_found_ttl
        self.failure_ttl = failure_ttl
        self.max_redirects = max_redirects
        # Default: no host listed, so only same-origin redirects within the media API.
        self.redirect_policy = redirect_policy or RedirectPolicy()
        # Media ids carry canonical (lowercase) server names; the homeserver's own media
        # is asked for under the name as configured, which the homeserver compares
        # exactly ("Example.org" is its own name, "example.org" would be remote to it).
        self._local_names: dict[str, str] = {}
        if local_server_name is not None:
            canonical = canonical_server_name(local_server_name)
            if canonical is not None:
                self._local_names[canonical] = local_server_name
        self._clock = clock
        # Recent failures per media item, so a dead link costs no upstream request per hit.
        self._failures: TTLCache[MediaId, _Failure] = TTLCache(
            max(not_found_ttl, failure_ttl, 0), FAILURE_MEMO_SIZE, clock=clock
        )
        self._backoff_until = 0.0
        # Connections to listed redirect hosts only, through the address check.
        self._redirect_session: aiohttp.ClientSession | None = None

    # -- pure helpers -------------------------------------------------------------------

    def upstream_path(self, media: MediaId, authenticated: bool) -> str:
        """The URL path for a media item; raises InvalidMxc for anything not strictly valid."""
        # MediaId is a plain dataclass: check again so no caller can smuggle "../" in.
        if not is_valid_server_name(media.server_name) or not is_valid_media_id(media.media_id):
            raise InvalidMxc("refusing to build an upstream URL from an invalid media id")
        prefix = AUTHENTICATED_PREFIX if authenticated else LEGACY_PREFIX
        spelling = self._local_names.get(media.server_name, media.server_name)
        server = quote(spelling, safe="")
        media_id = quote(media.media_id, safe="")
        return f"{prefix}/download/{server}/{media_id}"

    def upstream_query(self) -> dict[str, str]:
        """Query parameters: only what the relay decides, never the client's."""
        return {"timeout_ms": str(int(self.timeouts.read * 1000))}

    # -- negative cache and back-off ----------------------------------------------------

    def is_known_missing(self, media: MediaId) -> bool:
        """True while a recent 404 for this media is remembered."""
        failure = self._failures.get(media)
        return failure is not None and failure.status == 404

    def remembered_failure(self, media: MediaId) -> FetchError | None:
        """The remembered failure of this media (404, 401/403, 5xx) as a fresh exception."""
        failure = self._failures.get(media)
        return None if failure is None else failure.error(self._clock())

    def forget_missing(self, media: MediaId) -> None:
        """Drop a remembered failure (the media was revoked or is being looked at afresh)."""
        self._failures.discard(media)

    def _remember(self, media: MediaId, status: int, message: str) -> None:
        ttl = self.not_found_ttl if status == 404 else self.failure_ttl
        if ttl > 0:
            self._failures.put(media, _Failure(status, message, self._clock() + ttl), ttl)

    def backoff_remaining(self) -> float:
        """Seconds left in a 429 back-off window (0 when none)."""
        return max(0.0, self._backoff_until - self._clock())

    # -- the request --------------------------------------------------------------------

    @asynccontextmanager
    async def open(self, media: MediaId) -> AsyncIterator[UpstreamResponse]:
        """Open a media item for streaming.

        Raises the ``Upstream*`` exceptions before yielding; ``iter_chunks`` raises
        UpstreamTooLarge / UpstreamError while streaming. Exactly one
        ``relay_upstream_requests`` sample is counted per request that reached the
        homeserver.
        """
        self.upstream_path(media, True)  # validate before anything else
        remembered = self.remembered_failure(media)
        if remembered is not None:
            self._metrics.negative_cache_hits.inc()
            raise remembered
        remaining = self.backoff_remaining()
        if remaining > 0:
            raise UpstreamRateLimited(
                "homeserver asked us to back off", retry_after=math.ceil(remaining)
            )
        await self.capabilities.ensure_checked(self._session)
        resp = await self._request(media)
        upstream = UpstreamResponse(resp, self.max_size, self._metrics)
        try:
            yield upstream
        finally:
            if upstream.complete:
                resp.release()
            else:
                # Unread body: drop the connection rather than drain it.
                resp.close()
            self._count(upstream.outcome)

    def _count(self, outcome: str) -> None:
        self._metrics.upstream_requests.labels(outcome=outcome).inc()

    async def _request(self, media: MediaId) -> aiohttp.ClientResponse:
        """Send the request (authenticated path first), map every non-200 to an exception."""
        authenticated = self.capabilities.authenticated_media
        query = self.upstream_query()
        resp = await self._get(self._url(media, authenticated, query))
        if resp.status == 200:
            return self._accept(resp)
        status, body = resp.status, await read_error_body(resp)
        if authenticated and status in (404, 405) and errcode_of(body) == Codes.UNRECOGNIZED:
            # Spec "Unsupported endpoints": 404/405 M_UNRECOGNIZED → the server predates v1.11.
            self.capabilities.mark_unsupported()
            resp = await self._get(self._url(media, False, query))
            if resp.status == 200:
                return self._accept(resp)
            status, body = resp.status, await read_error_body(resp)
        raise self._failure(media, status, body, resp.headers.get("Retry-After"))

    def _accept(self, resp: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
        length = resp.content_length
        if length is not None and length > self.max_size:
            resp.close()
            self._count("too_large")
            raise UpstreamTooLarge(f"Content-Length {length} exceeds {self.max_size}")
        return resp

    def _failure(
        self,
        media: MediaId,
        status: int,
        body: object,
        retry_after_header: str | None,
    ) -> Exception:
        """Count and build the exception for a non-200 answer."""
        errcode = errcode_of(body)
        log.info("homeserver answered %d %s for %s", status, errcode or "-", media)
        if status == 404:
            self._count("not_found")
            message = f"{media}: {errcode or 'not found'}"
            self._remember(media, status, message)
            return UpstreamNotFound(message)
        if status == 413:
            self._count("too_large")
            return UpstreamTooLarge(f"homeserver says {media} is too large")
        if status == 429:
            self._count("rate_limited")
            retry_after = _capped(retry_after_seconds(body, retry_after_header))
            self._backoff_until = max(self._backoff_until, self._clock() + retry_after)
            return UpstreamRateLimited("homeserver rate-limited the relay", retry_after=retry_after)
        if status in (401, 403):
            self._count("unauthorized")
            # One item refused (M_FORBIDDEN: quarantined, restricted) is about that item;
            # readiness is the identity check's to decide, asked again on a token errcode.
            if errcode in TOKEN_ERRCODES:
                self.capabilities.request_check()
            message = f"homeserver refused {media} ({status} {errcode or '-'})"
            self._remember(media, status, message)
            return UpstreamUnauthorized(message, retry_after=max(1, math.ceil(self.failure_ttl)))
        self._count("timeout" if status == 504 else "upstream_error")
        retry_after = _capped(retry_after_seconds(None, retry_after_header))
        message = f"homeserver answered {status} {errcode or ''}".strip()
        if status >= 500:
            self._remember(media, status, message)
        return UpstreamError(message, status=504 if status == 504 else 502, retry_after=retry_after)

    def _url(self, media: MediaId, authenticated: bool, query: dict[str, str]) -> URL:
        path = self._base.raw_path.rstrip("/") + self.upstream_path(media, authenticated)
        return self._base.with_path(path, encoded=True).with_query(query)

    async def _get(self, url: URL) -> aiohttp.ClientResponse:
        """GET with redirects followed by hand, under :mod:`relay.upstream.redirects`."""
        left_origin = False
        try:
            for hop in range(self.max_redirects + 1):
                # identity: sizes are counted on what is stored, no decompression bombs.
                headers = {"Accept-Encoding": "identity"}
                session = self._session
                if not left_origin:
                    headers["Authorization"] = f"Bearer {self._as_token}"
                else:
                    session = self._guarded_session()
                resp = await session.get(
                    url, headers=headers, allow_redirects=False, timeout=self._client_timeout
                )
                if resp.status not in REDIRECT_STATUSES:
                    return resp
                location = resp.headers.get("Location")
                resp.release()
                if hop == self.max_redirects:
                    break
                if not location:
                    self._count("upstream_error")
                    raise UpstreamError(f"redirect {resp.status} without Location")
                target = url.join(URL(location))
                try:
                    kind = check_redirect(self._base, url, target, self.redirect_policy)
                except RedirectRefused as e:
                    log.warning("refused a %d redirect from the homeserver: %s", resp.status, e)
                    self._count("upstream_error")
                    raise UpstreamError(f"redirect refused: {e}") from None
                # Once away from the homeserver, the token never goes out again.
                left_origin = left_origin or kind is Hop.ALLOWED_HOST
                log.debug("following %d redirect to %s", resp.status, target.origin())
                url = target
        except TimeoutError as e:
            self._count("timeout")
            raise UpstreamError("homeserver timed out", status=504) from e
        except (aiohttp.ClientError, ValueError) as e:
            # ValueError: an unparsable Location.
            self._count("upstream_error")
            raise UpstreamError(f"homeserver unreachable: {type(e).__name__}") from e
        self._count("upstream_error")
        raise UpstreamError(f"more than {self.max_redirects} redirects")

    def _guarded_session(self) -> aiohttp.ClientSession:
        """The session for listed redirect hosts: its resolver refuses non-public addresses."""
        if self._redirect_session is None or self._redirect_session.closed:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.redirect_policy))
            self._redirect_session = aiohttp.ClientSession(connector=connector)
        return self._redirect_session

    async def close(self) -> None:
        """Close the redirect-host connections (the shared session is the caller's)."""
        session, self._redirect_session = self._redirect_session, None
        if session is not None:
            await session.close()

"""Does the homeserver still serve this media? One small authenticated request.

Revalidation (:mod:`relay.media.revalidation`) asks this before a cached item whose last
check is older than ``media.revalidate_after`` is served again. The request is the
cheapest one measured against Synapse (``bench/revalidation_probe.py``): the
authenticated download ``GET`` with ``Range: bytes=0-0``, its connection dropped once
the headers arrived. Synapse ignores Range and would send the whole file (a 20 MiB file
costs ~29 ms in full, ~1.2 ms this way; ``HEAD`` makes Synapse read the whole file,
~11 ms); a server that honours Range (matrix-media-repo) answers 206 with one byte,
and a small body is read so the connection is kept. Quarantined and admin-deleted media
answer 404 to it, like to every other candidate.

The URL is built by the fetcher's validated ``upstream_path`` and the token goes to
the homeserver's origin only: a redirect is not followed (a homeserver answering with
one still serves the media).
"""

from __future__ import annotations

import logging
import math

import aiohttp
from yarl import URL

from relay.core.mxc import MediaId
from relay.support.metrics import Metrics
from relay.upstream.errors import (
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnauthorized,
)
from relay.upstream.fetcher import MediaFetcher

log = logging.getLogger(__name__)

PROBE_RANGE = "bytes=0-0"
# A body up to this size is read (keeps the connection); a larger one is not.
PROBE_READ_LIMIT = 64 * 1024
PRESENT_STATUSES = frozenset({200, 206, 301, 302, 303, 307, 308})


class MediaProbe:
    """``still_served(media)``: True, False for 404, or an ``Upstream*`` exception."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        homeserver_url: str,
        as_token: str,
        fetcher: MediaFetcher,
        metrics: Metrics,
        *,
        timeout: float,
    ) -> None:
        self._session = session
        self._base = URL(homeserver_url.rstrip("/"))
        self._token = as_token
        self._fetcher = fetcher
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=timeout)

    async def still_served(self, media: MediaId) -> bool:
        """Whether the homeserver still serves ``media`` (see the module docstring).

        Raises UpstreamRateLimited (429, or a back-off under way), UpstreamUnauthorized
        (401/403) and UpstreamError (5xx, timeouts, unreachable): trouble, not an answer.
        """
        fetcher = self._fetcher
        path = fetcher.upstream_path(media, True)  # validates: raises InvalidMxc
        remaining = fetcher.backoff_remaining()
        if remaining > 0:
            raise UpstreamRateLimited(
                "homeserver asked us to back off", retry_after=math.ceil(remaining)
            )
        await fetcher.capabilities.ensure_checked(self._session)
        if not fetcher.capabilities.authenticated_media:
            path = fetcher.upstream_path(media, False)
        url = self._base.with_path(self._base.raw_path.rstrip("/") + path, encoded=True)
        headers = {
            "Authorization": f"Bearer {self._token}",
            "Range": PROBE_RANGE,
            "Accept-Encoding": "identity",
        }
        try:
            resp = await self._session.get(
                url.with_query(fetcher.upstream_query()),
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
            )
        except TimeoutError as e:
            self._count("timeout")
            raise UpstreamError("homeserver timed out", status=504) from e
        except aiohttp.ClientError as e:
            self._count("upstream_error")
            raise UpstreamError(f"homeserver unreachable: {type(e).__name__}") from e
        status = resp.status
        try:
            length = resp.content_length
            if status == 206 or (length is not None and length <= PROBE_READ_LIMIT):
                await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            pass  # the status is the answer; the body does not matter
        finally:
            resp.close()
        return self._judge(media, status)

    def _judge(self, media: MediaId, status: int) -> bool:
        if status in PRESENT_STATUSES:
            self._count("ok")
            return True
        log.info("revalidation: homeserver answered %d for %s", status, media)
        if status == 404:
            self._count("not_found")
            return False
        if status == 429:
            self._count("rate_limited")
            raise UpstreamRateLimited("homeserver rate-limited the relay", retry_after=10)
        if status in (401, 403):
            self._count("unauthorized")
            raise UpstreamUnauthorized(f"homeserver refused our token ({status})")
        self._count("timeout" if status == 504 else "upstream_error")
        raise UpstreamError(f"homeserver answered {status}", status=504 if status == 504 else 502)

    def _count(self, outcome: str) -> None:
        self._metrics.upstream_requests.labels(outcome=outcome).inc()

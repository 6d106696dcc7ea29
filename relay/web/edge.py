"""The public listener's one middleware: errors, headers, counters and the access log.

Every request passes here once, around the handler, in this order:

1. a failure becomes Matrix JSON (:func:`relay.web.middleware.render_error`);
2. an answer not yet sent gets the security headers, and ``no-store`` when it is an
   error (it may be temporary, or the link revoked: never cache it);
3. ``relay_served_requests{status}`` and ``relay_link_requests{kind, entry, status}``
   count it (not the health check);
4. the access line and ``relay_public_request_seconds`` (:mod:`relay.web.access_log`;
   not the health check). A client that left, or a response cut on revocation, has no
   status: "-".

One middleware, not three: each aiohttp middleware layer is a coroutine and a
partial per request, which on a cached small file cost a sixth of the request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import Counter

from relay.http.headers import security_headers
from relay.support.metrics import Metrics
from relay.web.access_log import LINK_KEY, AccessLog
from relay.web.middleware import Handler, render_error
from relay.web.ready import ReadyAnswer

_SECURITY_HEADERS = tuple(security_headers().items())


class PublicEdge:
    """The middleware of the public listener (see the module docstring)."""

    def __init__(
        self, metrics: Metrics, *, skip: str, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        """``skip``: a path neither counted nor logged (the health check)."""
        self._metrics = metrics
        self._skip = skip
        self._monotonic = monotonic
        self.access = AccessLog(metrics)
        # Children of the counters by label values (labels() costs a lookup per call).
        self._served: dict[int, Counter] = {}
        self._by_link: dict[tuple[str, str, int], Counter] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        counted = request.path != self._skip
        started = self._monotonic()
        response: web.StreamResponse | None = None
        try:
            try:
                response = await handler(request)
            except Exception as e:
                response = render_error(request, e)
            status = response.status
            if not response.prepared and type(response) is not ReadyAnswer:
                headers = response.headers
                for name, value in _SECURITY_HEADERS:
                    headers.setdefault(name, value)
                if status >= 400:
                    headers["Cache-Control"] = "no-store"
            if counted:
                self.count(request.get(LINK_KEY), status)
            return response
        finally:
            if counted:
                self.access.record(request, response, self._monotonic() - started)

    def count(self, link: tuple[str, str] | None, status: int) -> None:
        """Count one answer of ``status`` (of a link of ``link``: kind, entry)."""
        counter = self._served.get(status)
        if counter is None:
            counter = self._served[status] = self._metrics.served.labels(str(status))
        counter.inc()
        if link is not None:
            key = (*link, status)
            by_link = self._by_link.get(key)
            if by_link is None:
                by_link = self._by_link[key] = self._metrics.link_requests.labels(
                    link[0], link[1], str(status)
                )
            by_link.inc()

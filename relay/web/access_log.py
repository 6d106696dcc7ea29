"""The public listener's access log: one line per request, never the link itself.

A signed link is a capability, so the line carries what an operator needs and nothing
that would let a reader of the log fetch the media: the method, the link's kind and
entry, the media and variant it named (once verified), the status, the body length,
the duration and the client's address as the reverse proxy gives it. Logged to
``relay.access`` at INFO; with ``logging.format: json`` each field is a JSON key.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Mapping

from aiohttp import web
from prometheus_client import Histogram

from relay.support.metrics import Metrics

log = logging.getLogger("relay.access")

# Set by the handlers once a link verified: (kind, config entry name), (mxc, variant).
LINK_KEY = web.RequestKey("relay.link", tuple[str, str])
MEDIA_KEY = web.RequestKey("relay.media", tuple[str, str])
UNKNOWN = "-"
_ADDRESS_CHARS = re.compile(r"[0-9A-Fa-f:.]{2,45}")


def client_address(request: web.Request) -> str:
    """The client as the reverse proxy in front says (X-Real-IP, else the address it
    appended last to X-Forwarded-For), else the peer; anything not an IP address is "-"
    (a header is the client's to write: it must not forge a log line)."""
    return claimed_address(request.headers, request.remote)


def claimed_address(headers: Mapping[str, str], peer: str | None) -> str:
    """:func:`client_address` from a request's ``headers`` and its ``peer``'s address."""
    claimed = headers.get("X-Real-IP")
    if claimed is None:
        forwarded = headers.get("X-Forwarded-For")
        claimed = forwarded.rsplit(",", 1)[-1] if forwarded is not None else None
    if claimed is None:
        return peer or UNKNOWN  # the peer: the kernel's word, an address already
    claimed = claimed.strip()
    # Only the characters of an address pass the cheap check; the parser confirms it.
    if not _ADDRESS_CHARS.fullmatch(claimed):
        return UNKNOWN
    try:
        return str(ipaddress.ip_address(claimed))
    except ValueError:
        return UNKNOWN


def body_length(request: web.Request, response: web.StreamResponse) -> int | None:
    """The body bytes the response carries (its Content-Length; none for HEAD or 304)."""
    if request.method == "HEAD" or response.status in (204, 304):
        return 0
    if isinstance(response, web.Response) and not response.prepared:
        body = response.body
        return len(body) if isinstance(body, bytes | bytearray) else response.content_length
    return response.content_length


class AccessLog:
    """Writes the access line and times the request (called by :mod:`relay.web.edge`)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # kind → its child of the latency histogram (labels() costs a lookup per call).
        self._latency: dict[str, Histogram] = {}

    def record(
        self, request: web.Request, response: web.StreamResponse | None, seconds: float
    ) -> None:
        """One request done; ``response`` None when the client left before an answer."""
        link = request.get(LINK_KEY, (UNKNOWN, UNKNOWN))
        self._time(link[0], seconds)
        if not log.isEnabledFor(logging.INFO):
            return
        length = body_length(request, response) if response is not None else None
        status = response.status if response is not None else None
        media = request.get(MEDIA_KEY, (UNKNOWN, UNKNOWN))
        self._line(
            request.method, link, media, status, length, seconds, request.headers, request.remote
        )

    def record_answer(
        self,
        method: str,
        link: tuple[str, str],
        media: tuple[str, str],
        status: int,
        length: int,
        seconds: float,
        headers: Mapping[str, str],
        peer: str | None,
    ) -> None:
        """:meth:`record` of an answer written without aiohttp (relay.web.fast_path)."""
        self._time(link[0], seconds)
        if log.isEnabledFor(logging.INFO):
            self._line(method, link, media, status, length, seconds, headers, peer)

    def _time(self, kind: str, seconds: float) -> None:
        latency = self._latency.get(kind)
        if latency is None:
            latency = self._latency[kind] = self._metrics.public_request_seconds.labels(kind)
        latency.observe(seconds)

    def _line(
        self,
        method: str,
        link: tuple[str, str],
        media: tuple[str, str],
        status: int | None,
        length: int | None,
        seconds: float,
        headers: Mapping[str, str],
        peer: str | None,
    ) -> None:
        fields = {
            "method": method,
            "kind": link[0],
            "entry": link[1],
            "media": media[0],
            "variant": media[1],
            "status": status if status is not None else UNKNOWN,
            "bytes": length if length is not None else UNKNOWN,
            "ms": round(seconds * 1000, 2),
            "client": claimed_address(headers, peer),
        }
        log.info(
            "%(method)s %(kind)s/%(entry)s %(media)s %(variant)s %(status)s %(bytes)s B "
            "%(ms)s ms %(client)s",
            fields,
            extra={"access": fields},
        )

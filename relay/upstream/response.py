"""Reading what the homeserver answered: a media body as a bounded stream, or an error.

A 200's body is streamed by :class:`UpstreamResponse`, counted against
``media.max_size`` as it arrives and checked against its Content-Length; any other
answer's (small) JSON body is read only for its ``errcode`` and ``retry_after_ms``.
Which request to send, and what each status means, is :mod:`relay.upstream.fetcher`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator

import aiohttp

from relay.http.headers import filename_from_content_disposition, media_type
from relay.support.metrics import Metrics
from relay.upstream.errors import DEFAULT_RETRY_AFTER, UpstreamError, UpstreamTooLarge

CHUNK_SIZE = 64 * 1024
# Error bodies are read only to learn the errcode; never buffer a large one.
MAX_ERROR_BODY = 64 * 1024


class UpstreamResponse:
    """An open upstream media response; read the body with :meth:`iter_chunks`."""

    def __init__(self, resp: aiohttp.ClientResponse, max_size: int, metrics: Metrics) -> None:
        self._resp = resp
        self._max_size = max_size
        self._metrics = metrics
        self.content_type = media_type(resp.headers.get("Content-Type"))
        self.content_length = resp.content_length
        self.filename = filename_from_content_disposition(resp.headers.get("Content-Disposition"))
        self.received = 0
        self.complete = False
        # The counter label for this request, settled when the body ends or fails.
        self.outcome = "ok"

    async def iter_chunks(self, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        """Yield the body as it arrives; raise UpstreamTooLarge past ``max_size``."""
        try:
            async for chunk in self._resp.content.iter_chunked(chunk_size):
                self.received += len(chunk)
                self._metrics.upstream_bytes.inc(len(chunk))
                if self.received > self._max_size:
                    self.outcome = "too_large"
                    raise UpstreamTooLarge(f"body exceeds {self._max_size} bytes")
                yield chunk
        except TimeoutError as e:
            self.outcome = "timeout"
            raise UpstreamError("homeserver stopped sending", status=504) from e
        except aiohttp.ClientError as e:
            self.outcome = "upstream_error"
            raise UpstreamError(f"download interrupted: {type(e).__name__}") from e
        if self.content_length is not None and self.received != self.content_length:
            self.outcome = "upstream_error"
            raise UpstreamError("body shorter than its Content-Length")
        self.complete = True


async def read_error_body(resp: aiohttp.ClientResponse) -> object:
    """The (small) JSON error body of a failed request, or None; always closes it."""
    try:
        data = bytearray()
        while len(data) < MAX_ERROR_BODY:
            chunk = await resp.content.read(MAX_ERROR_BODY - len(data))
            if not chunk:
                break
            data += chunk
        return json.loads(data) if data else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    finally:
        resp.close()


def errcode_of(body: object) -> str | None:
    """The Matrix ``errcode`` of an error body, if it has one."""
    if isinstance(body, dict) and isinstance(body.get("errcode"), str):
        return str(body["errcode"])
    return None


def retry_after_seconds(body: object, header: str | None) -> int:
    """Back-off from ``retry_after_ms`` (spec "Rate limiting") or a Retry-After header."""
    if isinstance(body, dict):
        ms = body.get("retry_after_ms")
        if isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0:
            return max(1, math.ceil(ms / 1000))
    if header and header.strip().isdigit():
        return max(1, int(header.strip()))
    return DEFAULT_RETRY_AFTER

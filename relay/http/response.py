"""The response plan: status and headers for a media body, decided before a byte is sent.

Pure: it reads the request's conditional and Range headers and what is known of the
body, and returns a :class:`ResponsePlan`; the web layer only carries it out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from multidict import CIMultiDict

from relay.core.errors import Codes, MatrixError
from relay.http.headers import cache_control, content_disposition, etag, security_headers
from relay.http.ranges import ByteRange, RangeNotSatisfiable, none_match, parse_range, range_applies


class Representation(Protocol):
    """What the plan needs to know of a body (the media layer's bodies provide it)."""

    @property
    def length(self) -> int | None: ...  # None: unknown (sent chunked)

    @property
    def sha256(self) -> str | None: ...  # None until the whole body is known

    @property
    def path(self) -> Path | None: ...  # set for a complete file: Range can be honoured


@dataclass(frozen=True, slots=True)
class ResponsePlan:
    """What to answer, decided before any byte is sent."""

    status: int
    headers: CIMultiDict[str]
    # Content-Length (None: unknown, sent chunked); 0 for 304.
    length: int | None
    byte_range: ByteRange | None
    send_body: bool


def plan_response(
    method: str,
    request_headers: Mapping[str, str],
    body: Representation,
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

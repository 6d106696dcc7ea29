"""The response plan: status and headers from the request and what is known of the body."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.core.errors import MatrixError
from relay.http.response import plan_response

DATA = b"0123456789"
SHA = hashlib.sha256(DATA).hexdigest()
TAG = f'"{SHA}"'


@dataclass
class Body:
    content_type: str = "image/png"
    length: int | None = len(DATA)
    sha256: str | None = SHA
    filename: str | None = "upstream.png"
    path: Path | None = Path("/cache/ab/abc")

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield DATA


STREAMING = Body(sha256=None, path=None)


@pytest.mark.parametrize(
    ("method", "headers", "body", "status", "length", "content_range"),
    [
        ("GET", {}, Body(), 200, 10, None),
        ("HEAD", {}, Body(), 200, 10, None),
        ("GET", {"Range": "bytes=2-4"}, Body(), 206, 3, "bytes 2-4/10"),
        ("GET", {"Range": "bytes=-3"}, Body(), 206, 3, "bytes 7-9/10"),
        ("GET", {"Range": "bytes=0-1,5-6"}, Body(), 200, 10, None),
        ("GET", {"Range": "items=0-1"}, Body(), 200, 10, None),
        ("HEAD", {"Range": "bytes=2-4"}, Body(), 200, 10, None),
        ("GET", {"Range": "bytes=2-4", "If-Range": TAG}, Body(), 206, 3, "bytes 2-4/10"),
        ("GET", {"Range": "bytes=2-4", "If-Range": '"old"'}, Body(), 200, 10, None),
        ("GET", {"Range": "bytes=2-4"}, STREAMING, 200, 10, None),
        ("GET", {"If-None-Match": TAG}, Body(), 304, 0, None),
        ("GET", {"If-None-Match": "*"}, Body(), 304, 0, None),
        ("HEAD", {"If-None-Match": f"W/{TAG}"}, Body(), 304, 0, None),
        ("GET", {"If-None-Match": TAG, "Range": "bytes=0-0"}, Body(), 304, 0, None),
        ("GET", {"If-None-Match": '"other"'}, Body(), 200, 10, None),
        ("GET", {"If-None-Match": "*"}, STREAMING, 200, 10, None),
    ],
)
def test_plan_response(
    method: str,
    headers: dict[str, str],
    body: Body,
    status: int,
    length: int,
    content_range: str | None,
) -> None:
    """If-None-Match before Range; Range only on a complete file, GET, and a matching If-Range."""
    plan = plan_response(method, headers, body, "image/png", "cat.png", 60.5)
    assert (plan.status, plan.length) == (status, length)
    assert plan.headers.get("Content-Range") == content_range
    assert plan.send_body == (method == "GET" and status != 304)
    assert plan.headers["Cache-Control"] == "private, max-age=60"
    assert plan.headers["Content-Security-Policy"].startswith("sandbox")
    assert plan.headers.get("ETag") == (TAG if body.sha256 else None)
    if status != 304:
        assert plan.headers["Content-Type"] == "image/png"
        assert plan.headers["Content-Disposition"] == "inline; filename=cat.png"


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=99-100", "bytes=-0"])
def test_unsatisfiable_range_is_416(header: str) -> None:
    """A range that selects no byte is 416 with Content-Range: bytes */size."""
    with pytest.raises(MatrixError) as e:
        plan_response("GET", {"Range": header}, Body(), "image/png", None, 60)
    assert e.value.status == 416
    assert e.value.headers["Content-Range"] == "bytes */10"

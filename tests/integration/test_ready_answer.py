"""relay.web.ready on a real socket: the same bytes aiohttp would send, keep-alive kept.

Two routes answer the same 200: one through aiohttp's ``web.Response``, one as a
:class:`ReadyAnswer`; behind the public listener's middleware (relay.web.edge), a
raw client compares what comes out, on HTTP/1.1 and HTTP/1.0, kept alive or closed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web
from multidict import CIMultiDict

from relay.http.headers import security_headers
from relay.support.metrics import Metrics
from relay.web.edge import PublicEdge
from relay.web.ready import ReadyAnswer, ready_head
from relay.web.sending import Sender
from tests.harness.loopback import start_loopback

BODY = os.urandom(100 * 1024)
CACHE_CONTROL = "private, max-age=60"


def plan_headers() -> CIMultiDict[str]:
    headers = CIMultiDict(security_headers())
    headers["Content-Type"] = "image/png"
    headers["ETag"] = '"' + "ab" * 32 + '"'
    headers["Content-Disposition"] = "inline; filename=\"cat.png\"; filename*=utf-8''cat.png"
    headers["Accept-Ranges"] = "bytes"
    return headers


async def through_aiohttp(request: web.Request) -> web.StreamResponse:
    response = web.Response(status=200, headers=plan_headers(), body=BODY)
    response.headers["Cache-Control"] = CACHE_CONTROL
    return response


SENDER = Sender(Metrics())


async def ready(request: web.Request) -> web.StreamResponse:
    head = ready_head(plan_headers(), BODY)
    assert head is not None
    answer = SENDER.ready(head, CACHE_CONTROL)
    assert isinstance(answer, ReadyAnswer)
    return answer


@pytest_asyncio.fixture
async def port() -> AsyncIterator[int]:
    metrics = Metrics()
    app = web.Application(middlewares=[PublicEdge(metrics, skip="/health").middleware])
    app.router.add_get("/aiohttp", through_aiohttp)
    app.router.add_get("/ready", ready)
    runner, bound = await start_loopback(app)
    yield bound
    await runner.cleanup()


async def read_one(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status, *lines = head[:-4].split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        assert name.lower() not in headers, f"{name!r} twice"
        headers[name.lower()] = value
    body = await reader.readexactly(int(headers[b"content-length"]))
    return status, headers, body


async def exchange(
    port: int, path: str, version: str, extra: str = "", count: int = 1
) -> tuple[list[tuple[bytes, dict[bytes, bytes], bytes]], bool]:
    """``count`` pipelined requests; the answers, and whether the server closed afterwards."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = f"GET {path} HTTP/{version}\r\nHost: relay\r\n{extra}\r\n".encode()
        writer.write(request * count)
        answers = [await read_one(reader) for _ in range(count)]
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.5) == b""
        except TimeoutError:
            closed = False
        return answers, closed
    finally:
        writer.close()


def without_date(headers: dict[bytes, bytes]) -> dict[bytes, bytes]:
    assert headers[b"date"].endswith(b" GMT")
    return {k: v for k, v in headers.items() if k != b"date"}


@pytest.mark.parametrize(
    ("version", "extra", "closes"),
    [
        ("1.1", "", False),
        ("1.1", "Connection: close\r\n", True),
        ("1.0", "", True),
        ("1.0", "Connection: keep-alive\r\n", False),
    ],
)
async def test_the_ready_answer_is_what_aiohttp_sends(
    port: int, version: str, extra: str, closes: bool
) -> None:
    """Status line, every header (Date aside), body and connection handling are aiohttp's."""
    (expected,), expected_closed = await exchange(port, "/aiohttp", version, extra)
    (got,), closed = await exchange(port, "/ready", version, extra)
    assert got[0] == expected[0] == f"HTTP/{version} 200 OK".encode()
    assert without_date(got[1]) == without_date(expected[1])
    assert got[2] == expected[2] == BODY
    assert closed == expected_closed == closes


async def test_pipelined_ready_answers_arrive_in_order_whole(port: int) -> None:
    """Three pipelined GETs on one kept-alive connection: three whole answers, still open."""
    answers, closed = await exchange(port, "/ready", "1.1", count=3)
    assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 3
    assert all(a[2] == BODY for a in answers)
    assert not closed

"""Signed-link paths are capabilities: they never reach the logs (issue 13, finding 10).

Every way a public request can fail while a valid link is in its path is provoked on
the real listener with every logger at DEBUG: an unhandled error (500), a client that
leaves mid-body, a malformed request line, a request head too long, a revoked-looking
forgery, an expired link. The token must appear in no record, traceback included.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from relay.app import Relay
from relay.web.middleware import error_middleware
from tests.harness.links import errcode, fetch, post_media, sign
from tests.harness.loopback import start_loopback
from tests.harness.matrix_client import MatrixUser
from tests.harness.relay import StartRelay

pytestmark = pytest.mark.synapse


def token_of(url: str) -> str:
    """The capability part of a native link: ``/media/<token>/<filename>``."""
    return urlsplit(url).path.split("/")[2]


def assert_not_logged(caplog: pytest.LogCaptureFixture, secret: str) -> None:
    # caplog.text is every record formatted, with its traceback.
    assert caplog.records, "the failures should have been logged (else this proves nothing)"
    assert secret not in caplog.text
    for record in caplog.records:
        assert secret not in record.getMessage(), record


async def raw_exchange(relay: Relay, request: bytes) -> bytes:
    parts = urlsplit(relay.public_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


async def test_failing_public_requests_never_log_the_link(
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """500s, aborted downloads, malformed and oversized heads: the token is in no log line."""
    relay = await start_relay()
    data = os.urandom(3 * 1024 * 1024)
    _, mxc, _ = await post_media(relay, alice, data, "application/octet-stream", "f.bin")
    link = await sign(http_session, relay, mxc)
    path = urlsplit(link["url"]).path
    token = token_of(link["url"])
    caplog.set_level(logging.DEBUG)

    # An unhandled error while serving: the cache's temporary directory is a file now,
    # so the download cannot start (the error middleware logs it at ERROR).
    tmp = Path(relay.config.media.cache_dir) / "tmp"
    shutil.rmtree(tmp)
    tmp.write_bytes(b"")
    status, _, body = await fetch(http_session, link["url"])
    assert status >= 500, body
    assert any(r.levelno >= logging.ERROR for r in caplog.records)
    tmp.unlink()
    tmp.mkdir()

    # A client that leaves after the first bytes.
    async with http_session.get(link["url"]) as resp:
        assert resp.status == 200
        await resp.content.readexactly(1024)
        resp.close()
    await asyncio.sleep(0.2)

    # Malformed request lines and a head too long, each quoting the link.
    for request in (
        f"GET {path} HTTP/1.1 junk\r\nHost: x\r\n\r\n".encode(),
        f"GET {path} HTTP/9.x\r\nHost: x\r\n\r\n".encode(),
        f"GET {path}?{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"GET {path} HTTP/1.1\r\nHost: x\r\nBad Header: {token}\r\n\r\n".encode(),
    ):
        answer = await raw_exchange(relay, request)
        # (aiohttp's 400 quotes the line back to the client that sent it: no leak.)
        assert answer.split(b" ", 2)[1].startswith(b"4"), answer[:80]

    # Refused links: a tampered token and an expired one.
    status, _, body = await fetch(http_session, link["url"].replace(token, token[:-2] + "AA"))
    assert status == 403 and errcode(body) == "M_FORBIDDEN"
    short = await sign(http_session, relay, mxc, ttl=1)
    await asyncio.sleep(max(0.0, short["expires_at"] / 1000 - time.time()) + 0.2)
    status, _, body = await fetch(http_session, short["url"])
    assert status == 410
    assert_not_logged(caplog, token)
    assert_not_logged(caplog, token_of(short["url"]))


async def test_error_middleware_logs_the_route_not_the_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unhandled error is logged with the route's pattern; the path's values stay out."""

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("boom")

    app = web.Application(middlewares=[error_middleware])
    app.add_routes([web.get("/media/{token}/{filename}", broken)])
    runner, port = await start_loopback(app)
    caplog.set_level(logging.DEBUG)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/media/1.SECRETCAPABILITY/x.png") as resp,
        ):
            assert resp.status == 500
            assert (await resp.json())["errcode"] == "M_UNKNOWN"
    finally:
        await runner.cleanup()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "/media/{token}/{filename}" in errors[0].getMessage()
    assert "SECRETCAPABILITY" not in caplog.text

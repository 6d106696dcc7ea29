"""Fetcher, cache and single-flight against a stub homeserver.

The stub shows what a real Synapse cannot be made to do on demand: a server without
v1.11, redirects to another origin, a connection dropped mid-body, 429s, slow bodies.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from relay.core.mxc import InvalidMxc, MediaId
from relay.http.headers import filename_from_content_disposition
from relay.media.attachments import CiphertextHashMismatch
from relay.media.cache import MediaCache
from relay.media.cache_layout import CacheKey
from relay.media.downloads import MediaBody, MediaSource
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.errors import (
    OUTCOMES,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamTooLarge,
    UpstreamUnauthorized,
)
from relay.upstream.fetcher import MAX_BACKOFF, MediaFetcher, Timeouts
from relay.upstream.redirects import RedirectPolicy
from tests.harness.cache import put_bytes
from tests.harness.encryption import EncryptedAttachment, encrypt_attachment
from tests.harness.stub_homeserver import (
    AS_TOKEN,
    SERVER,
    FakeClock,
    StubServer,
    error_response,
    serve_bytes,
)
from tests.harness.waiting import eventually

MAX_SIZE = 1 << 20


@dataclass
class RelayParts:
    fetcher: MediaFetcher
    cache: MediaCache
    source: MediaSource
    metrics: Metrics
    capabilities: Capabilities
    clock: FakeClock


@pytest_asyncio.fixture
async def other_origin() -> AsyncIterator[StubServer]:
    """A second server on another port: a different origin (RFC 6454)."""
    server = StubServer()
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


MakeParts = Callable[..., Awaitable[RelayParts]]


@pytest_asyncio.fixture
async def make_parts(
    stub: StubServer, session: aiohttp.ClientSession, tmp_path: Path
) -> AsyncIterator[MakeParts]:
    """Factory for fetcher + cache + source over the stub (closed after the test)."""
    sources: list[MediaSource] = []

    async def factory(
        *,
        max_size: int = MAX_SIZE,
        timeouts: Timeouts | None = None,
        cache_max: int = 1 << 24,
        redirect_hosts: tuple[str, ...] = (),
    ) -> RelayParts:
        metrics = Metrics()
        clock = FakeClock()
        caps = Capabilities(stub.url, AS_TOKEN, clock=clock)
        fetcher = MediaFetcher(
            session,
            stub.url,
            AS_TOKEN,
            caps,
            metrics,
            max_size=max_size,
            timeouts=timeouts or Timeouts(connect=5, read=5, total=30),
            not_found_ttl=60,
            failure_ttl=10,
            redirect_policy=RedirectPolicy.from_entries(redirect_hosts),
            clock=clock,
        )
        cache = MediaCache(tmp_path / "cache", cache_max, metrics)
        await cache.start()
        source = MediaSource(fetcher, cache, metrics)
        sources.append(source)
        return RelayParts(fetcher, cache, source, metrics, caps, clock)

    yield factory
    for source in sources:
        await source.close()


async def _read(body: MediaBody) -> bytes:
    if body.path is not None:
        return body.path.read_bytes()
    return b"".join([chunk async for chunk in body.iter_chunks()])


def _cache_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())


def _requests(metrics: Metrics) -> dict[str, float]:
    counts = {o: metrics.value("relay_upstream_requests", {"outcome": o}) for o in OUTCOMES}
    return {o: c for o, c in counts.items() if c}


# -- pure helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media", "authenticated", "expected"),
    [
        (MediaId("example.org", "abc"), True, "/_matrix/client/v1/media/download/example.org/abc"),
        (MediaId("example.org", "abc"), False, "/_matrix/media/v3/download/example.org/abc"),
        (
            MediaId("example.org:8448", "a_b-c"),
            True,
            "/_matrix/client/v1/media/download/example.org%3A8448/a_b-c",
        ),
        (
            MediaId("[::1]:8448", "abc"),
            False,
            "/_matrix/media/v3/download/%5B%3A%3A1%5D%3A8448/abc",
        ),
    ],
)
async def test_upstream_path(
    session: aiohttp.ClientSession,
    media: MediaId,
    authenticated: bool,
    expected: str,
) -> None:
    """Paths are built from the validated server name and media id, each segment quoted."""
    fetcher = MediaFetcher(
        session,
        "http://hs.invalid",
        AS_TOKEN,
        Capabilities("http://hs.invalid", AS_TOKEN),
        Metrics(),
        max_size=1,
    )
    assert fetcher.upstream_path(media, authenticated) == expected


async def test_local_media_asked_for_under_the_configured_spelling(
    session: aiohttp.ClientSession,
) -> None:
    """Canonical mxc names are lowercase; the homeserver's own media keeps its spelling."""
    caps = Capabilities("http://hs.invalid", AS_TOKEN)
    fetcher = MediaFetcher(
        session,
        "http://hs.invalid",
        AS_TOKEN,
        caps,
        Metrics(),
        max_size=1,
        local_server_name="Example.ORG",
    )
    assert fetcher.upstream_path(MediaId("example.org", "abc"), True) == (
        "/_matrix/client/v1/media/download/Example.ORG/abc"
    )
    assert fetcher.upstream_path(MediaId("other.org", "abc"), True) == (
        "/_matrix/client/v1/media/download/other.org/abc"
    )


@pytest.mark.parametrize(
    "media",
    [
        MediaId("example.org", "../../v3/joined_rooms"),
        MediaId("example.org/../..", "abc"),
        MediaId("example.org", "abc/../../x"),
        MediaId("example.org", "abc?access_token=x"),
        MediaId("example.org", "abc%2F.."),
        MediaId("example.org", ".."),
        MediaId("..", "abc"),
        MediaId("", "abc"),
        MediaId("example.org", ""),
        MediaId("example.org#x", "abc"),
    ],
)
async def test_hostile_media_ids_never_reach_the_homeserver(
    make_parts: MakeParts, stub: StubServer, media: MediaId
) -> None:
    """A MediaId that is not strictly valid raises before any request is sent."""
    parts = await make_parts()
    with pytest.raises(InvalidMxc):
        parts.fetcher.upstream_path(media, True)
    with pytest.raises(InvalidMxc):
        await parts.source.open(media)
    assert stub.seen == []
    assert _requests(parts.metrics) == {}
    assert parts.metrics.value("relay_cache_misses") == 0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("inline", None),
        ('attachment; filename="cat.png"', "cat.png"),
        ("attachment; filename=cat.png", "cat.png"),
        ("inline; filename*=UTF-8''%E2%82%AC%20rates.txt", "€ rates.txt"),
        ("attachment; filename=\"fallback.txt\"; filename*=utf-8''real.txt", "real.txt"),
        ('attachment; filename="../../etc/passwd"', "passwd"),
        ('attachment; filename="..\\\\windows\\\\system.ini"', "system.ini"),
        ('attachment; filename="a;b.txt"', "a;b.txt"),
        ('attachment; filename="with\\"quote.txt"', 'with"quote.txt'),
        ('attachment; filename="evil\r\nX-Header: 1.txt"', "evilX-Header: 1.txt"),
        ('attachment; filename=".."', None),
        ('attachment; filename=""', None),
        ("attachment; filename*=bogus-charset''abc", None),
        ("attachment; filename*=UTF-8''%FF%FE", None),
        ("attachment; filename=" + "a" * 300, "a" * 255),
    ],
)
def test_filename_from_content_disposition(header: str | None, expected: str | None) -> None:
    """Upstream file names are parsed (RFC 6266) and stripped of paths and control chars."""
    assert filename_from_content_disposition(header) == expected


# -- fetching --------------------------------------------------------------------------


async def test_authenticated_fetch_sends_token_and_only_timeout(
    make_parts: MakeParts, stub: StubServer, tmp_path: Path
) -> None:
    """v1.11 server: /client/v1/media path, Bearer as_token, timeout_ms the only query."""
    data = b"\x89PNG stub image bytes"
    disposition = {"Content-Disposition": "inline; filename=a.png"}
    stub.media["abc"] = serve_bytes(data, "image/png", **disposition)
    parts = await make_parts(timeouts=Timeouts(connect=5, read=7, total=30))
    body = await parts.source.open(MediaId(SERVER, "abc"))
    assert (body.content_type, body.length, body.filename) == ("image/png", len(data), "a.png")
    assert await _read(body) == data
    (req,) = stub.media_requests()
    assert req.raw_path == "/_matrix/client/v1/media/download/example.org/abc?timeout_ms=7000"
    assert req.query == {"timeout_ms": "7000"}
    assert req.headers["Authorization"] == f"Bearer {AS_TOKEN}"
    assert req.headers["Accept-Encoding"] == "identity"
    assert _requests(parts.metrics) == {"ok": 1}
    assert parts.metrics.value("relay_upstream_bytes") == len(data)
    assert parts.capabilities.max_upload_size == 1234


async def test_cached_after_first_fetch(make_parts: MakeParts, stub: StubServer) -> None:
    """The second request is a cache hit with the same bytes and no upstream request."""
    data = b"cache me" * 1000
    stub.media["abc"] = serve_bytes(data)
    parts = await make_parts()
    assert await _read(await parts.source.open(MediaId(SERVER, "abc"))) == data
    second = await parts.source.open(MediaId(SERVER, "abc"))
    assert second.path is not None
    assert second.sha256 == hashlib.sha256(data).hexdigest()
    assert await _read(second) == data
    assert len(stub.media_requests()) == 1
    assert parts.metrics.value("relay_cache_hits") == 1
    assert parts.metrics.value("relay_cache_misses") == 1


async def test_download_query_is_built_by_the_relay(
    make_parts: MakeParts, stub: StubServer
) -> None:
    """A download carries only the relay's timeout_ms; thumbnails are never asked upstream."""
    stub.media["abc"] = serve_bytes(b"bytes", "image/jpeg")
    parts = await make_parts()
    entry = await parts.source.open_file(MediaId(SERVER, "abc"))
    assert entry.path.read_bytes() == b"bytes"
    (req,) = stub.media_requests()
    assert req.raw_path.startswith("/_matrix/client/v1/media/download/example.org/abc?")
    assert req.query == {"timeout_ms": "5000"}


async def test_server_without_v1_11_uses_legacy_paths(
    make_parts: MakeParts, stub: StubServer
) -> None:
    """A server listing only old versions is fetched on /media/v3, still with the token."""
    stub.versions = {"versions": ["r0.6.1", "v1.1", "v1.10"]}
    stub.media["abc"] = serve_bytes(b"legacy bytes")
    parts = await make_parts()
    assert await _read(await parts.source.open(MediaId(SERVER, "abc"))) == b"legacy bytes"
    assert parts.capabilities.authenticated_media is False
    (req,) = stub.media_requests()
    assert req.raw_path.startswith("/_matrix/media/v3/download/example.org/abc?")
    assert req.headers["Authorization"] == f"Bearer {AS_TOKEN}"


async def test_unrecognized_authenticated_path_falls_back(
    make_parts: MakeParts, stub: StubServer
) -> None:
    """404 M_UNRECOGNIZED on /client/v1/media → legacy path, and legacy until next refresh."""

    async def unrecognized(request: web.Request) -> web.StreamResponse:
        return error_response(404, "M_UNRECOGNIZED")

    stub.media["abc"] = unrecognized
    stub.legacy_media = {"abc": serve_bytes(b"from legacy")}
    parts = await make_parts()
    assert await _read(await parts.source.open(MediaId(SERVER, "abc"))) == b"from legacy"
    assert parts.capabilities.authenticated_media is False
    paths = [r.raw_path.split("?")[0] for r in stub.media_requests()]
    assert paths == [
        "/_matrix/client/v1/media/download/example.org/abc",
        "/_matrix/media/v3/download/example.org/abc",
    ]
    assert _requests(parts.metrics) == {"ok": 1}


async def test_redirect_to_other_origin_gets_no_token(
    make_parts: MakeParts, stub: StubServer, other_origin: StubServer
) -> None:
    """A 307 to a listed host is followed without the Authorization header."""
    other_origin.media["blob"] = serve_bytes(b"from the CDN")

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(f"{other_origin.url}/cdn/blob")

    stub.media["abc"] = redirect
    # The stub's other origin is 127.0.0.1: an IP literal listed is allowed, loopback too.
    parts = await make_parts(redirect_hosts=("127.0.0.1",))
    assert await _read(await parts.source.open(MediaId(SERVER, "abc"))) == b"from the CDN"
    (first,) = stub.media_requests()
    assert first.headers["Authorization"] == f"Bearer {AS_TOKEN}"
    (followed,) = other_origin.seen
    assert followed.raw_path == "/cdn/blob"
    assert "Authorization" not in followed.headers
    assert _requests(parts.metrics) == {"ok": 1}


def _redirect_to(location: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": location})

    return redirect


async def test_redirect_off_origin_refused_by_default(
    make_parts: MakeParts, stub: StubServer, other_origin: StubServer, tmp_path: Path
) -> None:
    """Without homeserver.redirect_hosts, a redirect to another origin is never followed."""
    other_origin.media["blob"] = serve_bytes(b"internal service")
    stub.media["abc"] = _redirect_to(f"{other_origin.url}/cdn/blob")
    parts = await make_parts()
    with pytest.raises(UpstreamError) as info:
        await parts.source.open(MediaId(SERVER, "abc"))
    assert info.value.status == 502
    assert other_origin.seen == []
    assert _requests(parts.metrics) == {"upstream_error": 1}
    assert _cache_files(tmp_path) == []


@pytest.mark.parametrize(
    ("hosts", "followed"),
    [
        (("localhost",), False),  # listed, but it resolves to loopback only
        (("localhost", "127.0.0.0/8"), True),  # the loopback network is listed too
        (("example.net", "127.0.0.0/8"), False),  # the name is not listed
    ],
)
async def test_redirect_host_checked_by_address(
    make_parts: MakeParts,
    stub: StubServer,
    other_origin: StubServer,
    hosts: tuple[str, ...],
    followed: bool,
) -> None:
    """A listed name is connected to only at addresses that are public or listed."""
    other_origin.media["blob"] = serve_bytes(b"from storage")
    stub.media["abc"] = _redirect_to(f"http://localhost:{other_origin.port}/cdn/blob")
    parts = await make_parts(redirect_hosts=hosts)
    if followed:
        assert await _read(await parts.source.open(MediaId(SERVER, "abc"))) == b"from storage"
        (seen,) = other_origin.seen
        assert "Authorization" not in seen.headers
    else:
        with pytest.raises(UpstreamError):
            await parts.source.open(MediaId(SERVER, "abc"))
        assert other_origin.seen == []


@pytest.mark.parametrize(
    "location",
    [
        "/_synapse/admin/v1/users/@bot:example.org/admin",
        "/_matrix/client/v3/joined_rooms",
        "/_matrix/client/v1/media/../../v3/joined_rooms",
        "/_matrix/client/v1/media/%2e%2e/%2E%2E/v3/joined_rooms",
        "/_matrix/media/v3/download/example.org%2F..%2F..%2Fx/abc",
        "/_matrix/client/v1/mediaevil",
    ],
)
async def test_same_origin_redirect_out_of_media_api_refused(
    make_parts: MakeParts, stub: StubServer, location: str
) -> None:
    """A same-origin redirect outside the media API is refused; the token never goes there."""
    stub.media["abc"] = _redirect_to(location)
    parts = await make_parts()
    with pytest.raises(UpstreamError) as info:
        await parts.source.open(MediaId(SERVER, "abc"))
    assert info.value.status == 502
    (only,) = [
        s
        for s in stub.seen
        if s.raw_path != "/_matrix/client/versions" and "/media/config" not in s.raw_path
    ]
    assert only.raw_path.startswith("/_matrix/client/v1/media/download/example.org/abc")


async def test_token_not_sent_after_leaving_origin(
    make_parts: MakeParts, stub: StubServer, other_origin: StubServer
) -> None:
    """A listed host redirecting back into the media API gets no token sent there."""
    other_origin.media["blob"] = _redirect_to(
        f"{stub.url}/_matrix/client/v1/media/download/example.org/moved"
    )
    stub.media["abc"] = _redirect_to(f"{other_origin.url}/cdn/blob")
    stub.media["moved"] = serve_bytes(b"moved")
    parts = await make_parts(redirect_hosts=("127.0.0.1",))
    assert await _read(await parts.source.open(MediaId(SERVER, "abc"))) == b"moved"
    first, back = stub.media_requests()
    assert first.headers["Authorization"] == f"Bearer {AS_TOKEN}"
    assert "Authorization" not in back.headers


async def test_redirect_within_origin_keeps_token(make_parts: MakeParts, stub: StubServer) -> None:
    """A 308 to the homeserver's own origin still carries the token."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect("/_matrix/client/v1/media/download/example.org/moved")

    stub.media["abc"] = redirect
    stub.media["moved"] = serve_bytes(b"moved")
    parts = await make_parts()
    assert await _read(await parts.source.open(MediaId(SERVER, "abc"))) == b"moved"
    assert [r.headers.get("Authorization") for r in stub.media_requests()] == [
        f"Bearer {AS_TOKEN}",
        f"Bearer {AS_TOKEN}",
    ]


async def test_redirect_loop_is_bounded(
    make_parts: MakeParts, stub: StubServer, tmp_path: Path
) -> None:
    """More than max_redirects hops is an upstream error, and nothing is cached."""

    async def loop(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(request.path)

    stub.media["abc"] = loop
    parts = await make_parts()
    with pytest.raises(UpstreamError) as info:
        await parts.source.open(MediaId(SERVER, "abc"))
    assert info.value.status == 502
    assert len(stub.media_requests()) == 1 + parts.fetcher.max_redirects
    assert _requests(parts.metrics) == {"upstream_error": 1}
    assert _cache_files(tmp_path) == []


async def test_redirect_to_non_http_scheme_is_refused(
    make_parts: MakeParts, stub: StubServer
) -> None:
    """A Location with a non-HTTP scheme is never followed."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": "file:///etc/passwd"})

    stub.media["abc"] = redirect
    parts = await make_parts()
    with pytest.raises(UpstreamError) as info:
        await parts.source.open(MediaId(SERVER, "abc"))
    assert info.value.status == 502
    assert len(stub.media_requests()) == 1


async def test_dropped_connection_leaves_no_partial_entry(
    make_parts: MakeParts, stub: StubServer, tmp_path: Path
) -> None:
    """The connection dropping mid-body fails the stream and caches nothing."""

    async def drop(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        resp.content_length = 200_000
        await resp.prepare(request)
        await resp.write(b"x" * 100_000)
        assert request.transport is not None
        request.transport.close()
        return resp

    stub.media["abc"] = drop
    parts = await make_parts()
    with pytest.raises(UpstreamError) as info:
        # Fails in open() (which waits for the first bytes, to sniff them) or mid-body.
        await _read(await parts.source.open(MediaId(SERVER, "abc")))
    assert info.value.status == 502
    assert _requests(parts.metrics) == {"upstream_error": 1}
    assert _cache_files(tmp_path) == []
    assert len(parts.cache) == 0
    # The next request downloads again instead of serving a partial entry.
    stub.media["abc"] = serve_bytes(b"whole")
    assert await _read(await parts.source.open(MediaId(SERVER, "abc"))) == b"whole"


async def test_rate_limited_backs_off(make_parts: MakeParts, stub: StubServer) -> None:
    """429 retry_after_ms → UpstreamRateLimited; no upstream request until it has passed."""

    async def limited(request: web.Request) -> web.StreamResponse:
        return error_response(429, "M_LIMIT_EXCEEDED", retry_after_ms=2500)

    stub.media["abc"] = limited
    parts = await make_parts()
    with pytest.raises(UpstreamRateLimited) as info:
        await parts.source.open(MediaId(SERVER, "abc"))
    assert (info.value.status, info.value.retry_after) == (503, 3)
    err = info.value.to_matrix_error()
    assert (err.status, err.errcode, err.headers["Retry-After"]) == (503, "M_LIMIT_EXCEEDED", "3")
    # Inside the window: fail fast, the homeserver is not contacted.
    parts.clock.now += 1
    with pytest.raises(UpstreamRateLimited) as again:
        await parts.source.open(MediaId(SERVER, "other"))
    assert again.value.retry_after == 2
    assert len(stub.media_requests()) == 1
    # After the window the homeserver is asked again.
    parts.clock.now += 2
    stub.media["abc"] = serve_bytes(b"ok now")
    assert await _read(await parts.source.open(MediaId(SERVER, "abc"))) == b"ok now"
    assert _requests(parts.metrics) == {"rate_limited": 1, "ok": 1}


async def test_rate_limited_retry_after_header(make_parts: MakeParts, stub: StubServer) -> None:
    """Without retry_after_ms the Retry-After header gives the back-off."""

    async def limited(request: web.Request) -> web.StreamResponse:
        return web.Response(status=429, text="slow down", headers={"Retry-After": "7"})

    stub.media["abc"] = limited
    parts = await make_parts()
    with pytest.raises(UpstreamRateLimited) as info:
        await parts.source.open(MediaId(SERVER, "abc"))
    assert info.value.retry_after == 7


async def test_not_found_is_remembered(make_parts: MakeParts, stub: StubServer) -> None:
    """404 → UpstreamNotFound; repeats come from the negative cache until the TTL passes."""
    parts = await make_parts()
    media = MediaId(SERVER, "missing")
    for _ in range(5):
        with pytest.raises(UpstreamNotFound):
            await parts.source.open(media)
    assert len(stub.media_requests()) == 1
    assert parts.metrics.value("relay_negative_cache_hits") == 4
    assert _requests(parts.metrics) == {"not_found": 1}
    err = UpstreamNotFound("x").to_matrix_error()
    assert (err.status, err.errcode) == (404, "M_NOT_FOUND")
    parts.clock.now += 61
    with pytest.raises(UpstreamNotFound):
        await parts.source.open(media)
    assert len(stub.media_requests()) == 2


@pytest.mark.parametrize(
    ("status", "errcode", "exception"),
    [
        (403, "M_FORBIDDEN", UpstreamUnauthorized),
        (401, "M_UNKNOWN_TOKEN", UpstreamUnauthorized),
        (500, "M_UNKNOWN", UpstreamError),
        (502, "M_UNKNOWN", UpstreamError),
    ],
)
async def test_media_failure_is_per_media_and_remembered(
    make_parts: MakeParts,
    stub: StubServer,
    status: int,
    errcode: str,
    exception: type[UpstreamError],
) -> None:
    """One item's 401/403/5xx leaves readiness alone and is remembered for failure_ttl."""

    async def refused(request: web.Request) -> web.StreamResponse:
        return error_response(status, errcode)

    stub.media["abc"] = refused
    stub.media["fine"] = serve_bytes(b"fine")
    parts = await make_parts()
    media = MediaId(SERVER, "abc")
    for _ in range(5):
        with pytest.raises(exception) as info:
            await parts.source.open(media)
        assert info.value.status == 502
        assert int(info.value.to_matrix_error().headers["Retry-After"]) >= 1
    assert len(stub.media_requests()) == 1
    assert parts.metrics.value("relay_negative_cache_hits") == 4
    # The identity check (media config with the token) answered fine: still ready.
    assert parts.capabilities.identity_ok is True
    assert await _read(await parts.source.open(MediaId(SERVER, "fine"))) == b"fine"
    parts.clock.now += 11
    with pytest.raises(exception):
        await parts.source.open(media)
    assert len(stub.media_requests()) == 3


async def test_rate_limit_back_off_is_capped(make_parts: MakeParts, stub: StubServer) -> None:
    """A retry_after_ms of days backs off every download for MAX_BACKOFF seconds at most."""

    async def limited(request: web.Request) -> web.StreamResponse:
        return error_response(429, "M_LIMIT_EXCEEDED", retry_after_ms=7 * 86400 * 1000)

    stub.media["abc"] = limited
    parts = await make_parts()
    with pytest.raises(UpstreamRateLimited) as info:
        await parts.source.open(MediaId(SERVER, "abc"))
    assert info.value.retry_after == MAX_BACKOFF == 300
    assert parts.fetcher.backoff_remaining() == MAX_BACKOFF
    parts.clock.now += MAX_BACKOFF
    stub.media["abc"] = serve_bytes(b"ok now")
    assert await _read(await parts.source.open(MediaId(SERVER, "abc"))) == b"ok now"


@pytest.mark.parametrize(
    ("status", "errcode", "expected_status", "outcome"),
    [
        (502, "M_UNKNOWN", 502, "upstream_error"),
        (500, "M_UNKNOWN", 502, "upstream_error"),
        (504, "M_NOT_YET_UPLOADED", 504, "timeout"),
        (400, "M_UNKNOWN", 502, "upstream_error"),
    ],
)
async def test_upstream_failures_keep_their_meaning(
    make_parts: MakeParts,
    stub: StubServer,
    tmp_path: Path,
    status: int,
    errcode: str,
    expected_status: int,
    outcome: str,
) -> None:
    """Homeserver failures become UpstreamError 502/504 with Retry-After, nothing cached."""

    async def failing(request: web.Request) -> web.StreamResponse:
        return error_response(status, errcode)

    stub.media["abc"] = failing
    parts = await make_parts()
    with pytest.raises(UpstreamError) as info:
        await parts.source.open(MediaId(SERVER, "abc"))
    assert info.value.status == expected_status
    err = info.value.to_matrix_error()
    assert err.status == expected_status
    assert int(err.headers["Retry-After"]) >= 1
    assert _requests(parts.metrics) == {outcome: 1}
    assert _cache_files(tmp_path) == []


async def test_unreachable_homeserver_is_upstream_error(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A refused connection is a 502 UpstreamError, not a crash."""
    from relay.devtools.local_synapse import free_ports

    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    metrics = Metrics()
    caps = Capabilities(url, AS_TOKEN)
    fetcher = MediaFetcher(session, url, AS_TOKEN, caps, metrics, max_size=MAX_SIZE)
    cache = MediaCache(tmp_path / "cache", 1 << 20, metrics)
    await cache.start()
    source = MediaSource(fetcher, cache, metrics)
    with pytest.raises(UpstreamError) as info:
        await source.open(MediaId(SERVER, "abc"))
    assert info.value.status == 502
    assert caps.last_error is not None
    assert _requests(metrics) == {"upstream_error": 1}


async def test_read_timeout_is_504(make_parts: MakeParts, stub: StubServer, tmp_path: Path) -> None:
    """A homeserver that stops sending mid-body is a 504 UpstreamError, nothing cached."""
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 10
        await resp.prepare(request)
        await resp.write(b"12345")
        await release.wait()
        return resp

    stub.media["abc"] = stall
    parts = await make_parts(timeouts=Timeouts(connect=5, read=0.2, total=30))
    with pytest.raises(UpstreamError) as info:
        # Fails in open() (which waits for the first bytes, to sniff them) or mid-body.
        await _read(await parts.source.open(MediaId(SERVER, "abc")))
    release.set()
    assert info.value.status == 504
    assert _requests(parts.metrics) == {"timeout": 1}
    assert _cache_files(tmp_path) == []


async def test_content_length_over_max_size(
    make_parts: MakeParts, stub: StubServer, tmp_path: Path
) -> None:
    """A declared Content-Length over max_size is refused before the body is read."""
    stub.media["abc"] = serve_bytes(b"x" * 2000)
    parts = await make_parts(max_size=1000)
    with pytest.raises(UpstreamTooLarge):
        await parts.source.open(MediaId(SERVER, "abc"))
    assert _requests(parts.metrics) == {"too_large": 1}
    assert parts.metrics.value("relay_upstream_bytes") == 0
    assert _cache_files(tmp_path) == []


async def test_streamed_body_over_max_size(
    make_parts: MakeParts, stub: StubServer, tmp_path: Path
) -> None:
    """A body without Content-Length is counted while streaming and cut at max_size."""

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"y" * 500)
        return resp

    stub.media["abc"] = chunked
    parts = await make_parts(max_size=1000)
    with pytest.raises(UpstreamTooLarge):
        # Fails in open() or mid-body, depending on how far the download got.
        await _read(await parts.source.open(MediaId(SERVER, "abc")))
    assert _requests(parts.metrics) == {"too_large": 1}
    assert _cache_files(tmp_path) == []
    assert len(parts.cache) == 0


# -- single flight -----------------------------------------------------------------------


async def test_single_flight_streams_before_download_completes(
    make_parts: MakeParts, stub: StubServer
) -> None:
    """Concurrent requests share one download and all get bytes before it finishes."""
    data = bytes(range(256)) * 4096  # 1 MiB
    gate = asyncio.Event()

    async def gated(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "video/webm"})
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[:1000])
        await gate.wait()
        await resp.write(data[1000:])
        return resp

    stub.media["abc"] = gated
    parts = await make_parts(max_size=len(data))
    media = MediaId(SERVER, "abc")
    bodies = await asyncio.gather(*(parts.source.open(media) for _ in range(10)))
    iterators = [b.iter_chunks() for b in bodies]
    firsts = await asyncio.gather(*(anext(it) for it in iterators))
    # The gate is still closed: every client has bytes while the download is unfinished.
    assert not gate.is_set()
    assert all(f and data.startswith(f) for f in firsts)
    assert parts.source.downloads_in_progress == 1
    gate.set()

    async def rest(first: bytes, it: AsyncIterator[bytes]) -> bytes:
        return first + b"".join([c async for c in it])

    results = await asyncio.gather(*(rest(f, it) for f, it in zip(firsts, iterators, strict=True)))
    assert all(r == data for r in results)
    assert len(stub.media_requests()) == 1
    assert _requests(parts.metrics) == {"ok": 1}
    assert parts.metrics.value("relay_coalesced_waiters") == 9
    entry = await parts.source.open_file(media)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.content_type == "video/webm"


async def test_single_flight_failure_reaches_every_waiter(
    make_parts: MakeParts, stub: StubServer, tmp_path: Path
) -> None:
    """A failed shared download gives every waiter the same error and caches nothing."""
    gate, arrived = asyncio.Event(), asyncio.Event()

    async def slow_fail(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await gate.wait()
        return error_response(502, "M_UNKNOWN")

    stub.media["abc"] = slow_fail
    parts = await make_parts()
    media = MediaId(SERVER, "abc")
    tasks = [asyncio.create_task(parts.source.open(media)) for _ in range(5)]
    files = [asyncio.create_task(parts.source.open_file(media)) for _ in range(3)]
    await arrived.wait()
    gate.set()
    results = await asyncio.gather(*tasks, *files, return_exceptions=True)
    assert all(isinstance(r, UpstreamError) and r.status == 502 for r in results)
    assert len({id(r) for r in results}) == 1
    assert len(stub.media_requests()) == 1
    assert _cache_files(tmp_path) == []
    assert parts.source.downloads_in_progress == 0


async def test_purge_removes_and_detaches(make_parts: MakeParts, stub: StubServer) -> None:
    """Purge removes cached renditions; the next request downloads again."""
    stub.media["abc"] = serve_bytes(b"before")
    parts = await make_parts()
    media = MediaId(SERVER, "abc")
    await parts.source.open_file(media)
    rendition = CacheKey(SERVER, "abc", "original+thumb-32x32-crop")
    await put_bytes(parts.cache, rendition, b"thumb", "image/jpeg")
    assert len(parts.cache) == 2
    await parts.source.purge(MediaId(SERVER, "abc"))
    assert len(parts.cache) == 0
    stub.media["abc"] = serve_bytes(b"after")
    assert (await parts.source.open_file(media)).path.read_bytes() == b"after"


async def test_purge_during_download_caches_nothing(
    make_parts: MakeParts, stub: StubServer, tmp_path: Path
) -> None:
    """Media purged while downloading is never committed; whole-file waiters get not-found."""
    gate = asyncio.Event()

    async def gated(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 2000
        await resp.prepare(request)
        await resp.write(b"a" * 1000)
        await gate.wait()
        await resp.write(b"b" * 1000)
        return resp

    stub.media["abc"] = gated
    parts = await make_parts()
    media = MediaId(SERVER, "abc")
    body = await parts.source.open(media)
    whole = asyncio.create_task(parts.source.open_file(media))
    await asyncio.sleep(0)
    await parts.source.purge(MediaId(SERVER, "abc"))
    gate.set()
    # A client already streaming finishes its response; nothing is kept afterwards.
    assert await _read(body) == b"a" * 1000 + b"b" * 1000
    with pytest.raises(UpstreamNotFound):
        await whole
    assert len(parts.cache) == 0
    assert _cache_files(tmp_path) == []


async def test_cache_survives_new_instances(make_parts: MakeParts, stub: StubServer) -> None:
    """New MediaCache/MediaSource over the same directory serve from the cache."""
    stub.media["abc"] = serve_bytes(b"persist me")
    first = await make_parts()
    await _read(await first.source.open(MediaId(SERVER, "abc")))
    second = await make_parts()
    body = await second.source.open(MediaId(SERVER, "abc"))
    assert body.path is not None
    assert await _read(body) == b"persist me"
    assert len(stub.media_requests()) == 1
    assert second.metrics.value("relay_cache_hits") == 1


# -- encrypted ---------------------------------------------------------------------------


async def test_encrypted_round_trip_and_tamper(
    make_parts: MakeParts, stub: StubServer, tmp_path: Path
) -> None:
    """Ciphertext is decrypted after its hash checks; a wrong hash is refused, not cached."""
    plaintext = b"secret picture " * 5000
    ciphertext, enc = encrypt_attachment(plaintext)
    stub.media["enc"] = serve_bytes(ciphertext, "application/octet-stream")
    parts = await make_parts()
    media = MediaId(SERVER, "enc")
    tampered = EncryptedAttachment(enc.key, enc.iv, bytes(32))
    with pytest.raises(CiphertextHashMismatch):
        await parts.source.open(media, tampered)
    assert _cache_files(tmp_path) == []
    body = await parts.source.open(media, enc)
    assert body.path is not None
    assert await _read(body) == plaintext
    assert body.sha256 == hashlib.sha256(plaintext).hexdigest()
    # The plaintext never sits under the ciphertext's key.
    assert parts.cache.lookup(parts.source.cache_key(media)) is None
    with pytest.raises(CiphertextHashMismatch):
        await parts.source.open(media, tampered)


# -- capabilities ----------------------------------------------------------------------


async def test_capabilities_refresh(stub: StubServer, session: aiohttp.ClientSession) -> None:
    """refresh() reads /versions and the media config; a 401 there breaks identity."""
    caps = Capabilities(stub.url, AS_TOKEN)
    await caps.refresh(session)
    assert caps.authenticated_media is True
    assert caps.max_upload_size == 1234
    assert caps.identity_ok is True
    assert caps.last_error is None
    config = [s for s in stub.seen if s.raw_path == "/_matrix/client/v1/media/config"]
    assert config[0].headers["Authorization"] == f"Bearer {AS_TOKEN}"
    stub.versions = {"versions": ["v1.2"]}
    stub.config_status = 401
    await caps.refresh(session)
    assert caps.authenticated_media is False
    assert caps.identity_ok is False
    assert stub.seen[-1].raw_path == "/_matrix/media/v3/config"


async def test_capabilities_refresh_failure_keeps_view(
    stub: StubServer, session: aiohttp.ClientSession
) -> None:
    """An unreachable homeserver keeps the previous view and records last_error."""
    caps = Capabilities(stub.url, AS_TOKEN)
    await caps.refresh(session)
    await stub.stop()
    await caps.refresh(session)
    assert caps.authenticated_media is True
    assert caps.max_upload_size == 1234
    assert caps.last_error is not None
    assert caps.last_error.startswith("capability check failed")


async def test_capabilities_background_task(
    stub: StubServer, session: aiohttp.ClientSession
) -> None:
    """start() checks at once and keeps re-checking; stop() ends the task."""
    stub.versions = {"versions": ["v1.1"]}
    caps = Capabilities(stub.url, AS_TOKEN, interval=0.01)
    caps.start(session)
    try:
        for _ in range(500):
            if len([s for s in stub.seen if s.raw_path == "/_matrix/client/versions"]) >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await caps.stop()
    assert caps.authenticated_media is False
    assert caps.checked_at is not None
    count = len(stub.seen)
    await asyncio.sleep(0.05)
    assert len(stub.seen) == count


# -- disk accounting ---------------------------------------------------------------------


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix != ".json")


async def test_downloads_in_flight_count_against_cache_max_size(
    make_parts: MakeParts, stub: StubServer, tmp_path: Path
) -> None:
    """Five 300 kB downloads into a 1 MB cache: the disk never passes the cap; the ones
    that would pass it fail with ENOSPC (503 for clients), the rest complete."""
    gate = asyncio.Event()
    size = 300_000

    async def gated(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        resp.content_length = size
        await resp.prepare(request)
        await resp.write(b"v" * (size - 10))
        await gate.wait()
        await resp.write(b"v" * 10)
        return resp

    for i in range(5):
        stub.media[f"m{i}"] = gated
    parts = await make_parts(max_size=1_000_000, cache_max=1_000_000)
    tasks = [
        asyncio.create_task(parts.source.open_file(MediaId(SERVER, f"m{i}"))) for i in range(5)
    ]

    async def three_in_flight() -> bool:
        return parts.cache.pending_bytes >= 3 * (size - 10)

    await eventually(three_in_flight, within=10, interval=0.01)
    await asyncio.sleep(0.1)  # let the other two reach their refusal
    assert _disk_bytes(tmp_path / "cache") <= 1_000_000
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    done = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, OSError)]
    assert (len(done), len(refused)) == (3, 2)
    assert all(r.errno == errno.ENOSPC for r in refused)
    assert _disk_bytes(tmp_path / "cache") == parts.cache.total_bytes == 3 * size
    assert parts.cache.pending_bytes == 0


async def test_ciphertext_counts_against_cache_max_size(
    make_parts: MakeParts, stub: StubServer, tmp_path: Path
) -> None:
    """Ciphertext and plaintext of one attachment both count: 2 x 600 kB > 1 MB is refused."""
    plaintext = os.urandom(600_000)
    ciphertext, enc = encrypt_attachment(plaintext)
    stub.media["enc"] = serve_bytes(ciphertext, "application/octet-stream")
    parts = await make_parts(max_size=1_000_000, cache_max=1_000_000)
    with pytest.raises(OSError) as info:
        await parts.source.open(MediaId(SERVER, "enc"), enc)
    assert info.value.errno == errno.ENOSPC
    assert _cache_files(tmp_path) == []
    assert parts.cache.pending_bytes == 0


async def test_token_errcode_wakes_the_identity_check(
    make_parts: MakeParts, stub: StubServer, session: aiohttp.ClientSession
) -> None:
    """A media 401 M_UNKNOWN_TOKEN re-runs the identity check at once; it decides readiness."""
    parts = await make_parts()
    caps = parts.capabilities
    caps.start(session)
    try:

        async def checked() -> bool:
            return caps.checked_at is not None

        await eventually(checked, within=10, interval=0.01)
        config_checks = len([s for s in stub.seen if s.raw_path.endswith("/media/config")])
        parts.clock.now += 11  # past MIN_RECHECK_INTERVAL

        async def refused(request: web.Request) -> web.StreamResponse:
            return error_response(401, "M_UNKNOWN_TOKEN")

        stub.media["abc"] = refused
        stub.config_status = 401  # the token really is broken now
        with pytest.raises(UpstreamUnauthorized):
            await parts.source.open(MediaId(SERVER, "abc"))

        async def broken() -> bool:
            return not caps.identity_ok

        await eventually(broken, within=10, interval=0.01)
        assert len([s for s in stub.seen if s.raw_path.endswith("/media/config")]) > config_checks
    finally:
        await caps.stop()

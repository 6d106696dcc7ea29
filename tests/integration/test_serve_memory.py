"""The public server's short memories (tokens, records, ready answers) never change an answer.

A real MediaServer, cache and fetcher behind the real middlewares, over the stub
homeserver of test_fetcher_stub (it can serve a file again after the relay lost its
copy). Both clocks are injected: the wall clock judges link expiry, the monotonic one
the memories. Whether an answer came from the ready memory is read from
``relay_cache_hits``: a remembered answer is not a cache lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from relay.core.mxc import MediaId
from relay.core.records import MediaRecord
from relay.core.signing import KeyRing, LinkClaims, SigningKey, sign
from relay.core.variant import Thumbnail
from relay.media.cache import MediaCache
from relay.media.downloads import MediaSource
from relay.media.pipeline import RECORD_TTL, MediaPipeline
from relay.media.renditions import Renditions
from relay.media.revocation import RevocationCheck
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.fetcher import MediaFetcher, Timeouts
from relay.web.edge import PublicEdge
from relay.web.public import HEALTH_PATH, READY_TTL, SMALL_BODY, MediaServer
from tests.harness.loopback import start_loopback
from tests.harness.stub_homeserver import AS_TOKEN, SERVER, FakeClock, StubServer, serve_bytes
from tests.harness.waiting import eventually

WALL_START = 1_000_000.0
LINK_TTL = 3600
SMALL = os.urandom(1000)
LARGE = os.urandom(SMALL_BODY + 1000)


@dataclass
class Records:
    """The store's media records, with a query count."""

    records: dict[MediaId, MediaRecord] = field(default_factory=dict)
    queries: int = 0

    async def media_references(self, media: MediaId) -> list[MediaRecord]:
        self.queries += 1
        record = self.records.get(media)
        return [] if record is None else [record]


@dataclass
class Revocations:
    revoked: set[MediaId] = field(default_factory=set)

    async def is_revoked(self, media: MediaId) -> bool:
        return media in self.revoked


@dataclass
class World:
    server: MediaServer
    base_url: str
    ring: KeyRing
    fetcher: MediaFetcher
    records: Records
    revoked: Revocations
    revocations: RevocationCheck
    cache: MediaCache
    metrics: Metrics
    stub: StubServer
    wall: FakeClock
    mono: FakeClock
    session: aiohttp.ClientSession

    def link(
        self,
        media_id: str,
        *,
        filename: str | None = None,
        ttl: int = LINK_TTL,
        variant: Thumbnail | None = None,
    ) -> str:
        claims = LinkClaims(MediaId(SERVER, media_id), variant, filename, int(self.wall.now) + ttl)
        token = sign(self.ring, claims)
        return f"{self.base_url}/{token}" + (f"/{filename}" if filename else "")

    async def get(
        self, url: str, method: str = "GET", **headers: str
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        async with self.session.request(method, url, headers=headers) as resp:
            return resp.status, resp.headers, await resp.read()

    def cache_hits(self) -> float:
        return self.metrics.value("relay_cache_hits")

    def upstream_downloads(self) -> int:
        return len(self.stub.media_requests())


@pytest_asyncio.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    stub = StubServer()
    stub.media["small"] = serve_bytes(SMALL, "application/octet-stream")
    stub.media["large"] = serve_bytes(LARGE, "application/octet-stream")
    stub.media["pic"] = serve_bytes(SMALL, "image/gif")
    await stub.start()
    metrics = Metrics()
    wall, mono = FakeClock(WALL_START), FakeClock(0.0)
    ring = KeyRing([SigningKey("k1", b"k" * 32)])
    records, revoked = Records(), Revocations()
    revocations = RevocationCheck(revoked, clock=mono)
    async with aiohttp.ClientSession() as session:
        capabilities = Capabilities(stub.url, AS_TOKEN, session=session)
        fetcher = MediaFetcher(
            session,
            stub.url,
            AS_TOKEN,
            capabilities,
            metrics,
            max_size=1 << 24,
            timeouts=Timeouts(connect=5, read=5, total=30),
            not_found_ttl=60,
        )
        cache = MediaCache(tmp_path / "cache", 1 << 26, metrics)
        await cache.start()
        source = MediaSource(fetcher, cache, metrics)
        pipeline = MediaPipeline(
            records, revocations, source, Renditions(source, metrics), monotonic=mono
        )
        server = MediaServer(ring, pipeline, metrics, path_prefix="/m", clock=wall, monotonic=mono)
        app = web.Application(middlewares=[PublicEdge(metrics, skip=HEALTH_PATH).middleware])
        app.add_routes(server.routes())
        runner, port = await start_loopback(app)
        base_url = f"http://127.0.0.1:{port}/m"
        yield World(
            server,
            base_url,
            ring,
            fetcher,
            records,
            revoked,
            revocations,
            cache,
            metrics,
            stub,
            wall,
            mono,
            session,
        )
        await runner.cleanup()
        await source.close()
        await revocations.close()
    await stub.stop()


async def warm(world: World, url: str, data: bytes) -> None:
    """Download into the cache, then one answer from it (which is remembered)."""
    for _ in range(2):
        status, _, body = await world.get(url)
        assert (status, body) == (200, data)


def errcode(body: bytes) -> str:
    return str(json.loads(body)["errcode"])


@pytest.mark.parametrize(("media_id", "data"), [("small", SMALL), ("large", LARGE)])
async def test_remembered_answer_equals_the_full_one(
    world: World, media_id: str, data: bytes
) -> None:
    """A repeat GET is answered from memory with the same bytes and headers, own Cache-Control."""
    await warm(world, world.link(media_id), data)
    world.mono.now += READY_TTL  # forget the ready answer: the next one takes the full path
    hits = world.cache_hits()
    status, full_headers, _ = await world.get(world.link(media_id))
    assert status == 200
    assert world.cache_hits() == hits + 1
    world.wall.now += 100  # a link minted later, served later
    later = world.link(media_id, ttl=LINK_TTL // 2)
    status, headers, body = await world.get(later)
    assert (status, body) == (200, data)
    assert world.cache_hits() == hits + 1  # answered from memory
    assert full_headers["Cache-Control"] == f"private, max-age={LINK_TTL}"
    assert headers["Cache-Control"] == f"private, max-age={LINK_TTL // 2}"
    others = {"Cache-Control", "Date"}
    assert {k: v for k, v in headers.items() if k not in others} == {
        k: v for k, v in full_headers.items() if k not in others
    }
    assert headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert world.upstream_downloads() == 1


async def test_ready_answer_is_kept_half_a_second(world: World) -> None:
    """After READY_TTL the full path runs again (a cache lookup)."""
    url = world.link("small")
    await warm(world, url, SMALL)
    hits = world.cache_hits()
    await world.get(url)
    assert world.cache_hits() == hits
    world.mono.now += READY_TTL
    status, _, body = await world.get(url)
    assert (status, body) == (200, SMALL)
    assert world.cache_hits() == hits + 1


async def test_signed_filenames_are_never_mixed_up(world: World) -> None:
    """Links with different signed filenames each get their own Content-Disposition."""
    cases = [("a.bin", "attachment; filename=a.bin"), (None, "attachment")]
    cases += [("b.bin", "attachment; filename=b.bin"), ("a.bin", "attachment; filename=a.bin")]
    for filename, disposition in cases * 2:
        status, headers, body = await world.get(world.link("small", filename=filename))
        assert (status, body) == (200, SMALL)
        assert headers["Content-Disposition"] == disposition, filename


async def test_expired_link_is_410_though_its_token_is_remembered(world: World) -> None:
    """A remembered token is still refused from its expires_at second on."""
    url = world.link("small", ttl=10)
    await warm(world, url, SMALL)
    world.wall.now += 9.5
    assert (await world.get(url))[0] == 200
    world.wall.now += 0.5
    for method in ("HEAD", "GET"):
        status, headers, body = await world.get(url, method)
        assert status == 410, method
        assert headers["Cache-Control"] == "no-store"
    assert errcode(body) == "M_NOT_FOUND"
    assert SMALL not in body


async def test_forged_tokens_stay_refused(world: World) -> None:
    """A token signed with a key the server does not hold is 403 every time, never served."""
    other = KeyRing([SigningKey("k1", b"o" * 32)])
    claims = LinkClaims(MediaId(SERVER, "small"), None, None, int(world.wall.now) + 60)
    url = f"{world.base_url}/{sign(other, claims)}"
    await warm(world, world.link("small"), SMALL)
    for _ in range(3):
        status, _, body = await world.get(url)
        assert status == 403
        assert errcode(body) == "M_FORBIDDEN"


async def test_a_new_key_ring_does_not_inherit_remembered_tokens(world: World) -> None:
    """Keys change only with a new server; its memory starts empty, so removed keys fail."""
    url = world.link("small")
    await warm(world, url, SMALL)
    ring = KeyRing([SigningKey("k2", b"n" * 32)])
    source = MediaSource(world.fetcher, world.cache, world.metrics)
    pipeline = MediaPipeline(
        world.records, world.revocations, source, Renditions(source, world.metrics)
    )
    restarted = MediaServer(
        ring, pipeline, world.metrics, path_prefix="/m", clock=world.wall, monotonic=world.mono
    )
    app = web.Application(middlewares=[PublicEdge(world.metrics, skip=HEALTH_PATH).middleware])
    app.add_routes(restarted.routes())
    runner, port = await start_loopback(app)
    try:
        status, _, body = await world.get(url.replace(world.base_url, f"http://127.0.0.1:{port}/m"))
        assert status == 403
        assert errcode(body) == "M_FORBIDDEN"
    finally:
        await runner.cleanup()


async def test_revocation_beats_every_memory(world: World) -> None:
    """Marked revoked here: 410 at once, though token, record and answer are remembered."""
    url = world.link("small")
    await warm(world, url, SMALL)
    world.revocations.mark_revoked(MediaId(SERVER, "small"))
    for method in ("GET", "HEAD"):
        assert (await world.get(url, method))[0] == 410, method
    status, _, body = await world.get(url)
    assert (status, errcode(body)) == (410, "M_NOT_FOUND")
    assert SMALL not in body


async def test_revocation_from_another_process_within_the_revocation_ttl(world: World) -> None:
    """Revoked in the shared store: 410 once the "not revoked" answer is stale (<= 0.5 s)."""
    url = world.link("small")
    await warm(world, url, SMALL)
    world.revoked.revoked.add(MediaId(SERVER, "small"))
    world.mono.now += world.revocations.ttl
    status, _, body = await world.get(url)
    assert status == 410
    assert SMALL not in body


async def test_forget_drops_the_ready_answer(world: World) -> None:
    """forget(media) (revocation or purge) makes the next request take the full path."""
    url = world.link("small")
    await warm(world, url, SMALL)
    hits = world.cache_hits()
    world.server.forget(MediaId(SERVER, "small"))
    status, _, body = await world.get(url)
    assert (status, body) == (200, SMALL)
    assert world.cache_hits() == hits + 1


async def test_conditional_range_and_head_bypass_the_ready_answer(world: World) -> None:
    """If-None-Match, Range and HEAD behave as without any memory."""
    url = world.link("large")
    await warm(world, url, LARGE)
    tag = f'"{hashlib.sha256(LARGE).hexdigest()}"'
    status, headers, body = await world.get(url, **{"If-None-Match": tag})
    assert (status, body, headers["ETag"]) == (304, b"", tag)
    status, _, body = await world.get(url, **{"If-None-Match": '"other"'})
    assert (status, body) == (200, LARGE)
    status, headers, body = await world.get(url, Range="bytes=5-9")
    assert (status, body, headers["Content-Range"]) == (206, LARGE[5:10], f"bytes 5-9/{len(LARGE)}")
    status, headers, _ = await world.get(url, Range=f"bytes={len(LARGE)}-")
    assert (status, headers["Content-Range"]) == (416, f"bytes */{len(LARGE)}")
    status, headers, body = await world.get(url, "HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(len(LARGE)))


async def test_records_are_remembered_for_a_second(world: World) -> None:
    """The media record ("never seen" too) is asked once per RECORD_TTL, not per request."""
    media = MediaId(SERVER, "pic")
    url = world.link("pic")
    for _ in range(3):  # HEAD never uses the ready answer, so each runs the full path
        status, headers, _ = await world.get(url, "HEAD")
        assert (status, headers["Content-Type"]) == (200, "image/gif")
    assert world.records.queries == 1
    world.records.records[media] = MediaRecord(
        media, "!r:x", "$e", "image/gif", 10, "cat.gif", None
    )
    world.mono.now += RECORD_TTL
    _, headers, _ = await world.get(url, "HEAD")
    assert headers["Content-Disposition"] == "inline; filename=cat.gif"
    assert world.records.queries == 2


async def test_vanished_file_is_fetched_again_never_a_500(world: World) -> None:
    """A remembered large file deleted behind the cache's back is looked up and fetched again."""
    url = world.link("large")
    await warm(world, url, LARGE)
    entry = world.cache.lookup(MediaSource.cache_key(MediaId(SERVER, "large")))
    assert entry is not None
    entry.path.unlink()
    status, _, body = await world.get(url)
    assert (status, body) == (200, LARGE)
    assert world.upstream_downloads() == 2


@pytest.mark.parametrize(("media_id", "data", "kernel"), [("small", SMALL, 0), ("large", LARGE, 2)])
async def test_small_files_go_in_one_write_large_ones_by_sendfile(
    world: World, media_id: str, data: bytes, kernel: int
) -> None:
    """Up to SMALL_BODY a cached file is sent whole with its headers; beyond, by the kernel."""
    url = world.link(media_id)
    await world.get(url)  # downloads it (streamed, or from the file if that was quicker)
    server = world.server
    before = (server.sender.files_sent_buffered, server.sender.files_sent_zero_copy)
    sent_bytes = world.metrics.value("relay_served_bytes")
    for _ in range(2):  # the full path from the cache, then the remembered answer
        status, _, body = await world.get(url)
        assert (status, body) == (200, data)
    after = (server.sender.files_sent_buffered, server.sender.files_sent_zero_copy)
    assert (after[0] - before[0], after[1] - before[1]) == (2 - kernel, kernel)
    assert server.sender.files_sent_copied == 0
    assert world.metrics.value("relay_served_bytes") == sent_bytes + 2 * len(data)
    assert world.metrics.value("relay_served_requests", {"status": "200"}) == 3


async def test_a_revocation_cuts_a_request_still_waiting_for_its_body(world: World) -> None:
    """Revoked while the pipeline still fetches the body (a Range waits for the whole file):
    the request is cut, no answer of it sent, nothing of it left registered."""
    media = MediaId(SERVER, "slow")
    started, gate = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(LARGE)
        await response.prepare(request)
        await response.write(LARGE[:1000])
        started.set()
        await gate.wait()
        await response.write(LARGE[1000:])
        return response

    world.stub.media["slow"] = slow

    async def get_once() -> bytes:
        # A raw connection: aiohttp's client would retry a reset GET by itself.
        url = URL(world.link("slow"))
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            writer.write(
                f"GET {url.raw_path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n".encode()
            )
            return await reader.read()
        finally:
            writer.close()

    fetch = asyncio.create_task(get_once())
    try:
        await started.wait()

        async def waiting() -> bool:
            return len(world.server.in_flight) == 1

        await eventually(waiting, within=10, interval=0.01)
        world.revoked.revoked.add(media)
        world.revocations.mark_revoked(media)
        world.server.forget(media)
        try:
            answer = await fetch
        except ConnectionError:
            answer = b""
        assert answer == b""  # reset or closed: no status line, no body
        assert len(world.server.in_flight) == 0
        # Asked again, the link is refused.
        status, _, body = await world.get(world.link("slow"), Range="bytes=0-9")
        assert (status, errcode(body)) == (410, "M_NOT_FOUND")
    finally:
        gate.set()
        fetch.cancel()
        await asyncio.gather(fetch, return_exceptions=True)

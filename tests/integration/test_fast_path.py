"""relay.web.fast_path on a real relay: remembered plain GETs answered before aiohttp.

Every answer the fast path writes is compared with aiohttp's for the same link, and
everything it must not take (Range, If-None-Match, HEAD, a query, an unknown token, an
expired link, revoked media, a request after one it refused) is shown to reach aiohttp.
Which requests the fast path answered is recorded by wrapping :meth:`FastPath.serve`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import aiohttp
import pytest

from relay.app import Relay
from relay.web.fast_path import FastPath
from relay.web.public import READY_TTL
from tests.harness import make_png
from tests.harness.links import errcode, post_media, sign
from tests.harness.matrix_client import MatrixUser
from tests.harness.relay import MakeConfig, StartRelay
from tests.harness.waiting import eventually

pytestmark = pytest.mark.synapse

Answer = tuple[int, bytes, bytes]  # status, head (Date line removed), body


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """What FastPath.serve answered, one entry per complete head it looked at."""
    seen: list[bool] = []
    original = FastPath.serve

    def serve(self: FastPath, *args: object, **kwargs: object) -> bool:
        answered = original(self, *args, **kwargs)  # type: ignore[arg-type]
        seen.append(answered)
        return answered

    monkeypatch.setattr(FastPath, "serve", serve)
    yield seen


class Client:
    """One raw keep-alive connection to the public listener."""

    def __init__(
        self, relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.relay, self.reader, self.writer = relay, reader, writer

    @classmethod
    async def open(cls, relay: Relay) -> Client:
        parts = urlsplit(relay.public_url)
        assert parts.hostname is not None and parts.port is not None
        return cls(relay, *await asyncio.open_connection(parts.hostname, parts.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, *, head_only: bool = False) -> Answer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        kept = b"\r\n".join(line for line in lines if not line.startswith(b"Date: "))
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in lines
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        if head_only or status == 304:
            return status, kept, b""
        return status, kept, await asyncio.wait_for(self.reader.readexactly(length), 10)

    async def get(self, path: str, extra: str = "", method: str = "GET") -> Answer:
        await self.send(request(path, extra, method))
        return await self.answer(head_only=method == "HEAD")

    def close(self) -> None:
        self.writer.close()


def request(path: str, extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: relay\r\n{extra}\r\n".encode()


async def via_aiohttp(relay: Relay, path: str, extra: str = "") -> Answer:
    """A plain GET on a connection of its own that aiohttp answers (If-Range without
    Range: not the fast path's, but aiohttp's remembered answer and its memory)."""
    client = await Client.open(relay)
    try:
        return await client.get(path, "If-Range: x\r\n" + extra)
    finally:
        client.close()


async def warm(relay: Relay, path: str, taken: list[bool]) -> tuple[Client, Answer]:
    """A new connection whose first GET of ``path`` the fast path answered, and that answer
    (a connection whose request it refused is aiohttp's for good: each try has its own)."""

    async def fast() -> tuple[Client, Answer] | None:
        await via_aiohttp(relay, path)
        client = await Client.open(relay)
        del taken[:]
        try:
            answer = await client.get(path)
        except (ConnectionError, asyncio.IncompleteReadError):
            answer = (0, b"", b"")  # refused at the cap: a closing connection still counted
        if taken == [True]:
            return client, answer
        client.close()
        return None

    found = await eventually(fast, within=20, interval=0)
    assert found is not None
    return found


async def posted(
    relay: Relay, alice: MatrixUser, session: aiohttp.ClientSession, **sign_fields: object
) -> tuple[bytes, str, str, str]:
    """Media in a served room and a native link to it: (data, room, event, link path)."""
    data = make_png(200, 120)
    room_id, mxc, event_id = await post_media(relay, alice, data, "image/png", "cat.png")
    link = await sign(session, relay, mxc, **sign_fields)
    return data, room_id, event_id, urlsplit(link["url"]).path


async def following_the_feed(
    start_relay: StartRelay, make_config: MakeConfig, postgres_url: str
) -> Relay:
    """A relay on PostgreSQL once it follows the revocation feed (a "not revoked" answer
    then outlives the ready answer: see relay.media.revocation)."""
    relay = await start_relay(make_config(database=postgres_url))
    revocations = relay.revocations
    assert revocations is not None

    async def trusting() -> bool:
        return revocations.trusting

    await eventually(trusting, within=15)
    return relay


async def test_fast_answer_is_aiohttps_byte_for_byte(
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    taken: list[bool],
) -> None:
    """The same status line, headers (in order) and body as aiohttp's remembered answer,
    the same headers as its full answer; kept alive; with and without the prefix."""
    relay = await start_relay()
    data, _, _, path = await posted(relay, alice, http_session)
    full = await via_aiohttp(relay, path)  # the first: the whole way
    client, fast = await warm(relay, path, taken)
    try:
        remembered = await via_aiohttp(relay, path)
        # Byte for byte but Date and, should a second pass between them, max-age.
        assert without_max_age(fast) == without_max_age(remembered)
        assert b"\r\nCache-Control: private, max-age=" in fast[1]
        assert fast[0] == 200 and fast[2] == data
        assert fast[1].startswith(b"HTTP/1.1 200 OK\r\n")
        assert sorted(fast[1].split(b"\r\n")) == sorted(full[1].split(b"\r\n"))
        assert b"Connection" not in fast[1]
        bare = path.removeprefix("/media")
        assert bare != path
        await via_aiohttp(relay, bare)
        del taken[:]
        assert await client.get(bare) == fast
        assert taken == [True]
    finally:
        client.close()


def without_max_age(answer: Answer) -> Answer:
    lines = answer[1].split(b"\r\n")
    return (
        answer[0],
        b"\r\n".join(x for x in lines if not x.startswith(b"Cache-Control: ")),
        answer[2],
    )


async def test_a_fast_connection_stays_fast(
    start_relay: StartRelay,
    make_config: MakeConfig,
    postgres_url: str,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    taken: list[bool],
) -> None:
    """The ready answer is renewed before it expires (READY_TTL): one connection's plain
    GETs over three of its lifetimes are all answered here, every one the same. (On
    PostgreSQL, following the revocation feed: a "not revoked" answer then lasts longer
    than the ready answer; without the feed it expires with it, see the README.)"""
    relay = await following_the_feed(start_relay, make_config, postgres_url)
    _, _, _, path = await posted(relay, alice, http_session)
    client, fast = await warm(relay, path, taken)
    try:
        del taken[:]
        ends = time.monotonic() + 3 * READY_TTL
        while time.monotonic() < ends:
            # (Cache-Control's max-age counts down to the link's expiry.)
            got = await client.get(path)
            assert without_max_age(got) == without_max_age(fast), (got[1], fast[1])
            await asyncio.sleep(0.01)
        assert len(taken) > 10 and all(taken), taken
    finally:
        client.close()


async def test_an_idle_connection_is_still_fast_after_the_answer_lapsed(
    start_relay: StartRelay,
    make_config: MakeConfig,
    postgres_url: str,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    taken: list[bool],
) -> None:
    """No request for longer than READY_TTL: nothing renewed the ready answer, so the next
    GET waits for one renewal and is then answered here (refused once, then taken, the
    same bytes), and the connection stays the fast path's for the GET after it."""
    relay = await following_the_feed(start_relay, make_config, postgres_url)
    _, _, _, path = await posted(relay, alice, http_session)
    client, fast = await warm(relay, path, taken)
    try:
        await asyncio.sleep(2 * READY_TTL)
        del taken[:]
        got = await client.get(path)
        assert without_max_age(got) == without_max_age(fast)
        assert taken == [False, True], taken
        again = await client.get(path)
        assert without_max_age(again) == without_max_age(fast)
        assert taken == [False, True, True], taken
    finally:
        client.close()


async def test_what_the_fast_path_leaves_to_aiohttp(
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    taken: list[bool],
) -> None:
    """Range, If-None-Match, HEAD, a query, an unknown token, a close: aiohttp's answers."""
    relay = await start_relay()
    data, _, _, path = await posted(relay, alice, http_session)
    token = path.split("/")[2]
    head = (await via_aiohttp(relay, path))[1]
    etag = next(line for line in head.split(b"\r\n") if line.startswith(b"ETag: "))[6:].decode()
    cases: list[tuple[str, str, str, int, bytes | None]] = [
        ("GET", path, "Range: bytes=0-9\r\n", 206, data[:10]),
        ("GET", path, f"If-None-Match: {etag}\r\n", 304, b""),
        ("HEAD", path, "", 200, b""),
        ("GET", path + "?a=1", "", 200, data),
        ("GET", path.replace(token, token[:-2] + "AA"), "", 403, None),
        ("GET", path, "Content-Length: 3\r\n", 200, data),
    ]
    for method, target, extra, status, body in cases:
        client, _ = await warm(relay, path, taken)
        try:
            del taken[:]
            got = await client.get(target, extra, method)
            assert taken == [False], (method, target, extra)
            assert got[0] == status, (method, target, extra, got)
            if body is not None:
                assert got[2] == body
            else:
                assert errcode(got[2]) == "M_FORBIDDEN"
            # The connection is aiohttp's now: the next plain GET is not taken here.
            if "Content-Length" not in extra:
                assert (await client.get(path))[2] == data
                assert taken == [False]
        finally:
            client.close()


async def test_expired_and_revoked_links_reach_aiohttp(
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    taken: list[bool],
) -> None:
    """An expired link and revoked media are 410 from aiohttp, never a remembered 200."""
    relay = await start_relay()
    data, room_id, event_id, path = await posted(relay, alice, http_session)
    _, _, _, short = await posted(relay, alice, http_session, ttl=3)
    client, _ = await warm(relay, short, taken)
    try:
        started = time.monotonic()

        async def expired() -> Answer | None:
            got = await client.get(short)
            return got if got[0] != 200 else None

        got = await eventually(expired, within=10, interval=0.05)
        assert got is not None
        assert got[0] == 410 and errcode(got[2]) == "M_NOT_FOUND"
        assert time.monotonic() - started < 5
    finally:
        client.close()

    client, _ = await warm(relay, path, taken)
    try:
        await alice.redact(room_id, event_id)

        async def revoked() -> Answer | None:
            got = await client.get(path)
            return got if got[0] != 200 else None

        got = await eventually(revoked, within=20, interval=0.05)
        assert got is not None
        assert got[0] == 410 and errcode(got[2]) == "M_NOT_FOUND"
        assert data not in got[2]
    finally:
        client.close()


async def test_pipelined_and_split_heads(
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    taken: list[bool],
) -> None:
    """Pipelined: answered in order, fast until the first that is not; a head in tiny pieces."""
    relay = await start_relay()
    data, _, _, path = await posted(relay, alice, http_session)
    client, fast = await warm(relay, path, taken)
    try:
        del taken[:]
        await client.send(
            request(path) + request(path) + request(path, "Range: bytes=1-2\r\n") + request(path)
        )
        answers = [await client.answer() for _ in range(4)]
        assert [a[0] for a in answers] == [200, 200, 206, 200]
        assert answers[0] == answers[1] == fast
        assert answers[2][2] == data[1:3] and answers[3][2] == data
        assert taken == [True, True, False]
    finally:
        client.close()

    client, _ = await warm(relay, path, taken)
    try:
        await via_aiohttp(relay, path)
        del taken[:]
        for i in range(0, len(request(path)), 3):
            await client.send(request(path)[i : i + 3])
        assert await client.answer() == fast
        assert taken == [True]
    finally:
        client.close()


async def closed_within(client: Client, seconds: float) -> float:
    started = time.monotonic()
    try:
        while await asyncio.wait_for(client.reader.read(65536), seconds):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


async def test_limits_hold_on_fast_connections(
    start_relay: StartRelay,
    make_config: MakeConfig,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    taken: list[bool],
) -> None:
    """Fast connections count towards max_connections; one idle after its answer is closed
    header_timeout later, and so is one whose link head trickles in."""
    relay = await start_relay(make_config(public={"header_timeout": 3, "max_connections": 4}))
    _, _, _, path = await posted(relay, alice, http_session)
    held = [(await warm(relay, path, taken))[0] for _ in range(3)]
    try:
        # The fourth, aiohttp's: with three fast ones, the cap is reached.
        health = await Client.open(relay)
        held.append(health)
        assert (await health.get("/_relay/health"))[0] == 200
        extra = await Client.open(relay)
        status, _, body = await extra.answer()
        assert status == 503 and errcode(body) == "M_LIMIT_EXCEEDED"
        extra.close()
        assert relay.metrics.value("relay_public_connections_refused_total") == 1
    finally:
        for client in held:
            client.close()

    idle, _ = await warm(relay, path, taken)
    try:
        assert 2.5 <= await closed_within(idle, 10) < 7
    finally:
        idle.close()

    loris = await Client.open(relay)
    started = time.monotonic()
    await loris.send(request(path)[:-4])

    async def trickle() -> None:
        while True:
            await asyncio.sleep(0.2)
            await loris.send(b"X")

    dribbler = asyncio.ensure_future(trickle())
    try:
        await closed_within(loris, 10)
    finally:
        dribbler.cancel()
        loris.close()
    assert 2.5 <= time.monotonic() - started < 7


async def test_counted_and_logged_once(
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    taken: list[bool],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fast answer: one access line like aiohttp's, one count of each metric."""
    relay = await start_relay()
    caplog.set_level(logging.INFO, logger="relay.access")
    data, _, _, path = await posted(relay, alice, http_session)
    client, _ = await warm(relay, path, taken)
    try:
        await via_aiohttp(relay, path)
        caplog.clear()
        m = relay.metrics
        before = (
            m.value("relay_served_requests", {"status": "200"}),
            m.value("relay_link_requests", {"kind": "native", "entry": "relay", "status": "200"}),
            m.value("relay_public_request_seconds_count", {"kind": "native"}),
        )
        del taken[:]
        await client.get(path, "X-Real-IP: 192.0.2.7\r\n")
        assert taken == [True]
        after = (
            m.value("relay_served_requests", {"status": "200"}),
            m.value("relay_link_requests", {"kind": "native", "entry": "relay", "status": "200"}),
            m.value("relay_public_request_seconds_count", {"kind": "native"}),
        )
        assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
        lines = [r.access for r in caplog.records if r.name == "relay.access"]  # type: ignore[attr-defined]
        assert len(lines) == 1
        line = dict(lines[0])
        assert line.pop("ms") >= 0
        assert line["bytes"] == len(data) and line["client"] == "192.0.2.7"
        assert line["method"] == "GET" and line["status"] == 200
        assert (line["kind"], line["entry"]) == ("native", "relay")
        assert str(line["media"]).startswith("mxc://") and line["variant"] != "-"
    finally:
        client.close()

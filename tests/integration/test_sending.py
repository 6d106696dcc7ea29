"""relay.web.sending over real sockets and files: what is sent, and a client that hangs up."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from relay.web.sending import close_quietly, open_cached, read_cached, send_file
from tests.harness.loopback import start_loopback
from tests.harness.waiting import eventually

SIZE = 300 * 1024
HANG_UP_COUNT = 100 * 1024


@pytest.fixture
def cached(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "ab" / "entry"
    path.parent.mkdir()
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize(("offset", "count"), [(0, SIZE), (10, 100), (SIZE - 1, 1), (0, 0)])
def test_read_cached_reads_the_asked_part(
    cached: tuple[Path, bytes], offset: int, count: int
) -> None:
    """read_cached returns exactly count bytes from offset."""
    path, data = cached
    assert read_cached(path, SIZE, offset, count) == data[offset : offset + count]


def test_vanished_or_replaced_files_are_none(cached: tuple[Path, bytes], tmp_path: Path) -> None:
    """A file that is gone, or of another size than looked up, is None for both openers."""
    path, _ = cached
    for length in (SIZE - 1, SIZE + 1):
        assert read_cached(path, length, 0, 10) is None
        assert open_cached(path, length) is None
    path.unlink()
    assert read_cached(path, SIZE, 0, 10) is None
    assert open_cached(path, SIZE) is None
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"x")
    assert read_cached(not_a_dir / "entry", 1, 0, 1) is None
    assert open_cached(not_a_dir / "entry", 1) is None


def test_read_cached_refuses_a_short_read(cached: tuple[Path, bytes]) -> None:
    """Asking past the end (the file is not what the plan assumed) is None, not fewer bytes."""
    path, _ = cached
    assert read_cached(path, SIZE, SIZE - 10, 20) is None


class HangUp:
    """A server whose one handler sends a file only after its client has reset the connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.headers_sent = asyncio.Event()
        self.client_gone = asyncio.Event()
        self.outcome: list[str] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self.handle)
        self._runner, self.port = await start_loopback(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        # As asyncio does during sendfile: the transport does not see the reset.
        transport.pause_reading()
        response = web.StreamResponse()
        # Less than one copy chunk: a fallback copy would "succeed" into the dead socket.
        response.content_length = HANG_UP_COUNT
        await response.prepare(request)
        self.headers_sent.set()
        await self.client_gone.wait()
        fobj = open_cached(self.path, SIZE)
        assert fobj is not None
        try:
            zero_copy = await send_file(request, response, fobj, 0, HANG_UP_COUNT)
        except ConnectionResetError:
            self.outcome.append("client left")
        else:
            self.outcome.append("zero copy" if zero_copy else "copied")
        finally:
            close_quietly(fobj)
        return response


@pytest_asyncio.fixture
async def hang_up(cached: tuple[Path, bytes]) -> AsyncIterator[HangUp]:
    server = HangUp(cached[0])
    await server.start()
    yield server
    await server.stop()


async def test_client_reset_before_the_body_is_the_client_leaving(hang_up: HangUp) -> None:
    """sendfile failing on a reset socket raises ConnectionResetError, never a copy fallback."""
    reader, writer = await asyncio.open_connection("127.0.0.1", hang_up.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
    await hang_up.headers_sent.wait()
    await reader.readuntil(b"\r\n\r\n")
    sock = writer.get_extra_info("socket")
    # SO_LINGER 0: close() sends a reset, as a client killed mid-request does.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    hang_up.client_gone.set()

    async def finished() -> list[str]:
        return hang_up.outcome

    assert await eventually(finished, within=10, interval=0.01) == ["client left"]


async def test_whole_file_goes_by_the_kernel(cached: tuple[Path, bytes]) -> None:
    """On a plain TCP transport the body is sent zero-copy and arrives byte-exact."""
    path, data = cached
    outcome: list[bool] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = SIZE - 5
        fobj = open_cached(path, SIZE)
        assert fobj is not None
        try:
            outcome.append(await send_file(request, response, fobj, 5, SIZE - 5))
        finally:
            close_quietly(fobj)
        return response

    app = web.Application()
    app.router.add_get("/", handle)
    runner, port = await start_loopback(app)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.read()
        writer.close()
        assert head.startswith(b"HTTP/1.1 200")
        assert body == data[5:]
        assert outcome == [True]
    finally:
        await runner.cleanup()

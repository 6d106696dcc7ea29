"""relay.web.kernel_send on both event loops the relay may run on (asyncio and uvloop).

Each scenario runs on its own loop (``asyncio.Runner(loop_factory=…)``), over a real
loopback socket with a client whose small receive buffer makes the kernel refuse
most ``sendfile`` calls (EAGAIN), so the writability wait is exercised every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web

from relay.web.sending import close_quietly, open_cached, send_file
from tests.harness.loopback import start_loopback
from tests.harness.waiting import eventually

SIZE = 4 * 1024 * 1024  # many times the socket buffers: sendfile fills them again and again
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run_on(loop: str, scenario: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(scenario)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class FileServer:
    """Serves ``path`` (whole, or from ``?from=N``) by send_file; records each outcome."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.outcomes: list[str] = []
        self.started = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self.handle)
        self.runner, self.port = await start_loopback(app)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        start = int(request.query.get("from", "0"))
        response = web.StreamResponse()
        response.content_length = SIZE - start
        fobj = open_cached(self.path, SIZE)
        assert fobj is not None
        self.started.set()
        try:
            zero_copy = await send_file(request, response, fobj, start, SIZE - start)
            self.outcomes.append("zero copy" if zero_copy else "copied")
        except asyncio.CancelledError:
            self.outcomes.append("cancelled")
            raise
        finally:
            close_quietly(fobj)
        return response


@contextlib.asynccontextmanager
async def file_server(path: Path) -> AsyncIterator[FileServer]:
    """A started FileServer, cleaned up after; a clean exit must leave no descriptor behind."""
    server = FileServer(path)
    await server.start()
    before = open_descriptors()
    try:
        yield server
    finally:
        assert server.runner is not None
        await server.runner.cleanup()
    assert open_descriptors() <= before


async def slow_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.startswith(b"Content-Length")
    )
    return head, await reader.readexactly(length)


@pytest.fixture
def big_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "entry"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_kept_alive_responses_arrive_whole_by_the_kernel(
    loop: str, big_file: tuple[Path, bytes]
) -> None:
    """Two responses (whole, then a range) on one slow kept-alive connection: byte-exact,
    both sent by sendfile, and no descriptor left behind."""
    path, data = big_file

    async def scenario() -> None:
        async with file_server(path) as server:
            reader, writer = await slow_client(server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
            writer.write(b"GET /?from=12345 HTTP/1.1\r\nHost: relay\r\n\r\n")  # pipelined
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200") and body == data
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200") and body == data[12345:]
            writer.close()
            await writer.wait_closed()
            assert server.outcomes == ["zero copy", "zero copy"]

    run_on(loop, scenario())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_cancelled_send_leaves_the_loop_clean(loop: str, big_file: tuple[Path, bytes]) -> None:
    """Cancelling the handler mid-body (a revocation cutting it) releases the watched
    descriptor and the file; the next client is served whole."""
    path, data = big_file

    async def scenario() -> None:
        async with file_server(path) as server:
            tasks_before = asyncio.all_tasks()
            reader, writer = await slow_client(server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
            await server.started.wait()
            await reader.readexactly(100_000)  # the body is on its way, far from done
            handlers = asyncio.all_tasks() - tasks_before - {asyncio.current_task()}
            for task in handlers:
                task.cancel()
            await asyncio.wait(handlers, timeout=5)
            assert server.outcomes == ["cancelled"]
            writer.transport.abort()
            server.started.clear()
            reader, writer = await slow_client(server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200") and body == data
            writer.close()
            await writer.wait_closed()

    run_on(loop, scenario())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_client_that_resets_mid_body_is_a_connection_error(
    loop: str, big_file: tuple[Path, bytes]
) -> None:
    """A reset in the middle of the body ends the send with ConnectionResetError (aiohttp
    then closes the connection), never a hang or a copy."""
    path, _ = big_file
    errors: list[str] = []

    async def scenario() -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            response.content_length = SIZE
            fobj = open_cached(path, SIZE)
            assert fobj is not None
            try:
                await send_file(request, response, fobj, 0, SIZE)
            except ConnectionResetError as e:
                errors.append(type(e).__name__)
            finally:
                close_quietly(fobj)
            return response

        app = web.Application()
        app.router.add_get("/", handle)
        runner, port = await start_loopback(app)
        try:
            reader, writer = await slow_client(port)
            writer.write(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
            await reader.readexactly(50_000)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

            async def ended() -> list[str]:
                return errors

            assert await eventually(ended, within=10, interval=0.01) == ["ConnectionResetError"]
        finally:
            await runner.cleanup()

    run_on(loop, scenario())

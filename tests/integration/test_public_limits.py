"""The public listener's connection limits (issue 13, finding 8), with raw sockets.

A client that never finishes its request head, one that stops reading a large
response (holding a cache file open), and more connections than ``public.max_connections``:
each is ended by the relay itself, with short limits set in the config.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from relay.app import Relay
from tests.harness.links import fetch, post_media, sign
from tests.harness.matrix_client import MatrixUser
from tests.harness.relay import MakeConfig, StartRelay
from tests.harness.waiting import eventually

pytestmark = pytest.mark.synapse

HEALTH = b"GET /_relay/health HTTP/1.1\r\nHost: relay\r\n\r\n"


def public_address(relay: Relay) -> tuple[str, int]:
    parts = urlsplit(relay.public_url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with Content-Length: (status, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
    )
    return int(lines[0].split()[1]), await asyncio.wait_for(reader.readexactly(length), 10)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the relay closed the connection (EOF or reset); fails after ``seconds``."""
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), seconds):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def open_cache_files(cache_dir: Path) -> list[str]:
    """Files under the cache that this process holds open right now."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        # Directories aside: the cache holds its work/ directory open (its flock).
        if target.startswith(str(cache_dir)) and not os.path.isdir(target):
            found.append(target)
    return found


async def test_unfinished_request_head_is_closed(
    start_relay: StartRelay, make_config: MakeConfig
) -> None:
    """A head trickling in byte by byte is cut off at public.header_timeout; a quick one served."""
    relay = await start_relay(make_config(public={"header_timeout": 1}))
    host, port = public_address(relay)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(HEALTH)
    assert (await read_response(reader))[0] == 200
    writer.close()

    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    writer.write(b"GET /_relay/health HTTP/1.1\r\nHost: relay\r\n")

    async def trickle() -> None:
        # A slow-loris client: always sending, never finishing the head.
        while True:
            await asyncio.sleep(0.2)
            writer.write(b"X")
            await writer.drain()

    dribbler = asyncio.ensure_future(trickle())
    try:
        await closed_within(reader, 10)
    finally:
        dribbler.cancel()
        writer.close()
    elapsed = time.monotonic() - started
    assert 0.8 <= elapsed < 4, elapsed


async def test_stalled_reader_is_closed_and_its_cache_file_released(
    start_relay: StartRelay,
    make_config: MakeConfig,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
) -> None:
    """A client reading nothing of a large cached file is cut off after public.send_timeout."""
    relay = await start_relay(make_config(public={"send_timeout": 1.5}))
    data = os.urandom(12 * 1024 * 1024)  # far more than both sockets' buffers
    _, mxc, _ = await post_media(relay, alice, data, "application/octet-stream", "big.bin")
    link = await sign(http_session, relay, mxc)
    status, _, body = await fetch(http_session, link["url"])  # cached now
    assert status == 200 and body == data
    cache_dir = relay.config.media.cache_dir
    # (The download that filled the cache lets go of its file just after the response.)
    await eventually(lambda: _async(not open_cache_files(cache_dir)), within=5)

    url = urlsplit(link["url"])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, public_address(relay))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {url.path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
    started = time.monotonic()
    try:
        # The relay is sending the file (a stalled reader holds it open) ...
        await eventually(lambda: _async(bool(open_cache_files(cache_dir))), within=5)
        # ... until no progress for send_timeout: then the connection and file are gone.
        await eventually(lambda: _async(not open_cache_files(cache_dir)), within=15)
        elapsed = time.monotonic() - started
        assert elapsed >= 1.4 and elapsed < 10, elapsed
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, AssertionError)):
            # What little the client may still read ends short of the body.
            received = 0
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
                received += len(chunk)
            raise AssertionError(f"ended cleanly after {received} bytes")
    finally:
        writer.close()
    # The listener still serves everyone else.
    status, _, body = await fetch(http_session, link["url"])
    assert status == 200 and body == data


async def _async(value: bool) -> bool:
    return value


async def test_connections_beyond_the_cap_are_refused(
    start_relay: StartRelay, make_config: MakeConfig
) -> None:
    """With max_connections open, one more gets 503 M_LIMIT_EXCEEDED at once; a slot frees up."""
    relay = await start_relay(make_config(public={"max_connections": 3}))
    host, port = public_address(relay)
    held = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(HEALTH)  # answered, so the relay has surely accepted it; kept alive
        assert (await read_response(reader))[0] == 200
        held.append((reader, writer))

    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    writer.write(HEALTH)
    status, body = await read_response(reader)
    assert status == 503
    assert json.loads(body)["errcode"] == "M_LIMIT_EXCEEDED"
    await closed_within(reader, 5)
    assert time.monotonic() - started < 2
    writer.close()
    assert relay.metrics.value("relay_public_connections_refused_total") == 1

    # The held ones still work, and closing one frees its slot.
    reader, writer = held[0]
    writer.write(HEALTH)
    assert (await read_response(reader))[0] == 200
    writer.close()
    await writer.wait_closed()

    async def served_again() -> bool:
        r, w = await asyncio.open_connection(host, port)
        try:
            w.write(HEALTH)
            return (await read_response(r))[0] == 200
        except (ConnectionError, asyncio.IncompleteReadError):
            return False
        finally:
            w.close()

    await eventually(served_again, within=5)
    for _, w in held[1:]:
        w.close()

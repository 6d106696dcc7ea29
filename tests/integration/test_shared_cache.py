"""Several relay processes (real OS processes) sharing one ``media.cache_dir``.

Each child (tests/harness/cache_process.py) serves signed links with the media stack
of a relay process over the stub homeserver, which counts upstream requests exactly
and can hold a body mid-way (``Gate``) so that "while the download is under way" is
a condition, not a hope. The test process itself plays a further process where a
MediaCache of its own is enough (purge).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from relay.media.cache_layout import CacheKey
from tests.harness.cache import put_bytes, started_cache
from tests.harness.cache_process import CacheProcess, spawn
from tests.harness.stub_homeserver import SERVER, StubServer, error_response
from tests.harness.waiting import eventually

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc, flock")

CHUNK = 64 * 1024


class Gate:
    """A body served in chunks; after ``hold_after`` bytes it waits until opened."""

    def __init__(self, data: bytes, hold_after: int | None = None) -> None:
        self.data = data
        self.hold_after = hold_after
        self.opened = asyncio.Event()
        self.requests = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        resp = web.StreamResponse(
            headers={"Content-Type": "video/mp4", "Content-Length": str(len(self.data))}
        )
        await resp.prepare(request)
        for offset in range(0, len(self.data), CHUNK):
            if self.hold_after is not None and offset >= self.hold_after:
                await self.opened.wait()
            await resp.write(self.data[offset : offset + CHUNK])
        await resp.write_eof()
        return resp


class Refusal:
    """A 404 once opened: the homeserver's answer after a while."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.requests = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await self.opened.wait()
        return error_response(404, "M_NOT_FOUND")


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


@pytest_asyncio.fixture
async def children() -> AsyncIterator[list[CacheProcess]]:
    """Started children, stopped at the end whatever happened."""
    started: list[CacheProcess] = []
    yield started
    for child in started:
        await child.stop()


async def _true(value: bool) -> bool:
    return value


def _all_exist(paths: list[str]) -> bool:
    return all(os.path.exists(p) for p in paths)


def _disk_bytes(root: Path) -> int:
    """Bodies and files being written (sidecars and lock files aside)."""
    total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            if name.endswith((".json", ".lock")):
                continue
            try:
                total += (Path(directory) / name).stat().st_size
            except FileNotFoundError:
                continue
    return total


async def test_100_cold_requests_over_3_processes_download_once(
    stub: StubServer, tmp_path: Path, session: aiohttp.ClientSession, children: list[CacheProcess]
) -> None:
    """100 concurrent cold requests spread over 3 processes: 1 upstream download, 100
    complete identical bodies (the others followed the owner's growing file)."""
    data = os.urandom(2 * 1024 * 1024)
    gate = Gate(data, hold_after=CHUNK)
    stub.media["big"] = gate
    cache_dir = tmp_path / "cache"
    children += [await spawn(stub.url, cache_dir) for _ in range(3)]

    async def get(i: int) -> bytes:
        async with session.get(children[i % 3].link("big")) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()

    tasks = [asyncio.create_task(get(i)) for i in range(100)]
    work = cache_dir / "work"
    # Every process holds the growing file open: the owner writes it, the others follow.
    await eventually(lambda: _true(all(child.open_files(work) for child in children)), within=20)
    assert gate.requests == 1
    gate.opened.set()
    bodies = await asyncio.gather(*tasks)
    assert gate.requests == 1
    assert len(stub.media_requests()) == 1
    digest = hashlib.sha256(data).hexdigest()
    assert all(len(b) == len(data) and hashlib.sha256(b).hexdigest() == digest for b in bodies)
    assert list((cache_dir / "tmp").iterdir()) == []  # no lock left behind


async def test_a_killed_owner_lets_another_process_take_over(
    stub: StubServer, tmp_path: Path, session: aiohttp.ClientSession, children: list[CacheProcess]
) -> None:
    """The owner killed -9 mid-download: the kernel frees its lock, and a process waiting
    for the whole file (a Range request) downloads it itself and answers 206."""
    data = os.urandom(1024 * 1024)
    gate = Gate(data, hold_after=CHUNK)
    stub.media["big"] = gate
    cache_dir = tmp_path / "cache"
    owner, other = await spawn(stub.url, cache_dir), await spawn(stub.url, cache_dir)
    children += [owner, other]

    async def first() -> None:
        async with session.get(owner.link("big")) as resp:
            await resp.read()

    doomed = asyncio.create_task(first())
    await eventually(lambda: _true(bool(owner.open_files(cache_dir / "work"))), within=20)

    async def ranged() -> tuple[int, bytes]:
        headers = {"Range": "bytes=1000-1999"}
        async with session.get(other.link("big"), headers=headers) as resp:
            return resp.status, await resp.read()

    waiting = asyncio.create_task(ranged())
    # The other process follows the owner's file (it has it open) but reads none of it.
    await eventually(lambda: _true(bool(other.open_files(cache_dir / "work"))), within=20)
    owner.kill()
    await owner.process.wait()
    gate.opened.set()
    status, body = await waiting
    assert (status, body) == (206, data[1000:2000])
    assert gate.requests == 2
    with pytest.raises(aiohttp.ClientError):
        await doomed
    async with session.get(other.link("big")) as resp:
        assert resp.status == 200
        assert await resp.read() == data
    assert gate.requests == 2


async def test_the_owner_failure_is_every_process_answer(
    stub: StubServer, tmp_path: Path, session: aiohttp.ClientSession, children: list[CacheProcess]
) -> None:
    """The homeserver answers 404 to the process that downloads: a process waiting on
    that download answers 404 too, without asking the homeserver itself."""
    refusal = Refusal()
    stub.media["gone"] = refusal
    cache_dir = tmp_path / "cache"
    owner, other = await spawn(stub.url, cache_dir), await spawn(stub.url, cache_dir)
    children += [owner, other]

    async def get(child: CacheProcess) -> tuple[int, str]:
        async with session.get(child.link("gone")) as resp:
            return resp.status, (await resp.json())["errcode"]

    first = asyncio.create_task(get(owner))
    await eventually(lambda: _true(refusal.requests == 1), within=20)
    second = asyncio.create_task(get(other))
    # The other process watches the owner's lock (it has the lock file open).
    await eventually(lambda: _true(bool(other.open_files(cache_dir / "tmp", ".lock"))), within=20)
    refusal.opened.set()
    assert await first == (404, "M_NOT_FOUND")
    assert await second == (404, "M_NOT_FOUND")
    assert refusal.requests == 1
    assert list((cache_dir / "tmp").iterdir()) == []


async def test_start_up_scan_keeps_a_live_process_download(
    stub: StubServer, tmp_path: Path, session: aiohttp.ClientSession, children: list[CacheProcess]
) -> None:
    """A process starting (its cache scan) while another downloads leaves that download's
    file and lock alone; the download completes and is then a hit for the newcomer."""
    data = os.urandom(512 * 1024)
    gate = Gate(data, hold_after=CHUNK)
    stub.media["big"] = gate
    cache_dir = tmp_path / "cache"
    owner = await spawn(stub.url, cache_dir)
    children.append(owner)

    async def get(child: CacheProcess) -> bytes:
        async with session.get(child.link("big")) as resp:
            assert resp.status == 200
            return await resp.read()

    downloading = asyncio.create_task(get(owner))
    await eventually(lambda: _true(bool(owner.open_files(cache_dir / "work"))), within=20)
    in_flight = owner.open_files(cache_dir / "work")
    newcomer = await spawn(stub.url, cache_dir)  # printed its port: its scan is done
    children.append(newcomer)
    assert _all_exist(in_flight)
    assert [p.suffix for p in (cache_dir / "tmp").iterdir()] == [".lock"]
    gate.opened.set()
    assert await downloading == data
    assert await get(newcomer) == data
    assert gate.requests == 1


async def test_purge_removes_variants_written_by_other_processes(
    stub: StubServer, tmp_path: Path, session: aiohttp.ClientSession, children: list[CacheProcess]
) -> None:
    """A purge in this process removes the original another process cached and a variant
    this one wrote; the other process then sees a miss and downloads again."""
    data = os.urandom(300_000)  # over web.public.SMALL_BODY: never answered from memory
    gate = Gate(data)
    stub.media["abc"] = gate
    stub.media["keep"] = Gate(b"kept")
    cache_dir = tmp_path / "cache"
    child = await spawn(stub.url, cache_dir)
    children.append(child)
    for media_id in ("abc", "keep"):
        async with session.get(child.link(media_id)) as resp:
            assert resp.status == 200
            await resp.read()
    cache, _ = await started_cache(cache_dir)
    thumb = CacheKey(SERVER, "abc", "thumb-32x32-crop")
    assert await put_bytes(cache, thumb, b"thumbnail", "image/jpeg") is not None
    assert cache.lookup(CacheKey(SERVER, "abc", "original")) is not None  # adopted
    assert await cache.purge(SERVER, "abc") == 2
    names = sorted(p.name for p in cache_dir.glob("??/*"))
    kept = CacheKey(SERVER, "keep", "original")
    assert names == sorted(
        [f"{kept.media_digest()}-{kept.digest()}", f"{kept.media_digest()}-{kept.digest()}.json"]
    )
    async with session.get(child.link("abc")) as resp:
        assert resp.status == 200
        assert await resp.read() == data
    assert gate.requests == 2
    await cache.close()


async def test_two_processes_keep_the_directory_under_the_cap(
    stub: StubServer, tmp_path: Path, session: aiohttp.ClientSession, children: list[CacheProcess]
) -> None:
    """Two processes each under the cap in their own view: the sweep keeps the whole
    directory under it, and the most recent media is still served from the cache."""
    cap = 1024 * 1024
    size = 200 * 1024
    cache_dir = tmp_path / "cache"
    children += [await spawn(stub.url, cache_dir, cap, sweep_interval=0.05) for _ in range(2)]
    gates = {f"m{i}": Gate(os.urandom(size)) for i in range(10)}
    stub.media.update(gates)
    for i, (media_id, gate) in enumerate(gates.items()):
        async with session.get(children[i % 2].link(media_id)) as resp:
            assert resp.status == 200
            assert await resp.read() == gate.data
    assert _disk_bytes(cache_dir) > 0
    await eventually(lambda: _true(_disk_bytes(cache_dir) <= cap), within=10)
    last = list(gates)[-1]
    async with session.get(children[1].link(last)) as resp:
        assert await resp.read() == gates[last].data
    assert gates[last].requests == 1

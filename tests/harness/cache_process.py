"""A media-serving relay process over a shared cache directory, for cross-process tests.

Run as ``python -m tests.harness.cache_process HOMESERVER_URL CACHE_DIR MAX_BYTES
SWEEP_INTERVAL``: it builds the media stack as a relay process does (fetcher, cache,
MediaSource, pipeline, the public MediaServer behind the error middleware) over the
stub homeserver, prints ``port <n>`` once listening (its cache scan done), and serves
until its stdin closes. Links are signed with :data:`RING`.

:func:`spawn` starts one from a test; :class:`CacheProcess` is its handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from relay.core.mxc import MediaId
from relay.core.signing import KeyRing, LinkClaims, SigningKey, build_url, sign
from relay.media.cache import MediaCache
from relay.media.downloads import MediaSource
from relay.media.pipeline import MediaPipeline
from relay.media.renditions import Renditions
from relay.media.revocation import RevocationCheck
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.fetcher import MediaFetcher
from relay.web.middleware import error_middleware
from relay.web.public import MediaServer
from tests.harness.loopback import start_loopback
from tests.harness.stub_homeserver import AS_TOKEN, SERVER, NoRecords, NothingRevoked

RING = KeyRing([SigningKey("k1", b"s" * 32)])
REPO = Path(__file__).resolve().parents[2]


@dataclass
class CacheProcess:
    """A child process serving signed links from the shared cache."""

    process: asyncio.subprocess.Process
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def link(self, media_id: str) -> str:
        token = sign(RING, LinkClaims(MediaId(SERVER, media_id), None, None, 4_000_000_000))
        return build_url(f"http://127.0.0.1:{self.port}", token, None)

    def open_files(self, under: Path, suffix: str = ".part") -> list[str]:
        """The files named ``*<suffix>`` below ``under`` this process has open (by
        default those being written; ``.lock``: downloads it owns or follows)."""
        found = []
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(fd_dir / fd)
                if target.startswith(str(under)) and target.endswith(suffix):
                    found.append(target)
        return found

    def kill(self) -> None:
        """SIGKILL: no clean-up runs; the kernel releases its locks."""
        self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.kill()
                await self.process.wait()


async def spawn(
    homeserver: str, cache_dir: Path, max_bytes: int = 1 << 30, sweep_interval: float = 5.0
) -> CacheProcess:
    """Start a child and wait until it listens."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.harness.cache_process",
        homeserver,
        str(cache_dir),
        str(max_bytes),
        str(sweep_interval),
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    if not line.startswith(b"port "):
        process.kill()
        await process.wait()
        raise RuntimeError(f"cache process did not start: {line!r}")
    return CacheProcess(process, int(line.split()[1]))


async def _serve(homeserver: str, cache_dir: Path, max_bytes: int, sweep_interval: float) -> None:
    metrics = Metrics()
    async with aiohttp.ClientSession() as session:
        caps = Capabilities(homeserver, AS_TOKEN, session=session)
        fetcher = MediaFetcher(session, homeserver, AS_TOKEN, caps, metrics, max_size=1 << 26)
        cache = MediaCache(cache_dir, max_bytes, metrics, sweep_interval=sweep_interval)
        await cache.start()
        source = MediaSource(fetcher, cache, metrics)
        pipeline = MediaPipeline(
            NoRecords(), RevocationCheck(NothingRevoked()), source, Renditions(source, metrics)
        )
        app = web.Application(middlewares=[error_middleware])
        app.add_routes(MediaServer(RING, pipeline, metrics, path_prefix="").routes())
        runner, port = await start_loopback(app)
        print(f"port {port}", flush=True)
        # Serve until the parent closes our stdin.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
        await runner.cleanup()
        await pipeline.close()


if __name__ == "__main__":
    url, directory, size, interval = sys.argv[1:5]
    asyncio.run(_serve(url, Path(directory), int(size), float(interval)))

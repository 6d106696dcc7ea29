"""Memory benchmark: stream a 1 GiB media item through MediaFetcher + MediaSource.

A stub homeserver in a child process generates the bytes without holding them; this
process fetches them as the relay does (authenticated path, single-flight download
into the disk cache, client reading the growing file) into a consumer that discards
them, then reports its own peak RSS and the throughput.

    .venv/bin/python bench/stream_memory.py [--size-mib 1024] [--clients 1]

Target: peak RSS under 100 MB. Exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from relay.core.mxc import MediaId
from relay.media.cache import MediaCache
from relay.media.downloads import MediaSource
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.fetcher import MediaFetcher, Timeouts

TARGET_RSS_BYTES = 100 * 1000 * 1000
BLOCK = bytes(range(256)) * 4096  # 1 MiB, reused for every block the stub sends
AS_TOKEN = "bench-token"


# -- the stub homeserver (child process) --------------------------------------------------


def serve_upstream(size: int) -> None:
    """Run the stub homeserver on a free loopback port; print the port, serve forever."""

    async def versions(request: web.Request) -> web.Response:
        return web.json_response({"versions": ["v1.11"]})

    async def config(request: web.Request) -> web.Response:
        return web.json_response({"m.upload.size": size})

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        resp.content_length = size
        await resp.prepare(request)
        left = size
        while left > 0:
            n = min(left, len(BLOCK))
            await resp.write(BLOCK[:n])
            left -= n
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/_matrix/client/versions", versions)
        app.router.add_get("/_matrix/client/v1/media/config", config)
        app.router.add_get("/_matrix/client/v1/media/download/{server}/{media}", download)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def expected_sha256(size: int) -> str:
    digest = hashlib.sha256()
    left = size
    while left > 0:
        n = min(left, len(BLOCK))
        digest.update(BLOCK[:n])
        left -= n
    return digest.hexdigest()


# -- the relay side (this process) --------------------------------------------------------


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def run(port: int, size: int, clients: int, cache_dir: Path) -> tuple[float, int]:
    base = f"http://127.0.0.1:{port}"
    metrics = Metrics()
    async with aiohttp.ClientSession() as session:
        caps = Capabilities(base, AS_TOKEN, session=session)
        fetcher = MediaFetcher(
            session,
            base,
            AS_TOKEN,
            caps,
            metrics,
            max_size=size,
            timeouts=Timeouts(connect=5, read=30, total=300),
        )
        cache = MediaCache(cache_dir, size + (1 << 20), metrics)
        await cache.start()
        source = MediaSource(fetcher, cache, metrics)
        media = MediaId("bench.example", "onegibibyte")

        async def client() -> int:
            body = await source.open(media)
            received = 0
            async for chunk in body.iter_chunks():
                received += len(chunk)  # discard
            return received

        started = time.perf_counter()
        received = await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
        await source.close()
    if any(r != size for r in received):
        raise SystemExit(f"short read: {received} != {size}")
    entry = cache.lookup(source.cache_key(media))
    if entry is None or entry.sha256 != expected_sha256(size):
        raise SystemExit("cache entry missing or wrong")
    requests = metrics.value("relay_upstream_requests", {"outcome": "ok"})
    if requests != 1:
        raise SystemExit(f"expected one upstream request, saw {requests}")
    return elapsed, int(metrics.value("relay_upstream_bytes"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=1, help="concurrent readers (one download)")
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size_mib << 20
    if args.upstream:
        serve_upstream(size)
        return 0

    child = subprocess.Popen(
        [sys.executable, __file__, "--upstream", "--size-mib", str(args.size_mib)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        baseline = peak_rss_bytes()
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
            elapsed, fetched = asyncio.run(run(port, size, args.clients, Path(tmp)))
    finally:
        child.terminate()
        child.wait(timeout=10)
    peak = peak_rss_bytes()
    mib = fetched / (1 << 20)
    print(
        f"streamed {mib:.0f} MiB to {args.clients} client(s) in {elapsed:.1f} s "
        f"({mib / elapsed:.0f} MiB/s)"
    )
    print(
        f"peak RSS: {peak / 1e6:.1f} MB (after imports: {baseline / 1e6:.1f} MB); "
        f"target < {TARGET_RSS_BYTES / 1e6:.0f} MB"
    )
    ok = peak < TARGET_RSS_BYTES
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

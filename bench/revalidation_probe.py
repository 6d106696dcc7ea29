"""Which request is the cheapest way to ask Synapse "do you still serve this media?".

Starts a throwaway Synapse, uploads media of a few sizes, and for each candidate request
measures the latency (median and p95 over N requests) and the body bytes that crossed
the wire, then checks that the candidate answers 404 for quarantined and admin-deleted
media (a probe that cannot tell "gone" from "present" is no probe). Candidates:

- ``GET``             the whole download (what a cache miss costs);
- ``GET, headers``    the download, connection closed once the headers arrived;
- ``GET Range 0-0``   the same with ``Range: bytes=0-0`` (Synapse ignores Range);
- ``HEAD``            the download endpoint with HEAD;
- ``thumbnail``       ``/thumbnail`` 32x32 crop (pre-generated for images only).

    .venv/bin/python bench/revalidation_probe.py [--requests 50]

Prints a table; exits 1 if the relay's choice (``GET`` with ``Range: bytes=0-0``, see
relay.upstream.probe) fails to tell gone from present.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from PIL import Image

from relay.devtools.local_synapse import LocalSynapse

MEDIA = "/_matrix/client/v1/media"
Probe = Callable[[aiohttp.ClientSession, str, dict[str, str]], Awaitable[tuple[int, int]]]


async def full_get(session: aiohttp.ClientSession, url: str, h: dict[str, str]) -> tuple[int, int]:
    async with session.get(url, headers=h) as resp:
        return resp.status, len(await resp.read())


async def headers_only(
    session: aiohttp.ClientSession, url: str, h: dict[str, str], extra: dict[str, str] | None = None
) -> tuple[int, int]:
    resp = await session.get(url, headers={**h, **(extra or {})})
    status = resp.status
    resp.close()  # drops the connection: the body is never read
    return status, 0


async def ranged(session: aiohttp.ClientSession, url: str, h: dict[str, str]) -> tuple[int, int]:
    return await headers_only(session, url, h, {"Range": "bytes=0-0"})


async def head(session: aiohttp.ClientSession, url: str, h: dict[str, str]) -> tuple[int, int]:
    async with session.head(url, headers=h) as resp:
        return resp.status, len(await resp.read())


async def thumbnail(session: aiohttp.ClientSession, url: str, h: dict[str, str]) -> tuple[int, int]:
    thumb = url.replace("/download/", "/thumbnail/") + "?width=32&height=32&method=crop"
    async with session.get(thumb, headers=h) as resp:
        return resp.status, len(await resp.read())


CANDIDATES: dict[str, Probe] = {
    "GET": full_get,
    "GET, headers": headers_only,
    "GET Range 0-0": ranged,
    "HEAD": head,
    "thumbnail": thumbnail,
}


def png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), secrets.token_bytes(side * side * 3)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


async def upload(
    session: aiohttp.ClientSession, base: str, token: str, data: bytes, ct: str
) -> str:
    async with session.post(
        base + "/_matrix/media/v3/upload",
        data=io.BytesIO(data),
        headers={"Authorization": f"Bearer {token}", "Content-Type": ct},
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    return str(body["content_uri"]).removeprefix("mxc://")


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    synapse = LocalSynapse(workdir=workdir / "synapse")
    await synapse.start()
    try:
        _, token = await synapse.register_user("admin-" + secrets.token_hex(3), admin=True)
        auth = {"Authorization": f"Bearer {token}"}
        base = synapse.base_url
        async with aiohttp.ClientSession() as session:
            items = {
                "png 3 KiB": (png(32), "image/png"),
                "png 1 MiB": (png(600), "image/png"),
                "bin 20 MiB": (secrets.token_bytes(20 * 1024**2), "application/octet-stream"),
            }
            ids = {
                name: await upload(session, base, token, d, ct) for name, (d, ct) in items.items()
            }
            columns = ("status", "p50 ms", "p95 ms", "bytes")
            print(f"{'candidate':15} {'media':11} " + " ".join(f"{c:>8}" for c in columns))
            for cname, probe in CANDIDATES.items():
                for mname, mid in ids.items():
                    url = f"{base}{MEDIA}/download/{mid}"
                    times, status, size = [], 0, 0
                    for _ in range(args.requests):
                        started = time.perf_counter()
                        status, size = await probe(session, url, auth)
                        times.append((time.perf_counter() - started) * 1000)
                    p95 = statistics.quantiles(times, n=20)[18]
                    print(
                        f"{cname:15} {mname:11} {status:>6} {statistics.median(times):8.2f}"
                        f" {p95:8.2f} {size:>8}"
                    )
            # Gone: quarantined and deleted media must answer 404 to the probe.
            gone_ok = True
            for how in ("quarantine", "delete"):
                mid = await upload(session, base, token, png(16), "image/png")
                server, media_id = mid.split("/")
                if how == "quarantine":
                    path = f"/_synapse/admin/v1/media/quarantine/{server}/{media_id}"
                    method = "POST"
                else:
                    path = f"/_synapse/admin/v1/media/{server}/{media_id}"
                    method = "DELETE"
                async with session.request(method, base + path, headers=auth, json={}) as resp:
                    assert resp.status == 200, await resp.text()
                url = f"{base}{MEDIA}/download/{mid}"
                answers = {c: (await p(session, url, auth))[0] for c, p in CANDIDATES.items()}
                print(f"after {how}: " + ", ".join(f"{c} {s}" for c, s in answers.items()))
                gone_ok &= answers["GET Range 0-0"] == 404
    finally:
        await synapse.stop()
    return 0 if gone_ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

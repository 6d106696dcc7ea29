"""Thumbnail benchmark: the relay's renderer against Synapse's own thumbnailer.

    python bench/thumbnails.py [--rounds N] [--width W --height H]

What it does:
  1. starts a throwaway Synapse with ``dynamic_thumbnails: true`` (so it renders the
     exact size asked for, as the relay does, instead of answering the nearest
     pre-generated one) and the relay as a **subprocess** (``python -m relay run``), so
     this process's event loop never competes with the relay's;
  2. uploads, N times each, a 4000x3000 JPEG photo, a 3000x2000 PNG and a 60-frame
     480x360 animated GIF (every copy is a fresh media id, so every "cold" request
     really is the first one for that media);
  3. per copy, times ``GET`` of a W x H ``scale`` thumbnail (default 333x222, a size
     Synapse does not pre-generate on upload):
       - Synapse cold: ``/_matrix/client/v1/media/thumbnail`` (authenticated), first
         request, Synapse decodes the original and renders;
       - Synapse warm: the same request again (served from Synapse's thumbnail store);
       - relay cold: the signed thumbnail link's first request, which includes the
         relay fetching the original from Synapse, rendering and caching it;
       - relay warm: the same link again (cached rendition, ``sendfile``);
       - relay render: a link of another size (W-1 x H-1) of the same media, whose
         original the relay has cached by now: rendering alone;
  4. prints median milliseconds per row and the relay/Synapse ratio, and checks every
     answer is 200 with the expected dimensions (the relay's exactly W x H-fitting).

Both servers run on the same 2-core machine as this client, one request at a time,
over keep-alive connections; times include the whole body. Takes about a minute
with the defaults (most of it Synapse start-up and uploads).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from benchkit import (
    prepare,
    relay_config,
    relay_process,
    write_yaml,
)
from PIL import Image

from relay.core.variant import Thumbnail
from relay.devtools.local_synapse import LocalSynapse
from relay.media.thumbnails import target_size

APPSERVICE_ID = "media-relay-thumbs"
BOT_LOCALPART = "mediarelaythumbs"
BRIDGE_TOKEN = "bench-bridge-" + secrets.token_hex(16)
TIME_BUDGET = 70.0  # seconds for uploads and requests; rounds stop early past it


# ---------------------------------------------------------------- test images


def photo_jpeg() -> bytes:
    """A 4000x3000 photo-like JPEG (gradients and noise, so it does not compress to nothing)."""
    size = (4000, 3000)
    red = Image.linear_gradient("L").resize(size)
    green = Image.effect_noise(size, 48)
    blue = Image.radial_gradient("L").resize(size)
    out = io.BytesIO()
    Image.merge("RGB", (red, green, blue)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def large_png() -> bytes:
    """A 3000x2000 RGB PNG (a screenshot-sized image with some texture)."""
    size = (3000, 2000)
    red = Image.radial_gradient("L").resize(size)
    green = Image.linear_gradient("L").rotate(90).resize(size)
    blue = Image.effect_noise(size, 16)
    out = io.BytesIO()
    Image.merge("RGB", (red, green, blue)).save(out, format="PNG", compress_level=6)
    return out.getvalue()


def animated_gif() -> bytes:
    """A 60-frame 480x360 animated GIF."""
    size = (480, 360)
    base = Image.radial_gradient("L").resize(size)
    frames = []
    for i in range(60):
        shifted = base.point(lambda v, i=i: (v + i * 4) % 256)
        frame = Image.merge("RGB", (shifted, base, shifted.rotate(180)))
        frames.append(frame.quantize(64))
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    return out.getvalue()


@dataclass(frozen=True)
class Sample:
    name: str
    content_type: str
    data: bytes
    size: tuple[int, int]


def samples() -> list[Sample]:
    made = [
        ("4000x3000 JPEG", "image/jpeg", photo_jpeg()),
        ("3000x2000 PNG", "image/png", large_png()),
        ("480x360 GIF, 60 frames", "image/gif", animated_gif()),
    ]
    out = []
    for name, content_type, data in made:
        with Image.open(io.BytesIO(data)) as im:
            out.append(Sample(name, content_type, data, im.size))
    return out


# ---------------------------------------------------------------- servers


# ---------------------------------------------------------------- measuring


@dataclass
class Row:
    label: str
    times_ms: list[float] = field(default_factory=list)
    sizes: set[tuple[int, int]] = field(default_factory=set)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")


class Bench:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        synapse: LocalSynapse,
        token: str,
        internal_url: str,
        thumb: Thumbnail,
    ) -> None:
        self.session = session
        self.synapse = synapse
        self.token = token
        self.internal_url = internal_url
        self.thumb = thumb
        self.failures: list[str] = []

    async def upload(self, sample: Sample) -> str:
        async with self.session.post(
            self.synapse.base_url + "/_matrix/media/v3/upload",
            data=sample.data,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": sample.content_type},
        ) as response:
            body = await response.json()
            if response.status != 200:
                raise RuntimeError(f"upload failed: {response.status} {body}")
            return str(body["content_uri"])

    async def sign(self, mxc: str, thumb: Thumbnail | None = None) -> str:
        thumb = thumb or self.thumb
        thumbnail = {"width": thumb.width, "height": thumb.height, "method": thumb.method}
        async with self.session.post(
            self.internal_url + "/_relay/v1/sign",
            json={"mxc": mxc, "thumbnail": thumbnail},
            headers={"Authorization": f"Bearer {BRIDGE_TOKEN}"},
        ) as response:
            body = await response.json()
            if response.status != 200:
                raise RuntimeError(f"sign failed: {response.status} {body}")
            return str(body["url"])

    def synapse_url(self, mxc: str, width: int, height: int) -> str:
        server, media_id = mxc.removeprefix("mxc://").split("/", 1)
        return (
            f"{self.synapse.base_url}/_matrix/client/v1/media/thumbnail/{server}/{media_id}"
            f"?width={width}&height={height}&method=scale"
        )

    async def timed(
        self, row: Row, url: str, headers: dict[str, str], check: Callable[[tuple[int, int]], bool]
    ) -> None:
        started = time.perf_counter()
        async with self.session.get(url, headers=headers) as response:
            body = await response.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            self.failures.append(f"{row.label}: {response.status} {body[:200]!r}")
            return
        with Image.open(io.BytesIO(body)) as im:
            size = im.size
        if not check(size):
            self.failures.append(f"{row.label}: unexpected size {size}")
        row.times_ms.append(elapsed)
        row.sizes.add(size)

    async def round(self, mxc: str, rows: dict[str, Row], expected: tuple[int, int]) -> None:
        auth = {"Authorization": f"Bearer {self.token}"}
        w, h = self.thumb.width, self.thumb.height

        def inside(size: tuple[int, int]) -> bool:
            # Synapse's scale may round differently by a pixel; it must fit the box.
            return size[0] <= w and size[1] <= h

        def exact(size: tuple[int, int]) -> bool:
            return size == expected

        synapse_url = self.synapse_url(mxc, w, h)
        await self.timed(rows["synapse_cold"], synapse_url, auth, inside)
        await self.timed(rows["synapse_warm"], synapse_url, auth, inside)
        link = await self.sign(mxc)
        await self.timed(rows["relay_cold"], link, {}, exact)
        await self.timed(rows["relay_warm"], link, {}, exact)
        # Another size of the same media: the original is cached now, so this is render only.
        other = await self.sign(mxc, Thumbnail(w - 1, h - 1, "scale"))
        await self.timed(rows["relay_render"], other, {}, inside)


def new_rows(thumb: Thumbnail) -> dict[str, Row]:
    size = f"{thumb.width}x{thumb.height}"
    return {
        "synapse_cold": Row(f"Synapse {size}, cold (renders)"),
        "synapse_warm": Row(f"Synapse {size}, warm (stored)"),
        "relay_cold": Row(f"relay {size}, cold (fetch original + render)"),
        "relay_warm": Row(f"relay {size}, warm (cached)"),
        "relay_render": Row("relay, other size, original cached (render)"),
    }


def report(results: list[tuple[Sample, dict[str, Row]]], thumb: Thumbnail) -> None:
    print()
    print(f"median ms per request, {thumb.width}x{thumb.height} scale, one request at a time")
    header = f"{'image':<24} {'row':<46} {'n':>3} {'median ms':>10} {'output':>10}"
    print(header)
    print("-" * len(header))
    for sample, rows in results:
        print(f"{sample.name}: {len(sample.data) / 1e6:.1f} MB")
        for row in rows.values():
            sizes = ",".join(f"{w}x{h}" for w, h in sorted(row.sizes))
            print(
                f"{sample.name:<24} {row.label:<46} {len(row.times_ms):>3} "
                f"{row.median:>10.1f} {sizes:>10}"
            )
        cold = rows["relay_cold"].median / rows["synapse_cold"].median
        warm = rows["relay_warm"].median / rows["synapse_warm"].median
        print(f"{'':<24} relay/Synapse ratio: cold {cold:.2f}, warm {warm:.2f}")
        print()


async def run(args: argparse.Namespace) -> int:
    thumb = Thumbnail(args.width, args.height, "scale")
    print("making test images ...", flush=True)
    images = samples()
    with tempfile.TemporaryDirectory(prefix="relay-thumb-bench-") as tmp:
        workdir = Path(tmp)
        # Synapse renders the exact size asked for (the relay's behaviour), not the nearest.
        setup, synapse = prepare(workdir, APPSERVICE_ID, BOT_LOCALPART, dynamic_thumbnails=True)
        started = time.monotonic()
        print("starting Synapse ...", flush=True)
        await synapse.start()
        print(f"Synapse ready after {time.monotonic() - started:.1f} s", flush=True)
        try:
            _, token = await synapse.register_user("bench-" + secrets.token_hex(3))
            config = write_yaml(
                workdir / "relay.yaml",
                relay_config(
                    setup,
                    synapse,
                    database=f"sqlite:{workdir / 'relay.db'}",
                    cache_dir=workdir / "relay-cache",
                    # No rooms in this benchmark: sign uploaded media directly.
                    signing={"require_seen": False},
                    bridges=[{"name": "bench", "token": BRIDGE_TOKEN, "ttl": 3600}],
                ),
            )
            timeout = aiohttp.ClientTimeout(total=120)
            async with (
                relay_process(config, setup.internal_port),
                aiohttp.ClientSession(timeout=timeout) as session,
            ):
                bench = Bench(session, synapse, token, setup.internal_url, thumb)
                results = await measure(bench, images, args.rounds)
        finally:
            await synapse.stop()
    report(results, thumb)
    for failure in bench.failures:
        print("FAILED:", failure)
    return 1 if bench.failures else 0


async def measure(
    bench: Bench, images: list[Sample], rounds: int
) -> list[tuple[Sample, dict[str, Row]]]:
    results = []
    deadline = time.monotonic() + TIME_BUDGET
    for sample in images:
        # Past the budget, one copy each, so every image still gets a figure.
        copies = rounds if time.monotonic() < deadline else 1
        print(f"{sample.name}: uploading {copies} copies ...", flush=True)
        mxcs = [await bench.upload(sample) for _ in range(copies)]
        rows = new_rows(bench.thumb)
        expected = target_size(sample.size, bench.thumb)
        for i, mxc in enumerate(mxcs):
            if i and time.monotonic() > deadline:
                print("time budget spent; fewer rounds for the rest", flush=True)
                break
            await bench.round(mxc, rows, expected)
        results.append((sample, rows))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="fresh media per image kind")
    parser.add_argument("--width", type=int, default=333)
    parser.add_argument("--height", type=int, default=222)
    args = parser.parse_args()
    if args.rounds < 1 or not 1 <= args.width <= 2048 or not 1 <= args.height <= 2048:
        parser.error("--rounds must be >= 1, --width and --height 1-2048")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())

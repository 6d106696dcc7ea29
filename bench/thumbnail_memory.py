"""Peak memory of one thumbnail render against the render budget (relay.media.render_budget).

    python bench/thumbnail_memory.py

For each kind of source (PNG RGB/RGBA/palette/16-bit grey, WebP, GIF, JPEG RGB/CMYK)
it finds the largest square the budget accepts for a 640x640 ``scale`` thumbnail,
writes such an image, and renders it in a fresh subprocess, reading the process's
peak resident set (``VmHWM``; ``ru_maxrss`` would carry this process's own peak
across ``fork``). Then animations: GIFs and WebPs of noise frames, and the issue's
hostile files (a 5000x5000 GIF of a few dozen bytes, a 5000x5000 WebP of a
kilobyte, 20 one-pixel frames on a 5000x5000 screen), which must be refused.

Prints one row per case (side, file size, outcome, peak MiB above the interpreter's,
seconds); exits 1 when a render exceeds ``DEFAULT_MAX_MEMORY`` (128 MiB) or a hostile
file is not refused. Takes about 30 s and writes up to ~80 MB of temporary files.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from relay.media.render_budget import DEFAULT_MAX_MEMORY, Source, static_cost

OUTPUT = 640
MIB = 1024 * 1024

CHILD = r"""
import json, sys, time
from pathlib import Path
from relay.core.variant import Thumbnail
from relay.media.thumbnails import ThumbnailError, ThumbnailLimits, render_thumbnail

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

src, side, animated = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
base, start = hwm(), time.monotonic()
try:
    render_thumbnail(src, src.with_suffix(".out"), Thumbnail(side, side, "scale", animated),
                     ThumbnailLimits())
    outcome = "rendered"
except ThumbnailError as e:
    outcome = "refused: " + type(e).__name__
print(json.dumps({"outcome": outcome, "peak": hwm() - base, "seconds": time.monotonic() - start}))
"""


def measure(path: Path, side: int, animated: bool) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(side), "1" if animated else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def largest_side(fmt: str, mode: str, transparent: bool) -> int:
    """The largest square side whose static cost fits the budget."""
    low, high = 16, 20_000
    while low < high:
        mid = (low + high + 1) // 2
        cost = static_cost(Source(fmt, mode, mid * mid, transparent), OUTPUT * OUTPUT)
        low, high = (mid, high) if cost <= DEFAULT_MAX_MEMORY else (low, mid - 1)
    return low


def still(path: Path, fmt: str, mode: str, side: int, options: dict[str, object]) -> None:
    im = Image.linear_gradient("L").resize((side, side))
    if mode == "I;16":
        im = im.convert("I").point(lambda v: v * 256).convert("I;16")
    else:
        im = im.convert(mode)
    im.save(path, format=fmt, **options)


def animation(path: Path, fmt: str, side: int, frames: int) -> None:
    images = [Image.effect_noise((side, side), 40 + i).convert("P") for i in range(frames)]
    options: dict[str, object] = {"save_all": True, "append_images": images[1:], "duration": 50}
    if fmt == "WEBP":
        options["quality"] = 50
    images[0].save(path, format=fmt, **options)


def tiny_gif(width: int, height: int, frames: int) -> bytes:
    out = bytearray(b"GIF89a" + struct.pack("<HH", width, height) + bytes([0xF0, 0, 0]))
    out += b"\x00\x00\x00\xff\xff\xff"
    for _ in range(frames):
        out += b"\x21\xf9\x04\x00\x0a\x00\x00\x00"
        out += b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00\x02\x02\x44\x01\x00"
    return bytes(out + b"\x3b")


def main() -> int:
    failures = 0
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="relay-thumb-mem-") as tmp:
        root = Path(tmp)
        stills = [
            ("PNG", "RGB", {}),
            ("PNG", "RGBA", {}),
            ("PNG", "P", {"transparency": 0}),
            ("PNG", "I;16", {}),
            ("WEBP", "RGBA", {"lossless": True}),
            ("GIF", "P", {}),
            ("JPEG", "RGB", {}),
            ("JPEG", "CMYK", {}),
        ]
        for fmt, mode, options in stills:
            side = largest_side(fmt, mode, "transparency" in options)
            path = root / f"still-{fmt}-{mode.replace(';', '')}"
            still(path, fmt, mode, side, options)
            result = measure(path, OUTPUT, False)
            failures += int(result["outcome"] != "rendered" or result["peak"] > DEFAULT_MAX_MEMORY)  # type: ignore[operator]
            rows.append(_row(f"{fmt} {mode} still", side, path, result))
            path.unlink()
        for fmt, side, frames, request in [
            ("GIF", 1600, 20, OUTPUT),
            ("WEBP", 1600, 20, OUTPUT),
            ("GIF", 1000, 40, 2048),
            ("WEBP", 2000, 5, 2048),
        ]:
            path = root / f"anim-{fmt}-{side}"
            animation(path, fmt, side, frames)
            result = measure(path, request, True)
            failures += int(result["peak"] > DEFAULT_MAX_MEMORY)  # type: ignore[operator]
            rows.append(_row(f"{fmt} {frames} frames -> {request}", side, path, result))
            path.unlink()
        webp = io.BytesIO()
        Image.new("RGB", (5000, 5000), (10, 20, 30)).save(webp, "WEBP", lossless=True)
        hostile = [
            ("GIF, 1 pixel on 5000x5000", tiny_gif(5000, 5000, 1), False),
            ("WebP 5000x5000, one colour", webp.getvalue(), False),
            ("GIF, 20 frames on 5000x5000", tiny_gif(5000, 5000, 20), True),
        ]
        for name, data, animated in hostile:
            path = root / "hostile"
            path.write_bytes(data)
            result = measure(path, OUTPUT, animated)
            failures += int(not str(result["outcome"]).startswith("refused"))
            rows.append(_row(name, 5000, path, result))
    print(f"{'case':34} {'side':>5} {'bytes':>10}  {'outcome':28} {'peak MiB':>8} {'s':>5}")
    print("\n".join(rows))
    print(f"budget {DEFAULT_MAX_MEMORY // MIB} MiB per render: {'FAIL' if failures else 'ok'}")
    return 1 if failures else 0


def _row(name: str, side: int, path: Path, result: dict[str, object]) -> str:
    peak = int(result["peak"]) // MIB  # type: ignore[call-overload]
    seconds = float(result["seconds"])  # type: ignore[arg-type]
    size = path.stat().st_size
    return f"{name:34} {side:>5} {size:>10}  {result['outcome']!s:28} {peak:>8} {seconds:>5.2f}"


if __name__ == "__main__":
    sys.exit(main())

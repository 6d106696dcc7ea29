"""``media-relay demo``: a throwaway Synapse, the relay, an image, and a link that works.

Everything happens on loopback in a temporary directory (or ``--workdir``). The
demo goes through the same doors an operator and a bridge would: it writes a
config from the example, runs ``generate-registration``'s code, starts Synapse
with that registration, and asks the bridge API for the signed URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import logging
import sys
import tempfile
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from ruamel.yaml import YAML

from relay.app import Relay, stop_signals
from relay.config.document import fill_generated_secrets, write_document
from relay.config.loading import load
from relay.config.registration import write_registration
from relay.core.exit_codes import EXIT_ERROR, EXIT_OK
from relay.core.mxc import parse_mxc
from relay.devtools.local_synapse import LocalSynapse, free_ports
from relay.store import Store

log = logging.getLogger("relay.devtools.demo")

BRIDGE_NAME = "demo-bridge"
PUSH_TIMEOUT = 30.0


def demo_image() -> bytes:
    """A small PNG made on the spot, so the demo needs no files."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 180), (13, 189, 139))
    draw = ImageDraw.Draw(image)
    for x in range(0, 320, 20):
        draw.line([(x, 0), (x + 180, 180)], fill=(11, 150, 110), width=6)
    draw.rectangle([(20, 60), (300, 120)], fill=(255, 255, 255))
    draw.text((34, 82), "matrix-media-relay demo", fill=(0, 0, 0))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_demo_config(workdir: Path, synapse_port: int, internal: int, public: int) -> Path:
    """The packaged example with loopback addresses, secrets filled (comments kept)."""
    yaml = YAML()
    example = resources.files("relay").joinpath("config.example.yaml").read_text("utf-8")
    doc = yaml.load(example)
    doc["homeserver"].update(address=f"http://127.0.0.1:{synapse_port}", domain="localhost")
    doc["appservice"].update(port=internal, address=f"http://127.0.0.1:{internal}")
    doc["public"].update(url=f"http://127.0.0.1:{public}/", hostname="127.0.0.1", port=public)
    doc["database"] = f"sqlite:{workdir / 'relay.db'}"
    doc["media"]["cache_dir"] = str(workdir / "media-cache")
    doc["bridges"][0]["name"] = BRIDGE_NAME
    fill_generated_secrets(doc)
    path = workdir / "config.yaml"
    write_document(path, doc)
    return path


class DemoUser:
    """Just enough of the client-server API to set the scene."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str) -> None:
        self.session = session
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        async with self.session.request(
            method, self.base_url + path, headers={**self.headers, **(headers or {})}, **kwargs
        ) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"{method} {path}: {resp.status} {body}")
            return dict(body)

    async def post_image(self, room_id: str, png: bytes) -> str:
        uploaded = await self.call(
            "POST",
            "/_matrix/media/v3/upload?filename=demo.png",
            data=png,
            headers={"Content-Type": "image/png"},
        )
        mxc = str(uploaded["content_uri"])
        content = {
            "msgtype": "m.image",
            "body": "demo.png",
            "url": mxc,
            "info": {"mimetype": "image/png", "size": len(png), "w": 320, "h": 180},
        }
        room = quote(room_id, safe="")
        await self.call(
            "PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/demo1", json=content
        )
        return mxc


async def poll_until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll the store: the homeserver's pushes arrive within moments."""
    async with asyncio.timeout(PUSH_TIMEOUT):
        while not await check():  # noqa: ASYNC110 - polling the store is fine for a demo
            await asyncio.sleep(0.1)


async def wait_until_joined(store: Store, room_id: str) -> None:
    """Synapse pushes a room's events only once the bot has joined it."""

    async def joined() -> bool:
        served = await store.served_rooms([room_id])
        return bool(served) and room_id not in await store.rooms_joining()

    await poll_until(joined)


async def wait_until_seen(store: Store, mxc: str) -> None:
    media = parse_mxc(mxc)

    async def seen() -> bool:
        return await store.media_record(media) is not None

    await poll_until(seen)


class SignRefused(RuntimeError):
    """The bridge API answered an error; ``status`` says which (404: not seen yet)."""

    def __init__(self, status: int, body: object) -> None:
        super().__init__(f"bridge API refused to sign: {status} {body}")
        self.status = status


async def sign_via_bridge_api(
    session: aiohttp.ClientSession, internal_url: str, token: str, mxc: str, filename: str
) -> str:
    """A signed link from ``POST /_relay/v1/sign``, as a bridge asks for one."""
    async with session.post(
        internal_url + "/_relay/v1/sign",
        json={"mxc": mxc, "filename": filename},
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise SignRefused(resp.status, body)
        return str(body["url"])


async def run_demo(workdir: Path, once: bool) -> int:
    synapse_port, internal, public = free_ports(3)
    config_path = write_demo_config(workdir, synapse_port, internal, public)
    config = load(config_path, environ={})
    registration = workdir / "registration.yaml"
    write_registration(config, registration)
    png = demo_image()

    print(f"demo files in {workdir}; starting Synapse on 127.0.0.1:{synapse_port} …", flush=True)
    async with LocalSynapse(workdir / "synapse", [registration], port=synapse_port) as synapse:
        relay = Relay(config)
        await relay.start()
        try:
            async with aiohttp.ClientSession() as session:
                user_id, token = await synapse.register_user("demo")
                user = DemoUser(session, synapse.base_url, token)
                room = await user.call(
                    "POST",
                    "/_matrix/client/v3/createRoom",
                    json={"name": "media relay demo", "invite": [config.bot_user_id]},
                )
                assert relay.store is not None
                await wait_until_joined(relay.store, str(room["room_id"]))
                mxc = await user.post_image(str(room["room_id"]), png)
                await wait_until_seen(relay.store, mxc)
                bridge = next(b for b in config.bridges if b.name == BRIDGE_NAME)
                url = await sign_via_bridge_api(
                    session, relay.internal_url, bridge.token, mxc, "demo.png"
                )
                print(f"{user_id} posted {mxc} in {room['room_id']}")
                print(f"signed URL (valid {config.signing.ttl} s):\n\n    {url}\n", flush=True)
                if once:
                    return await check_url(session, url, png)
            print("serving until Ctrl-C …", flush=True)
            with stop_signals() as stop:
                await stop.wait()
            return EXIT_OK
        finally:
            await relay.stop()


async def check_url(session: aiohttp.ClientSession, url: str, expected: bytes) -> int:
    async with session.get(url) as resp:
        body = await resp.read()
        ok = resp.status == 200 and body == expected
        print(
            f"GET {url} → {resp.status}, {len(body)} bytes, "
            f"sha256 {hashlib.sha256(body).hexdigest()[:16]}… "
            f"{'matches the upload' if ok else 'DOES NOT match the upload'}"
        )
    return EXIT_OK if ok else EXIT_ERROR


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        import synapse  # noqa: F401 - only to give a helpful message when it is missing
    except ImportError:
        print(
            "media-relay demo needs Synapse: pip install 'matrix-media-relay[demo]'",
            file=sys.stderr,
        )
        return EXIT_ERROR
    logging.getLogger("relay").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(run_demo(args.workdir.resolve(), args.once))
    with (
        tempfile.TemporaryDirectory(prefix="media-relay-demo-") as tmp,
        contextlib.suppress(KeyboardInterrupt),
    ):
        return asyncio.run(run_demo(Path(tmp), args.once))
    return EXIT_OK

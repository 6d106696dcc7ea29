"""The stack's end-to-end check, run by e2e.sh on the host once the stack is up.

Registers a user on the stack's Synapse, invites the relay's bot to a new room, posts an
image, asks the relay for a signed link through its bridge API, fetches the link through
nginx (under the /relay/ prefix) and compares the bytes with the upload.

    python deploy/compose/e2e.py --synapse URL --relay URL --proxy URL --config FILE --secret S
"""

from __future__ import annotations

import argparse
import asyncio
import io
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
from ruamel.yaml import YAML

from relay.devtools.demo import DemoUser, SignRefused, check_url, sign_via_bridge_api
from relay.devtools.local_synapse import registration_mac

T = TypeVar("T")
WAIT = 60.0  # seconds for the homeserver's push to reach the relay


async def register(session: aiohttp.ClientSession, synapse: str, secret: str) -> str:
    """A fresh user through Synapse's shared-secret registration; returns its access token."""
    url = synapse + "/_synapse/admin/v1/register"
    async with session.get(url) as resp:
        nonce = (await resp.json())["nonce"]
    name, password = f"e2e-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    mac = registration_mac(secret, nonce, name, password, False)
    body = {"nonce": nonce, "username": name, "password": password, "admin": False, "mac": mac}
    async with session.post(url, json=body) as resp:
        answer = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"registration failed: {resp.status} {answer}")
    return str(answer["access_token"])


def unique_png() -> bytes:
    """Random pixels: bytes no earlier run uploaded (Synapse quarantines repeats of
    quarantined media), and a plain PNG that metadata stripping leaves as it is."""
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (64, 48), secrets.token_bytes(64 * 48 * 3)).save(out, "PNG")
    return out.getvalue()


async def until(what: str, attempt: Callable[[], Awaitable[T | None]]) -> T:
    """Retry ``attempt()`` until it returns something other than None, for WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        got = await attempt()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)


async def run(args: argparse.Namespace) -> int:
    doc = YAML(typ="safe").load(args.config.read_text())
    bot = f"@{doc['appservice'].get('bot_localpart', 'mediarelay')}:{args.domain}"
    token = doc["bridges"][0]["token"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        user = DemoUser(session, args.synapse, await register(session, args.synapse, args.secret))
        room = str(
            (await user.call("POST", "/_matrix/client/v3/createRoom", json={"invite": [bot]}))[
                "room_id"
            ]
        )

        async def joined() -> bool | None:
            path = f"/_matrix/client/v3/rooms/{quote(room, safe='')}/joined_members"
            return True if bot in (await user.call("GET", path))["joined"] else None

        await until(f"{bot} to join {room}", joined)
        png = unique_png()
        mxc = await user.post_image(room, png)

        async def signed() -> str | None:
            try:
                return await sign_via_bridge_api(session, args.relay, token, mxc, "e2e.png")
            except SignRefused as e:
                if e.status == 404:  # not seen yet: the homeserver's push is on its way
                    return None
                raise

        url = await until(f"the relay to see {mxc}", signed)
        # The link names the proxy as the stack's network knows it; reach it from the host.
        parts = urlsplit(url)
        host_url = args.proxy.rstrip("/") + parts.path
        print(f"signed link {url}\nfetched as {host_url}")
        if not parts.path.startswith("/relay/"):
            raise RuntimeError(f"the link is not under the /relay/ prefix: {url}")
        return await check_url(session, host_url, png)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--synapse", required=True, help="Synapse as the host reaches it")
    parser.add_argument("--relay", required=True, help="the relay's internal listener")
    parser.add_argument("--proxy", required=True, help="nginx as the host reaches it")
    parser.add_argument("--config", required=True, type=Path, help="the relay's config.yaml")
    parser.add_argument("--secret", required=True, help="Synapse's registration_shared_secret")
    parser.add_argument("--domain", default="example.test")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

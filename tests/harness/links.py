"""End-to-end helpers: media posted in a served room, links minted and fetched."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from relay.app import Relay
from relay.core.mxc import parse_mxc
from tests.harness.matrix_client import MatrixUser, image_content
from tests.harness.relay import BRIDGE_TOKEN
from tests.harness.rooms import served_room
from tests.harness.waiting import eventually


async def post_media(
    relay: Relay,
    user: MatrixUser,
    data: bytes,
    content_type: str,
    filename: str,
    *,
    room_id: str | None = None,
    msgtype: str = "m.image",
) -> tuple[str, str, str]:
    """Upload, send it in a served room, wait until the relay recorded it: (room, mxc, event)."""
    room_id = room_id or await served_room(relay, user)
    mxc = await user.upload(data, content_type, filename)
    content = image_content(mxc, body=filename, mimetype=content_type, size=len(data))
    content["msgtype"] = msgtype
    event_id = await user.send_message(room_id, content)
    await wait_recorded(relay, mxc)
    return room_id, mxc, event_id


async def wait_recorded(relay: Relay, mxc: str) -> None:
    store = relay.store
    assert store is not None
    media = parse_mxc(mxc)

    async def recorded() -> bool:
        return await store.media_record(media) is not None

    await eventually(recorded)


async def sign(
    session: aiohttp.ClientSession, relay: Relay, mxc: str, **fields: Any
) -> dict[str, Any]:
    """A link from the bridge API (must succeed)."""
    async with session.post(
        relay.internal_url + "/_relay/v1/sign",
        json={"mxc": mxc, **fields},
        headers={"Authorization": f"Bearer {BRIDGE_TOKEN}"},
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    return body


async def fetch(
    session: aiohttp.ClientSession, url: str, method: str = "GET", **headers: str
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with session.request(method, url, headers=headers) as resp:
        return resp.status, resp.headers, await resp.read()


def errcode(body: bytes) -> str:
    return str(json.loads(body)["errcode"])


async def run_cli(config_path: Path, *args: str) -> tuple[int, str, str]:
    """The real command line in a subprocess (it owns its event loop): (exit, out, err)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        *args,
        "-c",
        str(config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def run_sign(config_path: Path, *args: str) -> tuple[int, str, str]:
    """``media-relay sign … -c config_path``."""
    return await run_cli(config_path, "sign", *args)

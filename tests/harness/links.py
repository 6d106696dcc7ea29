"""End-to-end helpers: media posted in a served room, links minted and fetched."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
from multidict import CIMultiDictProxy

from relay.app import Relay
from relay.core.mxc import parse_mxc
from tests.harness.encryption import encrypt_attachment, encrypted_file_json
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


class Posted(NamedTuple):
    """Media posted in a served room and a link to it signed by the bridge API."""

    room_id: str
    mxc: str
    event_id: str
    url: str


async def post_and_sign(
    session: aiohttp.ClientSession,
    relay: Relay,
    user: MatrixUser,
    data: bytes,
    content_type: str,
    filename: str,
    **fields: Any,
) -> Posted:
    """``post_media`` then ``sign`` (``fields`` go to the sign request, e.g. a thumbnail)."""
    room_id, mxc, event_id = await post_media(relay, user, data, content_type, filename)
    url = (await sign(session, relay, mxc, **fields))["url"]
    return Posted(room_id, mxc, event_id, url)


async def fetch_each(session: aiohttp.ClientSession, links: list[str], data: bytes) -> None:
    """Every one of ``links`` answers 200 with exactly ``data``."""
    for link in links:
        status, _, body = await fetch(session, link)
        assert (status, body) == (200, data), link


async def post_encrypted(
    relay: Relay,
    user: MatrixUser,
    plaintext: bytes,
    filename: str,
    mimetype: str,
    *,
    room_id: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """An encrypted ``m.file`` of ``plaintext`` sent in a served room, recorded by the
    relay: (mxc of the ciphertext, the event content)."""
    ciphertext, enc = encrypt_attachment(plaintext)
    mxc = await user.upload(ciphertext, "application/octet-stream")
    content = {
        "msgtype": "m.file",
        "body": filename,
        "file": encrypted_file_json(mxc, enc),
        "info": {"mimetype": mimetype},
    }
    await user.send_message(room_id or await served_room(relay, user), content)
    await wait_recorded(relay, mxc)
    return mxc, content


async def wait_recorded(relay: Relay, mxc: str) -> None:
    store = relay.store
    assert store is not None
    media = parse_mxc(mxc)

    async def recorded() -> bool:
        return await store.media_record(media) is not None

    await eventually(recorded)


async def _bridge_call(
    session: aiohttp.ClientSession, relay: Relay, endpoint: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """POST ``payload`` to the bridge API as the test bridge (must succeed)."""
    async with session.post(
        f"{relay.internal_url}/_relay/v1/{endpoint}",
        json=payload,
        headers={"Authorization": f"Bearer {BRIDGE_TOKEN}"},
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    return dict(body)


async def sign(
    session: aiohttp.ClientSession, relay: Relay, mxc: str, **fields: Any
) -> dict[str, Any]:
    """A link from the bridge API (must succeed)."""
    return await _bridge_call(session, relay, "sign", {"mxc": mxc, **fields})


async def rewrite(
    session: aiohttp.ClientSession, relay: Relay, content: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """The event content as the bridge API rewrites it (must succeed)."""
    body = await _bridge_call(session, relay, "rewrite", {"content": content, **fields})
    return dict(body["content"])


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

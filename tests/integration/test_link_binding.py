"""A link serves the reference it was minted for, whatever mentions of its mxc come later.

Issue 13, finding 3: the newest mention used to decide every existing link's decryption
key, content type and filename, so anyone who could post in a served room could turn an
attachment's link into ciphertext served as ``attachment; filename=x.html``.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from relay.app import Relay
from relay.core.mxc import parse_mxc
from relay.media.pipeline import RECORD_TTL
from tests.harness import make_png
from tests.harness.encryption import encrypt_attachment, encrypted_file_json
from tests.harness.links import errcode, fetch, post_encrypted, post_media, rewrite, sign
from tests.harness.matrix_client import MatrixUser, image_content
from tests.harness.relay import StartRelay
from tests.harness.rooms import served_room
from tests.harness.waiting import eventually

pytestmark = pytest.mark.synapse


@pytest.fixture
async def relay(start_relay: StartRelay) -> Relay:
    return await start_relay()


async def wait_references(relay: Relay, mxc: str, count: int) -> None:
    store = relay.store
    assert store is not None
    media = parse_mxc(mxc)

    async def stored() -> bool:
        return len(await store.media_references(media)) == count

    await eventually(stored)


async def test_a_later_mention_does_not_change_an_encrypted_attachments_link(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """The link keeps its key, type and name after the mxc is re-posted with others."""
    room_id = await served_room(relay, alice)
    plaintext = b"quarterly report " * 100
    mxc, original = await post_encrypted(
        relay, alice, plaintext, "report.txt", "text/plain", room_id=room_id
    )
    link = (await rewrite(http_session, relay, original))["file_https"]

    _, other_key = encrypt_attachment(b"something else entirely")
    hostile = {
        "msgtype": "m.file",
        "body": "x.html",
        "file": encrypted_file_json(mxc, other_key),
        "info": {"mimetype": "text/html"},
    }
    await alice.send_message(room_id, hostile)
    await wait_references(relay, mxc, 2)

    status, headers, body = await fetch(http_session, link)
    assert (status, body) == (200, plaintext)
    assert headers["Content-Type"] == "text/plain"
    assert headers["Content-Disposition"] == "inline; filename=report.txt"


async def test_a_later_mention_does_not_rename_a_plain_link(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """A link signed without a filename keeps its event's name, not a later one's."""
    image = make_png(20, 20)
    room_id, mxc, _ = await post_media(relay, alice, image, "image/png", "cat.png")
    link = (await sign(http_session, relay, mxc))["url"]
    await alice.send_message(room_id, image_content(mxc, body="x.html", mimetype="text/html"))
    await wait_references(relay, mxc, 2)
    await asyncio.sleep(RECORD_TTL + 0.1)  # past the pipeline's memory of the references

    status, headers, body = await fetch(http_session, link)
    assert (status, body) == (200, image)
    assert headers["Content-Disposition"] == "inline; filename=cat.png"
    fresh = (await sign(http_session, relay, mxc))["url"]
    status, headers, _ = await fetch(http_session, fresh)
    assert status == 200
    assert "x.html" in headers["Content-Disposition"]


async def test_redacting_the_bound_event_ends_its_links_only(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """A redaction ends the links minted for its event; the other reference's links live."""
    image = make_png(22, 22)
    room_id, mxc, first_event = await post_media(relay, alice, image, "image/png", "a.png")
    first_link = (await sign(http_session, relay, mxc))["url"]
    await alice.send_message(room_id, image_content(mxc, body="b.png"))
    await wait_references(relay, mxc, 2)
    second_link = (await sign(http_session, relay, mxc))["url"]
    await alice.redact(room_id, first_event)
    await wait_references(relay, mxc, 1)

    async def first_gone() -> bool:
        return (await fetch(http_session, first_link))[0] == 410

    await eventually(first_gone)
    status, _, body = await fetch(http_session, first_link)
    assert (status, errcode(body)) == (410, "M_NOT_FOUND")
    status, headers, body = await fetch(http_session, second_link)
    assert (status, body) == (200, image)
    assert headers["Content-Disposition"] == "inline; filename=b.png"

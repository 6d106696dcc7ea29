"""The public listener's access log: one line per request, never the link (a capability)."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from relay.app import Relay
from tests.harness import make_png
from tests.harness.links import fetch, post_media, sign
from tests.harness.matrix_client import MatrixUser
from tests.harness.relay import StartRelay

pytestmark = pytest.mark.synapse


@pytest.fixture
async def relay(start_relay: StartRelay) -> Relay:
    return await start_relay()


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.access for r in caplog.records if r.name == "relay.access"]  # type: ignore[attr-defined]


async def test_a_served_link_is_one_line_without_its_token(
    relay: Relay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Method, kind, media, variant, status, bytes, time and client; no token, no MAC."""
    image = make_png(30, 30)
    _, mxc, _ = await post_media(relay, alice, image, "image/png", "cat.png")
    url = (await sign(http_session, relay, mxc))["url"]
    token = url.rsplit("/", 2)[-2]
    caplog.set_level(logging.INFO, logger="relay.access")
    status, _, body = await fetch(http_session, url, **{"X-Forwarded-For": "198.51.100.7"})
    assert (status, body) == (200, image)
    (line,) = access_records(caplog)
    assert line["method"] == "GET"
    assert (line["kind"], line["entry"]) == ("native", "relay")
    assert (line["media"], line["variant"]) == (mxc, "original")
    assert (line["status"], line["bytes"]) == (200, len(image))
    assert isinstance(line["ms"], float) and line["ms"] >= 0
    assert line["client"] == "198.51.100.7"
    assert token not in caplog.text and token.rsplit(".", 1)[-1] not in caplog.text
    assert relay.metrics.value("relay_public_request_seconds_count", {"kind": "native"}) == 1


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        ({"X-Real-IP": "203.0.113.9", "X-Forwarded-For": "192.0.2.1"}, "203.0.113.9"),
        ({"X-Forwarded-For": "192.0.2.1, 203.0.113.10"}, "203.0.113.10"),
        ({"X-Forwarded-For": "not-an-address"}, "-"),
        ({}, "127.0.0.1"),
    ],
)
async def test_client_address_is_the_proxys_word_and_never_free_text(
    relay: Relay,
    http_session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, str],
    client: str,
) -> None:
    """X-Real-IP, else the address the proxy appended last, else the peer; text is "-"."""
    caplog.set_level(logging.INFO, logger="relay.access")
    status, _, _ = await fetch(http_session, relay.public_url + "/1.forged.link", **headers)
    assert status in (403, 404)
    (line,) = access_records(caplog)
    assert line["client"] == client


async def test_a_forged_link_is_logged_without_its_path(
    relay: Relay, http_session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused links are logged with their status; nothing of the path is written."""
    caplog.set_level(logging.DEBUG)
    forged = "1.k1.9999999999.o.localhost.SomeMediaIdXYZ.AAAAAAAAAAAAAAAAAAAAAAAA"
    status, _, _ = await fetch(http_session, f"{relay.public_url}/{forged}")
    assert status == 403
    (line,) = access_records(caplog)
    assert (line["status"], line["media"], line["kind"]) == (403, "-", "native")
    assert "SomeMediaIdXYZ" not in caplog.text and "AAAAAAAAAAAAAAAAAAAAAAAA" not in caplog.text

"""Links that bridges mint themselves, served by a real relay in front of a real Synapse.

MediaProxy links come from the real matrix-appservice-bridge 11.2.0 (npm, see
tests/harness/mediaproxy_npm.py); heisenbridge checksums are heisenbridge 1.15.4's
formula (pinned by tests/unit/core/compat/test_heisenbridge.py); mautrix-go checksums are
the port of bridgev2/matrix/publicmedia.go at mautrix/go commit
d5223cdc8fcebace5f1de8d9b02f4f4568fc663d (pinned by tests/unit/core/compat/test_mautrix.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import random
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from PIL import Image

from relay.app import Relay
from relay.core.compat import heisenbridge, mautrix
from relay.core.mxc import MediaId, parse_mxc
from relay.http.headers import security_headers
from tests.harness import make_png
from tests.harness.fixtures import RelayPorts
from tests.harness.links import errcode, fetch, post_media
from tests.harness.matrix_client import MatrixUser
from tests.harness.mediaproxy_npm import MediaProxyMinter, install
from tests.harness.relay import MakeConfig, StartRelay
from tests.harness.waiting import eventually

pytestmark = pytest.mark.synapse

HB_KEY = "heisenbridge-media-key-" + "h" * 20
WA_KEY = "mautrix-signing-key-" + "w" * 20
SIG_KEY = "mautrix-other-key-" + "s" * 20
CSP = security_headers()["Content-Security-Policy"]


def _jwk(path: Path) -> Path:
    secret = base64.urlsafe_b64encode(secrets.token_bytes(64)).decode().rstrip("=")
    path.write_text(json.dumps({"kty": "oct", "k": secret, "alg": "HS512", "ext": True}))
    return path


@pytest.fixture(scope="session")
def npm_minter(tmp_path_factory: pytest.TempPathFactory) -> MediaProxyMinter:
    return install(tmp_path_factory.mktemp("npm"))


@pytest.fixture
def base(relay_ports: RelayPorts) -> str:
    return f"http://127.0.0.1:{relay_ports.public}"


@pytest.fixture
def compat_section(tmp_path: Path, base: str) -> dict[str, object]:
    return {
        "mediaproxy": [
            {
                "name": "irc-a",
                "url": f"{base}/irc/",
                "signing_key_path": str(_jwk(tmp_path / "a.jwk")),
            },
            {"name": "irc-b", "url": f"{base}/", "signing_key_path": str(_jwk(tmp_path / "b.jwk"))},
        ],
        "heisenbridge": [{"name": "hb", "url": f"{base}/hb/", "media_key": HB_KEY}],
        "mautrix_publicmedia": [
            {
                "name": "wa",
                "url": f"{base}/wa",
                "signing_key": WA_KEY,
                "hash_length": 16,
                "expiry": 3600,
            },
            {"name": "sig", "url": base, "signing_key": SIG_KEY},
        ],
        "legacy_media": True,
    }


@pytest.fixture
async def relay(
    start_relay: StartRelay, make_config: MakeConfig, compat_section: dict[str, object]
) -> Relay:
    return await start_relay(make_config(compat=compat_section))


def unique_png(size: int = 40) -> bytes:
    # Unique bytes: Synapse quarantines uploads matching quarantined media.
    return make_png(
        size, size, (random.randrange(256), random.randrange(256), random.randrange(256))
    )


def hb_link(base: str, mxc: str, *, prefix: str = "/hb", filename: str | None = None) -> str:
    path = heisenbridge.link_path(HB_KEY.encode(), parse_mxc(mxc), filename)
    return f"{base}{prefix}/{path}"


def wa_link(base: str, mxc: str, expires_at: int, *, prefix: str = "/wa") -> str:
    path = mautrix.link_path(WA_KEY.encode(), parse_mxc(mxc), 16, expires_at=expires_at)
    return f"{base}{prefix}/{path}"


def without(url: str, prefix: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path.removeprefix(prefix)}"


def upstream_requests(relay: Relay) -> float:
    total = 0.0
    for metric in relay.metrics.registry.collect():
        if metric.name == "relay_upstream_requests":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


async def test_heisenbridge_link_served_with_relay_headers_and_range(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession, base: str
) -> None:
    """A heisenbridge link gets the relay's headers, ETag, Range and HEAD, prefix optional."""
    data = unique_png()
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    # The filename segment is not signed by heisenbridge: the event's own name is served.
    url = hb_link(base, mxc, filename="evil.html")
    for link in (url, without(url, "/hb")):
        status, headers, body = await fetch(http_session, link)
        assert (status, body) == (200, data)
        assert headers["Content-Type"] == "image/png"
        assert headers["Content-Disposition"] == "inline; filename=cat.png"
        assert headers["Content-Security-Policy"] == CSP
        assert headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        assert headers["Cache-Control"].startswith("private, max-age=")
    status, headers, body = await fetch(http_session, url, Range="bytes=0-9")
    assert (status, body) == (206, data[:10])
    assert headers["Content-Range"] == f"bytes 0-9/{len(data)}"
    status, headers, body = await fetch(http_session, url, "HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(len(data)))
    labels = {"kind": "heisenbridge", "entry": "hb", "status": "200"}
    assert relay.metrics.value("relay_link_requests", labels) == 3  # two GETs and the HEAD
    assert relay.metrics.value("relay_link_requests", {**labels, "status": "206"}) == 1


async def test_forged_links_are_403_and_nothing_is_served(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession, base: str
) -> None:
    """Another key, a flipped character or another kind's checksum: 403 M_FORBIDDEN, no body."""
    data = unique_png()
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    media = parse_mxc(mxc)
    other = heisenbridge.checksum(b"another-bridge-media-key", media)
    forged = [
        f"{base}/hb/_heisenbridge/media/{media.server_name}/{media.media_id}/{other}",
        f"{base}/_mautrix/publicmedia/{media.server_name}/{media.media_id}/"
        + mautrix.checksum(b"not-the-key-of-any-entry", media, 32),
        f"{base}/irc/v1/media/download/AQ" + "A" * 120,
        # wrong kind: heisenbridge's valid checksum on the mautrix path, and back
        f"{base}/_mautrix/publicmedia/{media.server_name}/{media.media_id}/"
        + heisenbridge.checksum(HB_KEY.encode(), media),
        f"{base}/_heisenbridge/media/{media.server_name}/{media.media_id}/"
        + mautrix.checksum(WA_KEY.encode(), media, 16, int(time.time()) + 60),
    ]
    for url in forged:
        status, _, body = await fetch(http_session, url)
        assert status == 403, url
        assert errcode(body) == "M_FORBIDDEN"
        assert data not in body
    assert (
        relay.metrics.value(
            "relay_link_requests", {"kind": "heisenbridge", "entry": "hb", "status": "403"}
        )
        == 2
    )


async def test_mautrix_links_with_and_without_expiry(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession, base: str
) -> None:
    """Minted seconds ago → 200 (mautrix-go refuses these); expired → 410; no-expiry entry."""
    data = unique_png()
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    minted_earlier = wa_link(base, mxc, int(time.time()) - 30 + 3600)
    for url in (minted_earlier, without(minted_earlier, "/wa"), minted_earlier + "/cat.png"):
        status, _, body = await fetch(http_session, url)
        assert (status, body) == (200, data), url
    status, _, body = await fetch(http_session, wa_link(base, mxc, int(time.time()) - 5))
    assert (status, errcode(body)) == (410, "M_NOT_FOUND")
    # The second entry (no expiry, 32-byte MAC, no URL prefix) shares the unprefixed path.
    path = mautrix.link_path(SIG_KEY.encode(), parse_mxc(mxc), 32)
    status, _, body = await fetch(http_session, f"{base}/{path}")
    assert (status, body) == (200, data)
    assert (
        relay.metrics.value(
            "relay_link_requests", {"kind": "mautrix_publicmedia", "entry": "sig", "status": "200"}
        )
        == 1
    )


async def test_real_mediaproxy_links(
    relay: Relay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    base: str,
    tmp_path: Path,
    npm_minter: MediaProxyMinter,
) -> None:
    """generateMediaUrl links: two entries, prefix optional, tampered 403, expired 410."""
    data = unique_png()
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    a = npm_minter.mint(tmp_path / "a.jwk", f"{base}/irc/", 60_000, mxc)
    b = npm_minter.mint(tmp_path / "b.jwk", f"{base}/", 0, mxc)  # no expiry
    assert urlsplit(a).path.startswith("/irc/v1/media/download/")
    for url in (a, without(a, "/irc"), b):
        status, headers, body = await fetch(http_session, url)
        assert (status, body) == (200, data), url
        assert headers["Content-Security-Policy"] == CSP
    token = urlsplit(a).path.rpartition("/")[2]
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[5] ^= 1  # the byte matrix-appservice-bridge 11.2.0 lets through (unawaited verify)
    flipped = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    status, _, body = await fetch(http_session, f"{base}/irc/v1/media/download/{flipped}")
    assert (status, errcode(body)) == (403, "M_FORBIDDEN")
    expired = npm_minter.mint(tmp_path / "a.jwk", f"{base}/irc/", -1000, mxc)
    status, _, body = await fetch(http_session, expired)
    assert (status, errcode(body)) == (410, "M_NOT_FOUND")
    assert (
        relay.metrics.value(
            "relay_link_requests", {"kind": "mediaproxy", "entry": "irc-b", "status": "200"}
        )
        == 1
    )


async def test_unseen_media_is_404_without_an_upstream_request(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession, base: str
) -> None:
    """Media uploaded but never posted in a served room: every kind answers 404, Synapse unasked."""
    mxc = await alice.upload(unique_png(), "image/png", "secret.png")
    media = parse_mxc(mxc)
    before = upstream_requests(relay)
    urls = [
        hb_link(base, mxc),
        wa_link(base, mxc, int(time.time()) + 600),
        f"{base}/_matrix/media/v3/download/{media.server_name}/{media.media_id}",
        f"{base}/_matrix/media/r0/thumbnail/{media.server_name}/{media.media_id}?width=32&height=32",
    ]
    for url in urls:
        status, _, body = await fetch(http_session, url)
        assert (status, errcode(body)) == (404, "M_NOT_FOUND"), url
    assert upstream_requests(relay) == before


async def test_redacted_media_is_410_everywhere(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession, base: str
) -> None:
    """After the redaction, heisenbridge, mautrix and legacy links all answer 410."""
    data = unique_png()
    room_id, mxc, event_id = await post_media(relay, alice, data, "image/png", "cat.png")
    media = parse_mxc(mxc)
    urls = [
        hb_link(base, mxc),
        wa_link(base, mxc, int(time.time()) + 600),
        f"{base}/_matrix/media/v3/download/{media.server_name}/{media.media_id}",
    ]
    for url in urls:
        assert (await fetch(http_session, url))[0] == 200, url
    await alice.redact(room_id, event_id)

    async def revoked() -> bool:
        return (await fetch(http_session, urls[0]))[0] == 410

    await eventually(revoked)
    for url in urls:
        status, _, body = await fetch(http_session, url)
        assert (status, errcode(body)) == (410, "M_NOT_FOUND"), url
        assert data not in body


async def test_legacy_paths_serve_seen_media_and_render_thumbnails(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession, base: str
) -> None:
    """r0 and v3 download (filename ignored) and a relay-rendered thumbnail; bad queries 400."""
    data = unique_png(96)
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    media = parse_mxc(mxc)
    root = f"{base}/_matrix/media"
    for url in (
        f"{root}/r0/download/{media.server_name}/{media.media_id}",
        f"{root}/v3/download/{media.server_name}/{media.media_id}/other.html",
    ):
        status, headers, body = await fetch(http_session, url)
        assert (status, body) == (200, data), url
        assert headers["Content-Disposition"] == "inline; filename=cat.png"
    status, headers, body = await fetch(
        http_session,
        f"{root}/v3/thumbnail/{media.server_name}/{media.media_id}?width=32&height=24&method=crop",
    )
    assert status == 200
    assert Image.open(io.BytesIO(body)).size == (32, 24)
    for query, code in (
        ("width=32", "M_MISSING_PARAM"),
        ("width=0&height=5", "M_INVALID_PARAM"),
        ("width=5&height=5&method=zoom", "M_INVALID_PARAM"),
    ):
        status, _, body = await fetch(
            http_session, f"{root}/v3/thumbnail/{media.server_name}/{media.media_id}?{query}"
        )
        assert (status, errcode(body)) == (400, code), query
    assert (
        relay.metrics.value(
            "relay_link_requests",
            {"kind": "legacy_media", "entry": "legacy_media", "status": "200"},
        )
        == 3
    )


async def test_require_seen_false_serves_unseen_bridge_links_but_not_legacy(
    start_relay: StartRelay,
    make_config: MakeConfig,
    compat_section: dict[str, object],
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    base: str,
) -> None:
    """signing.require_seen: false lets signed bridge links through; legacy paths stay seen-only."""
    relay = await start_relay(
        make_config(
            compat=compat_section,
            signing={"require_seen": False},
        )
    )
    data = unique_png()
    mxc = await alice.upload(data, "image/png", "unposted.png")
    media = parse_mxc(mxc)
    status, _, body = await fetch(http_session, hb_link(base, mxc))
    assert (status, body) == (200, data)
    url = f"{base}/_matrix/media/v3/download/{media.server_name}/{media.media_id}"
    status, _, body = await fetch(http_session, url)
    assert (status, errcode(body)) == (404, "M_NOT_FOUND")
    assert relay.config.signing.require_seen is False


async def test_compat_is_off_by_default(
    start_relay: StartRelay, alice: MatrixUser, http_session: aiohttp.ClientSession, base: str
) -> None:
    """Without a compat section, bridge paths and legacy paths are unknown routes."""
    relay = await start_relay()
    data = unique_png()
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    media = parse_mxc(mxc)
    for url in (
        hb_link(base, mxc, prefix=""),
        f"{base}/_matrix/media/v3/download/{media.server_name}/{media.media_id}",
    ):
        status, _, body = await fetch(http_session, url)
        assert (status, errcode(body)) == (404, "M_UNRECOGNIZED"), url


def test_media_id_helper() -> None:
    """The helpers build the paths the bridges document (sanity of the test itself)."""
    media = MediaId("localhost", "abc")
    assert hb_link("http://x", str(media)).startswith(
        "http://x/hb/_heisenbridge/media/localhost/abc/"
    )


async def test_a_remembered_link_still_expires(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession, base: str
) -> None:
    """A link that verified (and is remembered) answers 410 once its expiry second is over."""
    data = unique_png()
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    expires_at = int(time.time()) + 1
    url = wa_link(base, mxc, expires_at)
    for _ in range(2):  # the second answer comes from the remembered verification
        assert (await fetch(http_session, url))[0] == 200
    await asyncio.sleep(max(0.0, expires_at + 1 - time.time()) + 0.05)
    status, _, body = await fetch(http_session, url)
    assert (status, errcode(body)) == (410, "M_NOT_FOUND")
    assert data not in body

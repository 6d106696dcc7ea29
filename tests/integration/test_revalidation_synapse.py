"""Revalidation against the real Synapse: removed media stops, present media costs one check
per interval, and nothing is served that the homeserver no longer serves."""

from __future__ import annotations

import secrets
import time

import aiohttp
import pytest

from relay.app import Relay
from relay.core.mxc import parse_mxc
from relay.media.downloads import MediaSource
from relay.store.takedown import HOMESERVER, Takedowns
from tests.harness import make_png
from tests.harness.links import errcode, fetch, post_media, sign
from tests.harness.matrix_client import MatrixUser
from tests.harness.relay import MakeConfig, StartRelay

pytestmark = pytest.mark.synapse

INTERVAL = 1.0
ADMIN_MEDIA = "/_synapse/admin/v1/media"


def unique_png() -> bytes:
    # Synapse quarantines re-uploads of quarantined bytes at once: every test's differ.
    return make_png(
        24, 24, (secrets.randbelow(256), secrets.randbelow(256), secrets.randbelow(256))
    )


@pytest.fixture
async def relay(make_config: MakeConfig, start_relay: StartRelay) -> Relay:
    return await start_relay(make_config(media={"revalidate_after": INTERVAL}))


def upstream(relay: Relay) -> tuple[float, float]:
    """(revalidations that found the media present, upstream requests answered ok)."""
    m = relay.metrics
    return (
        m.value("relay_revalidations", {"outcome": "present"}),
        m.value("relay_upstream_requests", {"outcome": "ok"}),
    )


@pytest.mark.parametrize("removal", ["quarantine", "delete"])
async def test_removed_media_stops_within_the_interval(
    relay: Relay,
    alice: MatrixUser,
    make_user: object,
    http_session: aiohttp.ClientSession,
    removal: str,
) -> None:
    """Quarantined or admin-deleted media: 404/410 within revalidate_after + 1 s, then 410,
    purged here, revoked for every process (source homeserver)."""
    admin = await make_user("admin", admin=True)  # type: ignore[operator]
    data = unique_png()
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    url = (await sign(http_session, relay, mxc))["url"]
    thumb = (await sign(http_session, relay, mxc, thumbnail={"width": 16, "height": 16}))["url"]
    for link in (url, thumb):
        assert (await fetch(http_session, link))[0] == 200
    media = parse_mxc(mxc)
    assert relay.media_source is not None
    assert MediaSource.cache_key(media) in relay.media_source.cache

    path = f"{ADMIN_MEDIA}/{media.server_name}/{media.media_id}"
    if removal == "quarantine":
        await admin.request(
            "POST", f"{ADMIN_MEDIA}/quarantine/{media.server_name}/{media.media_id}"
        )
    else:
        await admin.request("DELETE", path)
    removed_at = time.monotonic()
    while True:
        status, _, body = await fetch(http_session, url)
        if status != 200:
            break
        assert body == data
        assert time.monotonic() - removed_at < INTERVAL + 1, "still served"
    assert time.monotonic() - removed_at <= INTERVAL + 1
    assert status in (404, 410) and errcode(body) == "M_NOT_FOUND"
    assert data not in body
    for link in (url, thumb):
        status, _, body = await fetch(http_session, link)
        assert status == 410 and data not in body
    assert MediaSource.cache_key(media) not in relay.media_source.cache
    assert relay.media_source.cache.oldest(media.server_name, media.media_id) is None
    assert relay.store is not None
    assert await Takedowns(relay.store.db).source(media) == HOMESERVER
    assert relay.metrics.value("relay_upstream_removals") == 1
    assert relay.metrics.value("relay_revocations_by_source", {"source": HOMESERVER}) == 1


async def test_a_stream_of_hits_costs_one_check_per_interval(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """Present media keeps working; 3.5 intervals of hits make 3 (at most 4) upstream checks."""
    data = unique_png()
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    url = (await sign(http_session, relay, mxc))["url"]
    assert (await fetch(http_session, url))[0] == 200  # the download: cached from here on
    started = time.monotonic()
    before = upstream(relay)
    hits = 0
    while time.monotonic() - started < 3.5 * INTERVAL:
        status, _, body = await fetch(http_session, url)
        assert (status, body) == (200, data)
        hits += 1
    checks, ok_requests = (a - b for a, b in zip(upstream(relay), before, strict=True))
    assert hits > 50
    assert 3 <= checks <= 4, checks
    assert ok_requests == checks  # no download: every upstream request was a check
    assert relay.metrics.value("relay_revalidations", {"outcome": "gone"}) == 0

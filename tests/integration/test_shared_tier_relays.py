"""Two relays (own cache directories, one PostgreSQL, one bucket) against the real Synapse:
what one downloads or renders, the other serves from the bucket; a revocation empties it."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import aiohttp
import pytest

from relay.app import Relay
from relay.core.exit_codes import EXIT_OK
from relay.core.mxc import parse_mxc
from relay.core.variant import Thumbnail, variant_key
from relay.media.downloads import MediaSource
from relay.media.renditions import derived_key
from relay.media.shared_tier import media_folder, object_name
from tests.harness import make_png
from tests.harness.links import errcode, fetch, post_and_sign, post_encrypted, rewrite, run_cli
from tests.harness.matrix_client import MatrixUser
from tests.harness.relay import RelayPair, on
from tests.harness.s3_server import S3Store
from tests.harness.waiting import eventually

pytestmark = [pytest.mark.synapse, pytest.mark.postgres]


async def _pair(relay_pair: RelayPair, s3_store: S3Store) -> tuple[Relay, Relay]:
    """Relay A (the harness's own) and relay B (own cache, ports), both on the bucket."""
    first, second = await relay_pair(store=s3_store.config.model_dump())
    assert first.config.media.cache_dir != second.config.media.cache_dir
    return first, second


def _upstream(relay: Relay) -> float:
    """Every request the relay made to the homeserver (downloads and probes, any outcome)."""
    samples = relay.metrics.registry.get_sample_value
    outcomes = ("ok", "not_found", "too_large", "rate_limited", "unauthorized")
    outcomes += ("upstream_error", "timeout")
    return sum(
        samples("relay_upstream_requests_total", {"outcome": outcome}) or 0.0
        for outcome in outcomes
    )


async def _revoke_everywhere(
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
    mxc: str,
    links: list[str],
    s3_store: S3Store,
) -> None:
    """``media-relay revoke``: the bucket loses the item's folder, both relays answer 410."""
    code, _, err = await run_cli(tmp_path / "config.yaml", "revoke", mxc)
    assert code == EXIT_OK, err
    media = parse_mxc(mxc)
    folder = f"{s3_store.config.prefix}{media_folder(media.server_name, media.media_id)}/"

    async def gone() -> bool:
        return s3_store.listing(folder) == [] and all(
            [(await fetch(http_session, link))[0] == 410 for link in links]
        )

    await eventually(gone, within=5.0, interval=0.05)
    for link in links:
        status, _, body = await fetch(http_session, link)
        assert (status, errcode(body)) == (410, "M_NOT_FOUND")


async def test_a_thumbnail_rendered_by_one_relay_is_served_by_the_other(
    relay_pair: RelayPair,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
    s3_store: S3Store,
) -> None:
    """A renders the thumbnail and copies it up; B serves the same bytes from the bucket,
    rendering nothing and asking the homeserver nothing; a revocation empties the bucket."""
    first, second = await _pair(relay_pair, s3_store)
    color = (secrets.randbelow(256), secrets.randbelow(256), 40)
    thumb = {"width": 48, "height": 32, "method": "scale"}
    _, mxc, _, url = await post_and_sign(
        http_session, first, alice, make_png(96, 64, color), "image/png", "cat.png", thumbnail=thumb
    )
    status, headers_a, body_a = await fetch(http_session, url)
    assert status == 200 and headers_a["Content-Type"] == "image/jpeg"  # no alpha: JPEG
    key = derived_key(
        MediaSource.cache_key(parse_mxc(mxc)), variant_key(Thumbnail(48, 32, "scale"))
    )
    name = f"{s3_store.config.prefix}{object_name(key)}"

    async def copied_up() -> bool:
        return name in s3_store.listing()

    await eventually(copied_up, within=10)

    before = _upstream(second)
    status, headers_b, body_b = await fetch(http_session, on(second, url, first))
    assert status == 200
    assert body_b == body_a
    assert headers_b["Content-Type"] == headers_a["Content-Type"]
    assert headers_b["Content-Disposition"] == headers_a["Content-Disposition"]
    assert second.metrics.value("relay_thumbnails_generated") == 0
    assert _upstream(second) == before
    hits = second.metrics.value("relay_tier_requests", {"op": "get", "outcome": "hit"})
    assert hits == 1
    assert second.media_source is not None and key in second.media_source.cache

    await _revoke_everywhere(http_session, tmp_path, mxc, [url, on(second, url, first)], s3_store)
    assert key not in second.media_source.cache


async def test_an_original_downloaded_by_one_relay_is_served_by_the_other(
    relay_pair: RelayPair,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
    s3_store: S3Store,
) -> None:
    """A downloads the original once; B serves identical bytes from the bucket with no
    upstream request; a revocation purges the bucket and both relays answer 410."""
    first, second = await _pair(relay_pair, s3_store)
    data = secrets.token_bytes(3 * 1024 * 1024 + 17)
    _, mxc, _, url = await post_and_sign(
        http_session, first, alice, data, "application/octet-stream", "data.bin"
    )
    status, _, body = await fetch(http_session, url)
    assert (status, body) == (200, data)
    assert first.metrics.value("relay_upstream_requests", {"outcome": "ok"}) == 1
    name = f"{s3_store.config.prefix}{object_name(MediaSource.cache_key(parse_mxc(mxc)))}"

    async def copied_up() -> bool:
        return name in s3_store.listing()

    await eventually(copied_up, within=10)
    assert s3_store.read(name)[0] == data

    started = time.monotonic()
    status, headers, body = await fetch(http_session, on(second, url, first))
    assert (status, body) == (200, data)
    assert headers["Content-Type"] == "application/octet-stream"
    assert _upstream(second) == 0
    assert second.metrics.value("relay_tier_requests", {"op": "get", "outcome": "hit"}) == 1
    assert time.monotonic() - started < 10

    await _revoke_everywhere(http_session, tmp_path, mxc, [url, on(second, url, first)], s3_store)


async def test_plaintext_of_an_encrypted_attachment_stays_off_the_bucket(
    relay_pair: RelayPair,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    s3_store: S3Store,
) -> None:
    """Both relays serve the decrypted file, each from its own download: the bucket never
    gets the plaintext (nor anything of it: the ciphertext is not kept either)."""
    first, second = await _pair(relay_pair, s3_store)
    plaintext = b"the minutes of a private meeting " * 4096
    mxc, content = await post_encrypted(first, alice, plaintext, "minutes.txt", "text/plain")
    link = (await rewrite(http_session, first, content, type="m.room.message"))["file_https"]
    for relay in (first, second):
        status, _, body = await fetch(http_session, on(relay, link, first))
        assert (status, body) == (200, plaintext)
    # Nothing was even scheduled: MediaSource asks tier.holds() when it commits.
    for relay in (first, second):
        assert relay.metrics.value("relay_tier_requests", {"op": "put", "outcome": "ok"}) == 0
        assert relay.metrics.value("relay_tier_requests", {"op": "get", "outcome": "miss"}) == 0
    assert second.metrics.value("relay_upstream_requests", {"outcome": "ok"}) == 1
    media = parse_mxc(mxc)
    assert (
        s3_store.listing(
            f"{s3_store.config.prefix}{media_folder(media.server_name, media.media_id)}/"
        )
        == []
    )
    for name in s3_store.listing():
        assert plaintext[:64] not in s3_store.read(name)[0]

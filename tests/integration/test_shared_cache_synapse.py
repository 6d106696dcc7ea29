"""Two relays on one PostgreSQL sharing one ``media.cache_dir``, against the real Synapse.

The two relays run in this process (tests/harness/relay.py), each with its own cache
index and its own lock descriptors: ``flock`` between separate open files excludes
them as it would two processes (test_shared_cache runs OS processes over the stub).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from relay.app import Relay
from relay.core.mxc import parse_mxc
from relay.media.cache_layout import CacheKey
from tests.harness.links import fetch, post_and_sign
from tests.harness.matrix_client import MatrixUser
from tests.harness.relay import RelayPair, on
from tests.harness.waiting import eventually

pytestmark = pytest.mark.synapse


def _downloads(relay: Relay) -> float:
    return relay.metrics.value("relay_upstream_requests", {"outcome": "ok"})


def _entries(cache_dir: Path, key: CacheKey) -> list[str]:
    shard = cache_dir / key.media_digest()[:2]
    prefix = key.media_digest()
    return sorted(p.name for p in shard.glob(f"{prefix}-*")) if shard.exists() else []


async def test_two_relays_share_one_cache_download_once_and_purge_together(
    relay_pair: RelayPair, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """20 concurrent cold requests over two relays on one cache directory: one download
    from Synapse, 20 complete bodies; a redaction ingested by one relay empties the
    shared directory of the media, and both answer 410."""
    first, second = await relay_pair(share_cache=True)
    cache_dir = Path(first.config.media.cache_dir)

    body = os.urandom(3 * 1024 * 1024)
    room_id, mxc, event_id, url = await post_and_sign(
        http_session, first, alice, body, "video/mp4", "clip.mp4"
    )
    links = [url, on(second, url, first)]
    answers = await asyncio.gather(*(fetch(http_session, links[i % 2]) for i in range(20)))
    assert all((status, got) == (200, body) for status, _, got in answers)
    assert _downloads(first) + _downloads(second) == 1
    media = parse_mxc(mxc)
    key = CacheKey(media.server_name, media.media_id, "original")
    assert len(_entries(cache_dir, key)) == 2  # one body, one sidecar, for both relays

    await alice.redact(room_id, event_id)

    async def gone_everywhere() -> bool:
        statuses = [(await fetch(http_session, link))[0] for link in links]
        return statuses == [410, 410] and not _entries(cache_dir, key)

    await eventually(gone_everywhere, within=5, interval=0.05)

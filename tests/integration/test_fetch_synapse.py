"""Fetcher, cache and single-flight against the real Synapse, with the appservice's token.

Observed on Synapse 1.163: the as_token downloads media through
``/_matrix/client/v1/media/download`` without the sender user being registered first.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from relay.core.mxc import MediaId, parse_mxc
from relay.devtools.local_synapse import LocalSynapse
from relay.media.attachments import CiphertextHashMismatch
from relay.media.cache import MediaCache
from relay.media.downloads import MediaSource
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.errors import OUTCOMES, UpstreamNotFound, UpstreamTooLarge, UpstreamUnauthorized
from relay.upstream.fetcher import MediaFetcher, Timeouts
from tests.harness.cache import read_body
from tests.harness.encryption import EncryptedAttachment, encrypt_attachment
from tests.harness.fixtures import RelayRegistration
from tests.harness.matrix_client import MatrixUser

pytestmark = pytest.mark.synapse


@dataclass
class RelayParts:
    fetcher: MediaFetcher
    cache: MediaCache
    source: MediaSource
    metrics: Metrics
    capabilities: Capabilities


MakeParts = Callable[..., Awaitable[RelayParts]]


@pytest_asyncio.fixture
async def make_parts(
    synapse: LocalSynapse,
    relay_registration: RelayRegistration,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
) -> AsyncIterator[MakeParts]:
    """Factory: fetcher + cache + source over Synapse; every call is a fresh 'process'."""
    sources: list[MediaSource] = []

    async def factory(
        *, max_size: int = 64 << 20, token: str | None = None, cache_dir: Path | None = None
    ) -> RelayParts:
        metrics = Metrics()
        as_token = token or relay_registration.as_token
        caps = Capabilities(synapse.base_url, as_token)
        fetcher = MediaFetcher(
            http_session,
            synapse.base_url,
            as_token,
            caps,
            metrics,
            max_size=max_size,
            timeouts=Timeouts(connect=10, read=30, total=120),
        )
        cache = MediaCache(cache_dir or tmp_path / "cache", 256 << 20, metrics)
        await cache.start()
        source = MediaSource(fetcher, cache, metrics)
        sources.append(source)
        return RelayParts(fetcher, cache, source, metrics, caps)

    yield factory
    for source in sources:
        await source.close()


def _requests(metrics: Metrics) -> dict[str, float]:
    counts = {o: metrics.value("relay_upstream_requests", {"outcome": o}) for o in OUTCOMES}
    return {o: c for o, c in counts.items() if c}


def _cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_fetched_bytes_equal_upload(make_parts: MakeParts, alice: MatrixUser) -> None:
    """Bytes fetched as the appservice equal the upload, with type and file name."""
    data = os.urandom(300_000)
    media = parse_mxc(await alice.upload(data, "image/png", "holiday.png"))
    parts = await make_parts()
    body = await parts.source.open(media)
    assert await read_body(body) == data
    assert body.content_type == "image/png"
    assert body.filename == "holiday.png"
    assert parts.capabilities.authenticated_media is True
    assert parts.capabilities.identity_ok is True
    assert parts.capabilities.max_upload_size is not None
    assert _requests(parts.metrics) == {"ok": 1}
    assert parts.metrics.value("relay_upstream_bytes") == len(data)
    entry = parts.cache.lookup(parts.source.cache_key(media))
    assert entry is not None
    assert entry.sha256 == hashlib.sha256(data).hexdigest()


async def test_fifty_concurrent_requests_one_download(
    make_parts: MakeParts, alice: MatrixUser
) -> None:
    """50 concurrent requests for uncached media: one upstream request, identical bytes."""
    # Under 1 MiB: the harness uploads raw bytes, which aiohttp warns about past that.
    data = os.urandom(1_000_000)
    media = parse_mxc(await alice.upload(data, "video/mp4", "clip.mp4"))
    parts = await make_parts()

    async def fetch() -> bytes:
        return await read_body(await parts.source.open(media))

    results = await asyncio.gather(*(fetch() for _ in range(50)))
    assert all(r == data for r in results)
    assert _requests(parts.metrics) == {"ok": 1}
    assert parts.metrics.value("relay_coalesced_waiters") == 49
    assert parts.metrics.value("relay_upstream_bytes") == len(data)


async def test_size_cap_stops_download_and_caches_nothing(
    make_parts: MakeParts, alice: MatrixUser, tmp_path: Path
) -> None:
    """Media over media.max_size is refused and leaves no cache entry or temp file."""
    media = parse_mxc(await alice.upload(os.urandom(50_000), "image/png"))
    parts = await make_parts(max_size=10_000)
    with pytest.raises(UpstreamTooLarge):
        await read_body(await parts.source.open(media))
    assert _requests(parts.metrics) == {"too_large": 1}
    assert len(parts.cache) == 0
    assert _cache_files(tmp_path / "cache") == []


async def test_missing_media_then_negative_cache(
    make_parts: MakeParts, synapse: LocalSynapse
) -> None:
    """Unknown media is not found, and repeats are answered from the negative cache."""
    parts = await make_parts()
    media = MediaId(synapse.server_name, "doesNotExistAtAll123")
    with pytest.raises(UpstreamNotFound):
        await parts.source.open(media)
    with pytest.raises(UpstreamNotFound):
        await parts.source.open(media)
    assert _requests(parts.metrics) == {"not_found": 1}
    assert parts.metrics.value("relay_negative_cache_hits") == 1
    err = UpstreamNotFound("x").to_matrix_error()
    assert (err.status, err.errcode) == (404, "M_NOT_FOUND")


async def test_cache_used_after_restart(make_parts: MakeParts, alice: MatrixUser) -> None:
    """New MediaCache/MediaSource instances over the same directory serve from the cache."""
    data = os.urandom(100_000)
    media = parse_mxc(await alice.upload(data, "application/pdf", "doc.pdf"))
    first = await make_parts()
    assert await read_body(await first.source.open(media)) == data
    second = await make_parts()
    body = await second.source.open(media)
    assert body.path is not None
    assert await read_body(body) == data
    assert body.content_type == "application/pdf"
    assert _requests(second.metrics) == {}
    assert second.metrics.value("relay_cache_hits") == 1


async def test_encrypted_attachment_round_trip(
    make_parts: MakeParts, alice: MatrixUser, tmp_path: Path
) -> None:
    """Ciphertext uploaded to Synapse decrypts through the relay; a wrong hash is refused."""
    plaintext = os.urandom(700_000)
    ciphertext, enc = encrypt_attachment(plaintext)
    media = parse_mxc(await alice.upload(ciphertext, "application/octet-stream"))
    parts = await make_parts()
    tampered = EncryptedAttachment(enc.key, enc.iv, hashlib.sha256(b"other").digest())
    with pytest.raises(CiphertextHashMismatch):
        await parts.source.open(media, tampered)
    assert len(parts.cache) == 0
    assert _cache_files(tmp_path / "cache") == []
    body = await parts.source.open(media, enc)
    assert await read_body(body) == plaintext
    assert body.sha256 == hashlib.sha256(plaintext).hexdigest()
    # Plaintext and ciphertext never share a cache key.
    assert parts.cache.lookup(parts.source.cache_key(media)) is None
    assert await read_body(await parts.source.open(media)) == ciphertext


async def test_bad_token_breaks_identity(make_parts: MakeParts, alice: MatrixUser) -> None:
    """A token Synapse does not know: UpstreamUnauthorized and identity_ok is False."""
    media = parse_mxc(await alice.upload(b"private", "text/plain"))
    parts = await make_parts(token="not-the-as-token")
    with pytest.raises(UpstreamUnauthorized) as info:
        await parts.source.open(media)
    assert info.value.status == 502
    assert parts.capabilities.identity_ok is False
    assert _requests(parts.metrics) == {"unauthorized": 1}
    assert len(parts.cache) == 0

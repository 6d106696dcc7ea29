"""relay.media.shared_tier against a real S3-protocol server (moto's, started by the harness)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from relay.config.media_settings import ObjectStoreConfig
from relay.devtools.local_synapse import free_ports
from relay.media.attachments import plaintext_variant
from relay.media.cache import MediaCache
from relay.media.cache_layout import CacheEntry, CacheKey
from relay.media.renditions import derived_key
from relay.media.shared_tier import BucketTier, media_folder, object_name
from relay.media.tiers import SharedTier
from relay.s3.bucket import S3Bucket, S3Error
from relay.support.metrics import Metrics
from tests.harness.cache import put_bytes, started_cache
from tests.harness.encryption import encrypt_attachment
from tests.harness.s3_server import SECRET_KEY, S3Store, store_config
from tests.harness.waiting import eventually

ORIGINAL = CacheKey("example.org", "abc", "original")
THUMB = derived_key(ORIGINAL, "thumb-64x48-crop")
OTHER = CacheKey("example.org", "abcd", "original")


async def _tier(
    config: ObjectStoreConfig, *, sweep_interval: float = 60.0, purge_retry: float = 30.0
) -> tuple[BucketTier, Metrics]:
    metrics = Metrics()
    tier = BucketTier(
        S3Bucket(config),
        metrics,
        max_size=config.max_size,
        sweep_interval=sweep_interval,
        purge_retry=purge_retry,
    )
    await tier.start()
    return tier, metrics


@pytest_asyncio.fixture
async def cache(tmp_path: Path) -> MediaCache:
    return (await started_cache(tmp_path / "cache", 64 << 20))[0]


@pytest_asyncio.fixture
async def tier(s3_store: S3Store) -> AsyncIterator[tuple[BucketTier, Metrics]]:
    started = await _tier(s3_store.config)
    yield started
    await started[0].close()


async def _entry(cache: MediaCache, key: CacheKey, data: bytes, **meta: str) -> CacheEntry:
    entry = await put_bytes(
        cache, key, data, meta.get("content_type", "image/png"), meta.get("filename")
    )
    assert entry is not None
    return entry


async def _read(tier: SharedTier, key: CacheKey) -> tuple[bytes, str, str | None] | None:
    found = await tier.get(key)
    if found is None:
        return None
    try:
        body = b"".join([chunk async for chunk in found.iter_chunks()])
    finally:
        await found.close()
    return body, found.content_type, found.filename


def _requests(metrics: Metrics, op: str, outcome: str) -> float:
    return metrics.value("relay_tier_requests", {"op": op, "outcome": outcome})


async def test_put_then_get(
    tier: tuple[BucketTier, Metrics], cache: MediaCache, s3_store: S3Store
) -> None:
    """A committed entry goes up under <prefix><media>/<variant> and reads back whole,
    with its type and (non-ASCII) filename; hits and puts are counted."""
    shared, metrics = tier
    data = secrets.token_bytes(50_000)
    entry = await _entry(cache, ORIGINAL, data, filename="caf\u00e9 \u00e0 l'eau.png")
    await shared.put(ORIGINAL, entry)
    folder = media_folder("example.org", "abc")
    assert s3_store.listing() == [f"relay-test/{folder}/{ORIGINAL.digest()}"]
    assert await _read(shared, ORIGINAL) == (data, "image/png", "caf\u00e9 \u00e0 l'eau.png")
    body, response = s3_store.read(f"relay-test/{object_name(ORIGINAL)}")
    assert body == data and response["Metadata"]["sha256"] == entry.sha256
    assert (_requests(metrics, "put", "ok"), _requests(metrics, "get", "hit")) == (1, 1)


async def test_the_same_bytes_are_not_uploaded_twice(
    tier: tuple[BucketTier, Metrics], cache: MediaCache
) -> None:
    """An entry the bucket is known to hold (put or read by this process) is not sent again."""
    shared, metrics = tier
    entry = await _entry(cache, ORIGINAL, b"once")
    await shared.put(ORIGINAL, entry)
    await shared.put(ORIGINAL, entry)
    assert _requests(metrics, "put", "ok") == 1


async def test_missing_object_is_none(tier: tuple[BucketTier, Metrics]) -> None:
    """Nothing stored: None, counted as a miss."""
    shared, metrics = tier
    assert await shared.get(THUMB) is None
    assert (_requests(metrics, "get", "miss"), _requests(metrics, "get", "error")) == (1, 0)


async def test_plaintext_of_encrypted_attachments_never_reaches_the_bucket(
    tier: tuple[BucketTier, Metrics], cache: MediaCache, s3_store: S3Store
) -> None:
    """Decrypted plaintext and its renditions are not held: no put, no get, not one request."""
    shared, metrics = tier
    _, enc = encrypt_attachment(b"the secret")
    plain = CacheKey("example.org", "abc", plaintext_variant(enc))
    for key in (plain, derived_key(plain, "thumb-32x32-crop"), derived_key(plain, "stripped")):
        assert not shared.holds(key)
        await shared.put(key, await _entry(cache, key, b"the secret"))
        assert await shared.get(key) is None
    assert s3_store.listing() == []
    assert metrics.value("relay_tier_requests", {"op": "put", "outcome": "ok"}) == 0
    assert _requests(metrics, "get", "miss") == 0
    assert shared.holds(ORIGINAL)


async def test_purge_removes_every_variant_of_the_item_only(
    tier: tuple[BucketTier, Metrics], cache: MediaCache, s3_store: S3Store
) -> None:
    """A purge deletes the item's folder (original and renditions); other items stay."""
    shared, metrics = tier
    for key in (ORIGINAL, THUMB, derived_key(ORIGINAL, "stripped"), OTHER):
        await shared.put(key, await _entry(cache, key, key.variant.encode()))
    assert await shared.purge("example.org", "abc") == 3
    folder = media_folder("example.org", "abc")
    assert s3_store.listing(f"relay-test/{folder}/") == []
    assert s3_store.listing() == [f"relay-test/{object_name(OTHER)}"]
    assert await shared.get(ORIGINAL) is None
    assert _requests(metrics, "purge", "ok") == 1
    # Revoked: a copy committed later (a download that was under way) never goes up.
    await shared.put(ORIGINAL, await _entry(cache, ORIGINAL, b"late"))
    assert s3_store.listing(f"relay-test/{folder}/") == []


async def test_a_copy_landing_after_the_purge_is_deleted(
    tier: tuple[BucketTier, Metrics], cache: MediaCache, s3_store: S3Store
) -> None:
    """A put under way when the item is purged cannot leave its object behind, whichever of
    the two reaches the store first."""
    shared, _ = tier
    entry = await _entry(cache, ORIGINAL, secrets.token_bytes(9 * 1024 * 1024))  # multipart
    put = asyncio.ensure_future(shared.put(ORIGINAL, entry))
    await asyncio.sleep(0)  # the put has begun (its start time is taken before any await)
    assert await shared.purge("example.org", "abc") == 0  # nothing there yet
    await put
    assert s3_store.listing() == []


@pytest.mark.parametrize(("max_size", "evicted"), [(25_000, 2), (0, 0)])
async def test_sweep_keeps_the_bucket_under_max_size(
    s3_store: S3Store, max_size: int, evicted: int
) -> None:
    """A sweep removes objects under the prefix until their total is under max_size (which
    ones: the unit test of to_evict) and counts them; objects outside the prefix neither
    count nor go; max_size 0 removes nothing."""
    config = s3_store.config.model_copy(update={"max_size": max_size})
    bucket = config.bucket
    s3_store.client.put_object(Bucket=bucket, Key="elsewhere/big", Body=b"e" * 100_000)
    for i in range(4):
        key = f"relay-test/{media_folder('example.org', f'm{i}')}/{i}"
        s3_store.client.put_object(Bucket=bucket, Key=key, Body=b"o" * 10_000)
    shared, metrics = await _tier(config)
    try:
        assert await shared.sweep() == evicted
        assert len(s3_store.listing("relay-test/")) == 4 - evicted
        assert s3_store.listing("elsewhere/") == ["elsewhere/big"]
        assert metrics.value("relay_tier_evictions") == evicted
        assert await shared.sweep() == 0
    finally:
        await shared.close()


async def test_the_leaders_sweep_job_keeps_evicting(s3_store: S3Store, cache: MediaCache) -> None:
    """sweep_forever (the leader's job) brings the bucket under max_size, and again after
    more objects arrive; putting alone never lists the bucket."""
    config = s3_store.config.model_copy(update={"max_size": 15_000})
    shared, metrics = await _tier(config, sweep_interval=0.2)
    job: asyncio.Future[None] | None = None
    try:
        for i in range(3):
            s3_store.client.put_object(
                Bucket=config.bucket, Key=f"relay-test/{'0' * 64}/{i}", Body=b"o" * 10_000
            )
        key = CacheKey("example.org", "new", "original")
        await shared.put(key, await _entry(cache, key, secrets.token_bytes(1_000)))
        assert metrics.value("relay_tier_evictions") == 0
        assert sum(s3_store.sizes().values()) > 15_000

        async def under() -> bool:
            return sum(s3_store.sizes().values()) <= 15_000

        job = asyncio.ensure_future(shared.sweep_forever())
        await eventually(under, within=10)
        assert metrics.value("relay_tier_evictions") >= 2
        for i in range(3, 5):
            s3_store.client.put_object(
                Bucket=config.bucket, Key=f"relay-test/{'1' * 64}/{i}", Body=b"o" * 10_000
            )
        await eventually(under, within=10)
    finally:
        if job is not None:
            job.cancel()
        await shared.close()


async def test_unreachable_store_is_absent_and_logged(
    cache: MediaCache, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody listening: get is None and put returns, both logged and counted, no exception;
    for a few seconds after, the store is skipped; a purge raises (it must be retried)."""
    (port,) = free_ports(1)
    shared, metrics = await _tier(store_config(f"http://127.0.0.1:{port}", "relay-nowhere"))
    try:
        entry = await _entry(cache, ORIGINAL, b"kept locally")
        with caplog.at_level(logging.WARNING, logger="relay.media.shared_tier"):
            assert await shared.get(ORIGINAL) is None
        assert "shared tier get of example.org/abc failed" in caplog.text
        assert _requests(metrics, "get", "error") == 1
        await shared.put(ORIGINAL, entry)
        assert await shared.get(THUMB) is None
        assert (_requests(metrics, "put", "skipped"), _requests(metrics, "get", "skipped")) == (
            1,
            1,
        )
        with pytest.raises(S3Error):
            await shared.purge("example.org", "abc")
        assert _requests(metrics, "purge", "error") == 1
        assert cache.lookup(ORIGINAL) == entry  # the local tier is untouched
        assert SECRET_KEY not in caplog.text
    finally:
        await shared.close()


async def test_wrong_credentials_are_absent_not_fatal(
    s3_auth_store: S3Store, cache: MediaCache, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused key (403) reads as a miss with a warning, never leaks the secret to the log;
    the right key then finds what the relay put."""
    wrong = s3_auth_store.config.model_copy(update={"secret_access_key": "wrong-" + "s" * 20})
    bad, metrics = await _tier(wrong)
    good, _ = await _tier(s3_auth_store.config)
    try:
        entry = await _entry(cache, OTHER, b"stored with the right key")
        await good.put(OTHER, entry)
        with caplog.at_level(logging.WARNING, logger="relay.media.shared_tier"):
            assert await bad.get(OTHER) is None
        assert "403 SignatureDoesNotMatch" in caplog.text
        assert wrong.secret_access_key not in caplog.text
        assert _requests(metrics, "get", "error") == 1
        with pytest.raises(S3Error, match="403"):
            await bad.purge("example.org", "abcd")
        assert await _read(good, OTHER) == (b"stored with the right key", "image/png", None)
    finally:
        await bad.close()
        await good.close()


async def test_a_failed_purge_is_tried_again_until_it_reaches_the_store(
    s3_store: S3Store,
) -> None:
    """The bucket refuses (here: it does not exist yet): purge raises; once the bucket is
    there, the retry task removes what is under the media's folder without being asked."""
    config = s3_store.config.model_copy(update={"bucket": "relay-later"})
    shared, metrics = await _tier(config, purge_retry=0.2)
    try:
        with pytest.raises(S3Error):
            await shared.purge("example.org", "late")
        s3_store.client.create_bucket(Bucket="relay-later")
        folder = f"{config.prefix}{media_folder('example.org', 'late')}/"
        s3_store.client.put_object(Bucket="relay-later", Key=folder + "left", Body=b"x")

        async def gone() -> bool:
            listed = s3_store.client.list_objects_v2(Bucket="relay-later", Prefix=folder)
            return listed.get("KeyCount", 0) == 0

        await eventually(gone, within=10)
        assert _requests(metrics, "purge", "ok") == 1
    finally:
        await shared.close()

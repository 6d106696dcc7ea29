"""The shared tier in an S3-protocol bucket (``media.store``): a ``SharedTier``.

Object names come from hashes, never from raw ids, and group every variant of one
media item in one folder, so a revocation deletes one prefix::

    <prefix><sha256(server_name, media_id)>/<CacheKey.digest()>

The content type is the object's own; the filename (percent-encoded: S3 metadata is
ASCII) and the SHA-256 are user metadata. Plaintext of encrypted attachments, and
everything rendered from it (variants starting ``enc-``,
:func:`relay.media.attachments.plaintext_variant`), never goes to the bucket: the
bucket holds what the homeserver would hand anyone with the access token, no more.

Reads and writes never raise for the store's trouble: they log, count
(``relay_tier_requests``) and answer "absent", and for :data:`RETRY_AFTER` seconds
after a failure the tier is skipped, so a bucket that is down costs each request
nothing and the homeserver stays the source. A purge raises (its caller retries).
A purge that failed is tried again every :data:`PURGE_RETRY` seconds while the process
runs (its media is refused before any tier is asked, so a leftover is never served).
With ``max_size`` set, :meth:`BucketTier.sweep_forever` deletes the oldest-stored
objects every :data:`SWEEP_INTERVAL` seconds until the bucket's total is under it: a
cluster-wide job, run by the leader only (:mod:`relay.store.leader`), so N processes
do not list the bucket N times.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote, unquote

from relay.config.media_settings import ObjectStoreConfig
from relay.media.cache_layout import CacheEntry, CacheKey
from relay.s3.bucket import ObjectInfo, S3Bucket, S3Error, S3Object
from relay.support.memo import TTLCache
from relay.support.metrics import Metrics

log = logging.getLogger(__name__)

# After a failure the store is not asked again for this long (seconds).
RETRY_AFTER = 5.0
# The leader lists the bucket for eviction this often (seconds).
SWEEP_INTERVAL = 60.0
# Purges that failed (the store was down) are tried again this often (seconds).
PURGE_RETRY = 30.0
# Keys this process put or read lately: not uploaded again when committed locally.
MAX_REMEMBERED = 10_000
REMEMBER_FOR = 3600.0
ENCRYPTED_PREFIX = "enc-"  # relay.media.attachments.plaintext_variant


def media_folder(server_name: str, media_id: str) -> str:
    """The folder (under the prefix) holding every variant of one media item."""
    return hashlib.sha256(f"{server_name}\n{media_id}".encode()).hexdigest()


def object_name(key: CacheKey) -> str:
    """The object name (under the prefix) of one cached variant."""
    return f"{media_folder(key.server_name, key.media_id)}/{key.digest()}"


def plaintext(key: CacheKey) -> bool:
    """Whether ``key`` names decrypted plaintext or a rendition made from it."""
    return key.variant.startswith(ENCRYPTED_PREFIX)


def to_evict(objects: list[ObjectInfo], max_size: int) -> list[ObjectInfo]:
    """The oldest-stored objects to remove so the rest total at most ``max_size``."""
    total = sum(info.size for info in objects)
    chosen: list[ObjectInfo] = []
    for info in sorted(objects, key=lambda i: (i.last_modified, i.name)):
        if total <= max_size:
            break
        chosen.append(info)
        total -= info.size
    return chosen


class BucketObject:
    """An object being read from the tier (:class:`~relay.media.tiers.TierObject`)."""

    def __init__(self, found: S3Object) -> None:
        self._found = found
        self.content_type = found.content_type
        self.content_length = found.content_length
        raw = found.metadata.get("filename")
        self.filename: str | None = None if raw is None else unquote(raw)
        self.sha256: str | None = found.metadata.get("sha256")

    def iter_chunks(self) -> AsyncIterator[bytes]:
        return self._found.iter_chunks()

    async def close(self) -> None:
        await self._found.close()


class BucketTier:
    """The shared tier in one bucket and prefix; ``start`` before use, ``close`` after."""

    def __init__(
        self,
        bucket: S3Bucket,
        metrics: Metrics,
        *,
        max_size: int = 0,
        retry_after: float = RETRY_AFTER,
        sweep_interval: float = SWEEP_INTERVAL,
        purge_retry: float = PURGE_RETRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bucket = bucket
        self.max_size = max_size
        self._metrics = metrics
        self._retry_after = retry_after
        self._sweep_interval = sweep_interval
        self._purge_retry = purge_retry
        self._clock = clock
        self._down_until = 0.0
        # Media whose purge failed, tried again by the retry task.
        self._unpurged: set[tuple[str, str]] = set()
        self._retrying: asyncio.Task[None] | None = None
        # key → sha256 of what the bucket is known to hold for it.
        self._known: TTLCache[CacheKey, str] = TTLCache(REMEMBER_FOR, MAX_REMEMBERED, clock=clock)
        # (server_name, media_id) → when this process purged it (revocation).
        self._purged: TTLCache[tuple[str, str], float] = TTLCache(
            REMEMBER_FOR, MAX_REMEMBERED, clock=clock
        )

    @classmethod
    def from_config(cls, config: ObjectStoreConfig, metrics: Metrics) -> BucketTier:
        return cls(S3Bucket(config), metrics, max_size=config.max_size)

    async def start(self) -> None:
        await self.bucket.start()
        self._retrying = asyncio.ensure_future(self._retry_purges_forever())

    async def close(self) -> None:
        task, self._retrying = self._retrying, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.bucket.close()

    # -- SharedTier ---------------------------------------------------------------------

    def holds(self, key: CacheKey) -> bool:
        return not plaintext(key)

    async def get(self, key: CacheKey) -> BucketObject | None:
        if not self.holds(key):
            return None
        if self._is_down():
            self._count("get", "skipped")
            return None
        try:
            found = await self.bucket.get(object_name(key))
        except S3Error as e:
            self._failed("get", key, e)
            return None
        if found is None:
            self._count("get", "miss")
            return None
        self._count("get", "hit")
        got = BucketObject(found)
        if got.sha256:
            self._known.put(key, got.sha256)
        return got

    async def put(self, key: CacheKey, entry: CacheEntry) -> None:
        media = (key.server_name, key.media_id)
        if not self.holds(key) or self._known.get(key) == entry.sha256:
            return
        if self._purged.get(media) is not None:
            return  # revoked: never copied up again
        if self._is_down():
            self._count("put", "skipped")
            return
        started = self._clock()
        metadata = {"sha256": entry.sha256}
        if entry.filename is not None:
            metadata["filename"] = quote(entry.filename, safe="")
        try:
            await self.bucket.put_file(
                object_name(key), entry.path, content_type=entry.content_type, metadata=metadata
            )
        except OSError as e:
            # Evicted or purged locally since it was committed: nothing to copy.
            log.debug("not copying %s to the shared tier: %s", key.variant, e)
            return
        except S3Error as e:
            self._failed("put", key, e)
            return
        purged_at = self._purged.get(media)
        if purged_at is not None and purged_at >= started:
            # Revoked while the copy was on its way: the purge may have run before it landed.
            await self._delete_late_copy(key)
            return
        self._known.put(key, entry.sha256)
        self._count("put", "ok")

    async def purge(self, server_name: str, media_id: str) -> int:
        self._purged.put((server_name, media_id), self._clock())
        self._known.discard_where(lambda k: (k.server_name, k.media_id) == (server_name, media_id))
        try:
            removed = await self.bucket.delete_folder(media_folder(server_name, media_id))
        except S3Error:
            self._count("purge", "error")
            self._unpurged.add((server_name, media_id))
            raise
        self._unpurged.discard((server_name, media_id))
        self._count("purge", "ok")
        return removed

    async def _retry_purges_forever(self) -> None:
        while True:
            await asyncio.sleep(self._purge_retry)
            for server_name, media_id in list(self._unpurged):
                try:
                    await self.purge(server_name, media_id)
                except S3Error as e:
                    log.warning(
                        "shared tier: purge of %s/%s failed again: %s", server_name, media_id, e
                    )
                    break  # the store is still down: the rest wait for the next round
                log.info("shared tier: purged %s/%s on a retry", server_name, media_id)

    async def _delete_late_copy(self, key: CacheKey) -> None:
        try:
            await self.bucket.delete([object_name(key)])
        except S3Error as e:
            log.error(
                "shared tier: a copy of revoked %s/%s may be left in the bucket: %s",
                key.server_name,
                key.media_id,
                e,
            )

    # -- eviction -----------------------------------------------------------------------

    async def sweep(self) -> int:
        """Delete the oldest-stored objects until the bucket is under ``max_size``;
        returns how many were removed. Raises S3Error."""
        if self.max_size <= 0:
            return 0
        try:
            objects = [info async for info in self.bucket.objects()]
            victims = to_evict(objects, self.max_size)
            removed = await self.bucket.delete(info.name for info in victims)
        except S3Error:
            self._count("sweep", "error")
            raise
        self._count("sweep", "ok")
        if removed:
            self._metrics.tier_evictions.inc(removed)
            log.info(
                "shared tier: evicted %d objects to stay under %d bytes", removed, self.max_size
            )
        return removed

    async def sweep_forever(self) -> None:
        """The leader's job: :meth:`sweep` every ``sweep_interval`` seconds, failures logged."""
        while True:
            try:
                await self.sweep()
            except S3Error as e:
                log.warning("shared tier: eviction sweep failed: %s", e)
            await asyncio.sleep(self._sweep_interval)

    # -- failures -----------------------------------------------------------------------

    def _is_down(self) -> bool:
        return self._clock() < self._down_until

    def _failed(self, op: str, key: CacheKey, error: S3Error) -> None:
        self._down_until = self._clock() + self._retry_after
        self._count(op, "error")
        log.warning(
            "shared tier %s of %s/%s failed (using the homeserver, store skipped for %.0f s): %s",
            op,
            key.server_name,
            key.media_id,
            self._retry_after,
            error,
        )

    def _count(self, op: str, outcome: str) -> None:
        self._metrics.tier_requests.labels(op, outcome).inc()

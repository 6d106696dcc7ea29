"""Originals: the cache, or one shared download per item.

Single-flight (:mod:`relay.support.singleflight`): every request for an uncached item
joins the one download already under way for it. The download writes a temporary file
in the cache; each request streams that file as it grows (so nobody waits for the whole
download, and a slow client never slows the download), and on success the file is
renamed into the cache. A failed download gives every waiter the same exception and
leaves no entry; one purged meanwhile (revocation) is never committed, and its readers
stop.

Encrypted attachments cannot be streamed: no plaintext may leave before the
ciphertext hash is checked, so their download fetches, verifies, decrypts into the
cache, and only then lets its waiters read the finished file.

Across relay processes sharing the cache directory, a download is also one:
:mod:`relay.media.shared_download` gives it to the process holding the key's lock; the
flights of the others follow that process's growing file the same way.

A local miss asks the shared tier (``media.store``, :mod:`relay.media.tiers`) before
the homeserver, and what came from the homeserver is copied up in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from relay.core.mxc import InvalidMxc, MediaId, is_canonical_server_name, is_valid_media_id
from relay.core.variant import variant_key
from relay.media import shared_download as shared
from relay.media.attachments import (
    AttachmentDecryptor,
    EncryptionLike,
    plaintext_variant,
    validate_encryption,
)
from relay.media.cache import CacheWriter, MediaCache
from relay.media.cache_layout import CacheEntry, CacheKey
from relay.media.download_flight import (
    DEFAULT_CONTENT_TYPE,
    READ_CHUNK,
    Download,
    FileBody,
    MediaBody,
    Purged,
    StreamingBody,
    read_head,
)
from relay.media.tiers import SharedTier, TierObject
from relay.support.metrics import Metrics
from relay.support.singleflight import SingleFlight
from relay.upstream.fetcher import MediaFetcher
from relay.upstream.response import UpstreamResponse

log = logging.getLogger(__name__)

# Copies up to the shared tier at once; more are skipped (the next miss elsewhere
# downloads again), so a burst of cold media never queues behind a slow store.
MAX_TIER_PUTS = 8

__all__ = ["FileBody", "MediaBody", "MediaSource", "Purged", "StreamingBody", "read_head"]


class MediaSource:
    """Opens originals for the pipeline: a cached file, or a download shared by all."""

    def __init__(
        self,
        fetcher: MediaFetcher,
        cache: MediaCache,
        metrics: Metrics,
        *,
        tier: SharedTier | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.cache = cache
        self.tier = tier
        self._metrics = metrics
        self._downloads: SingleFlight[CacheKey, Download] = SingleFlight("fetch")
        self._tier_puts: set[asyncio.Task[None]] = set()

    @staticmethod
    def cache_key(media: MediaId, encryption: EncryptionLike | None = None) -> CacheKey:
        """The cache key of an original; decrypted plaintext never shares the ciphertext's."""
        if not is_canonical_server_name(media.server_name) or not is_valid_media_id(media.media_id):
            # MediaId is a plain dataclass: refuse anything parse_mxc would not return
            # (a non-canonical server name would be a second cache entry for one media).
            raise InvalidMxc("invalid media id")
        variant = variant_key(None)
        if encryption is not None:
            validate_encryption(encryption)
            variant = plaintext_variant(encryption, variant)
        return CacheKey(media.server_name, media.media_id, variant)

    async def open(
        self,
        media: MediaId,
        encryption: EncryptionLike | None = None,
        *,
        whole_if: Callable[[str, bytes], bool] = lambda content_type, head: False,
    ) -> MediaBody:
        """The original: a cached file, or a stream of the download under way.

        ``whole_if(upstream content type, first bytes)`` true: wait for the complete file
        instead of streaming (Range needs it, and so does metadata stripping, which
        goes by the bytes: an image labelled octet-stream must not stream out whole).

        Raises the ``Upstream*`` exceptions (and CiphertextHashMismatch) when the
        download fails before its first byte; a stream raises them mid-body.
        """
        key = self.cache_key(media, encryption)
        entry = self.cache.lookup(key)
        if entry is not None:
            return FileBody(entry)
        download = self._join(key, media, encryption)
        if encryption is None:
            await download.headers_ready.wait()
            if download.error is not None:
                raise download.error
            head = await download.head()
            if download.streamable and not whole_if(download.content_type, head):
                # No await between this check and the open inside StreamingBody.
                return StreamingBody(download)
        return FileBody(await download.result())

    async def open_file(
        self, media: MediaId, encryption: EncryptionLike | None = None
    ) -> CacheEntry:
        """The complete cached original, downloading it first (shared) if needed."""
        key = self.cache_key(media, encryption)
        entry = self.cache.lookup(key)
        if entry is not None:
            return entry
        return await self._join(key, media, encryption).result()

    async def purge(self, media: MediaId) -> None:
        """Forget every cached rendition of a media item (revocation).

        Downloads under way are detached so new requests start afresh; the cache marks
        their writers, so they are never committed.
        """
        item = (media.server_name, media.media_id)
        self._downloads.detach(lambda key: (key.server_name, key.media_id) == item)
        removed = await self.cache.purge(media.server_name, media.media_id)
        log.info("purged %d cached renditions of %s", removed, media)
        if self.tier is not None:
            try:
                in_tier = await self.tier.purge(media.server_name, media.media_id)
            except Exception:
                log.warning("purging %s from the shared tier failed", media, exc_info=True)
                raise
            log.info("purged %d renditions of %s from the shared tier", in_tier, media)

    async def close(self) -> None:
        """Cancel downloads under way (their waiters get an UpstreamError) and copies
        up to the shared tier; release the cache's work directory."""
        await self._downloads.close()
        for task in list(self._tier_puts):
            task.cancel()
        for task in list(self._tier_puts):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.fetcher.close()
        await self.cache.close()

    @property
    def downloads_in_progress(self) -> int:
        return len(self._downloads)

    # -- downloads ----------------------------------------------------------------------

    def _join(self, key: CacheKey, media: MediaId, encryption: EncryptionLike | None) -> Download:
        joined = self._downloads.joined
        download = self._downloads.join(
            key, lambda: Download(self._download, key, media, encryption)
        )
        if self._downloads.joined != joined:
            self._metrics.coalesced_waiters.inc()
        return download

    async def _download(self, download: Download) -> CacheEntry:
        """This process's download of the key, or the one of the process that has it."""
        key = download.key
        claim = shared.try_claim(self.cache.root, key)
        if claim is None:
            followed = await shared.follow(
                self.cache.root,
                key,
                lambda: self.cache.peek(key),
                download,
                stream=download.encryption is None,
            )
            if isinstance(followed, CacheEntry):
                return followed
            claim = followed  # its owner went away before we read its file: ours now
        try:
            entry = self.cache.peek(key)  # committed between our miss and the lock
            if entry is not None:
                return entry
            return await self._own(download, claim)
        except BaseException as e:
            claim.fail(e)
            raise
        finally:
            claim.release()

    async def _own(self, download: Download, claim: shared.Claim) -> CacheEntry:
        # Begun before the first byte, so a purge at any point marks it (cache.purge).
        writer = self.cache.begin(download.key)
        download.writer = writer
        from_homeserver = True
        try:
            if download.encryption is None:
                from_homeserver = await self._stream_into(download, writer, claim)
            else:
                await self._decrypt_into(writer, download.media, download.encryption)
            download.committing = True
            entry = await writer.commit(download.content_type, download.filename)
        except BaseException:
            writer.abort()
            raise
        if entry is None:
            raise Purged(f"{download.media} was purged while downloading")
        if from_homeserver:
            self._copy_up(download.key, entry)
        return entry

    async def _stream_into(
        self, download: Download, writer: CacheWriter, claim: shared.Claim
    ) -> bool:
        """Stream the body in from the shared tier, else the homeserver; True for the
        homeserver."""
        tier = self.tier
        if tier is not None and tier.holds(download.key):
            obj = await tier.get(download.key)
            if obj is not None:
                try:
                    await self._write_body(download, writer, claim, obj)
                finally:
                    await obj.close()
                return False
        async with self.fetcher.open(download.media) as upstream:
            await self._write_body(download, writer, claim, upstream)
        return True

    async def _write_body(
        self,
        download: Download,
        writer: CacheWriter,
        claim: shared.Claim,
        body: UpstreamResponse | TierObject,
    ) -> None:
        download.content_type = body.content_type or DEFAULT_CONTENT_TYPE
        download.length = body.content_length
        download.filename = body.filename
        claim.announce(writer.path, download.content_type, download.length, download.filename)
        download.headers_ready.set()
        async for chunk in body.iter_chunks():
            await writer.write(chunk)
            download.progress(writer.written)

    def _copy_up(self, key: CacheKey, entry: CacheEntry) -> None:
        """Copy a committed download to the shared tier in the background (bounded)."""
        if self.tier is None or not self.tier.holds(key):
            return
        if len(self._tier_puts) >= MAX_TIER_PUTS:
            log.debug("shared tier: %d copies under way; not copying %s", MAX_TIER_PUTS, key)
            return
        task = asyncio.create_task(self._put(self.tier, key, entry), name=f"tier put {key}")
        self._tier_puts.add(task)
        task.add_done_callback(self._tier_puts.discard)

    @staticmethod
    async def _put(tier: SharedTier, key: CacheKey, entry: CacheEntry) -> None:
        try:
            await tier.put(key, entry)
        except Exception:
            log.warning(
                "copying %s/%s up to the shared tier failed",
                key.server_name,
                key.media_id,
                exc_info=True,
            )

    async def _decrypt_into(
        self, writer: CacheWriter, media: MediaId, encryption: EncryptionLike
    ) -> None:
        """Download the ciphertext beside the cache, verify its hash, then decrypt it in.

        The ciphertext's type and name say nothing about the plaintext: the entry keeps
        the defaults, and the pipeline serves the event's ``info.mimetype``.
        """
        decryptor = AttachmentDecryptor(encryption)
        ciphertext = self.cache.new_temp_path()
        fd = os.open(ciphertext, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        reserved = 0  # the ciphertext sits in work/ too: it counts against the cap
        try:
            async with self.fetcher.open(media) as upstream:
                async for chunk in upstream.iter_chunks():
                    self.cache.reserve(len(chunk))
                    reserved += len(chunk)
                    await asyncio.to_thread(_write_and_hash, fd, chunk, decryptor)
            # Spec: the hash covers the ciphertext; check all of it before any plaintext.
            decryptor.verify()
            offset = 0
            while True:
                plain = await asyncio.to_thread(_read_and_decrypt, fd, offset, decryptor)
                if plain is None:
                    break
                offset += len(plain)
                await writer.write(plain)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                ciphertext.unlink()
            self.cache.release(reserved)


def _write_and_hash(fd: int, data: bytes, decryptor: AttachmentDecryptor) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    decryptor.hash_only(data)


def _read_and_decrypt(fd: int, offset: int, decryptor: AttachmentDecryptor) -> bytes | None:
    data = os.pread(fd, READ_CHUNK, offset)
    return decryptor.decrypt(data) if data else None

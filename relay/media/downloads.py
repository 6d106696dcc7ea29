"""Where the public server gets media: the cache, or one shared download per item.

Single-flight: every request for an uncached item joins the one download ("flight")
already under way for it. The flight writes a temporary file in the cache; each
request streams that file as it grows (so nobody waits for the whole download, and a
slow client never slows the download), and on success the file is renamed into the
cache. A failed flight gives every waiter the same exception and leaves no entry.

Encrypted attachments cannot be streamed: no plaintext may leave before the
ciphertext hash is checked, so their flight downloads, verifies, decrypts into the
cache, and only then lets its waiters read the finished file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from relay.core.mxc import InvalidMxc, MediaId, is_valid_media_id, is_valid_server_name
from relay.core.variant import Thumbnail, variant_key
from relay.media.attachments import (
    AttachmentDecryptor,
    EncryptionLike,
    plaintext_variant,
    validate_encryption,
)
from relay.media.cache import CacheEntry, CacheKey, CacheWriter, MediaCache
from relay.support.metrics import Metrics
from relay.upstream.fetcher import FetchError, MediaFetcher, UpstreamError, UpstreamNotFound

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
DEFAULT_CONTENT_TYPE = "application/octet-stream"


class MediaBody(Protocol):
    """A media body that can be streamed or sent as a file."""

    content_type: str
    length: int | None
    sha256: str | None
    filename: str | None
    # Set when the body is a complete cached file (serve it with sendfile, Range OK).
    path: Path | None

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body bytes; used when ``path`` is None."""
        ...


class FileBody:
    """A complete cached file.

    ``iter_chunks`` raises FileNotFoundError when the file was evicted or purged
    since the lookup: the server should treat that as a miss and ask again.
    """

    def __init__(self, entry: CacheEntry) -> None:
        self.entry = entry
        self.content_type = entry.content_type
        self.length: int | None = entry.length
        self.sha256: str | None = entry.sha256
        self.filename = entry.filename
        self.path: Path | None = entry.path

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(os.open, self.entry.path, os.O_RDONLY)
        try:
            offset = 0
            while True:
                data = await asyncio.to_thread(os.pread, fd, READ_CHUNK, offset)
                if not data:
                    return
                offset += len(data)
                yield data
        finally:
            os.close(fd)


class _Flight:
    """One download shared by every request for the same cache key."""

    def __init__(self, key: CacheKey) -> None:
        self.key = key
        self.task: asyncio.Task[None] | None = None
        self.content_type = DEFAULT_CONTENT_TYPE
        self.length: int | None = None
        self.filename: str | None = None
        self.writer: CacheWriter | None = None
        self.written = 0
        # Set once the temporary file is being renamed: late joiners wait for the entry.
        self.committing = False
        self.done = False
        # Set by MediaSource.purge: the media was revoked; never commit this download.
        self.purged = False
        self.entry: CacheEntry | None = None
        self.error: BaseException | None = None
        self.headers_ready = asyncio.Event()
        self.finished = asyncio.Event()
        self._progress = asyncio.Event()

    def progress(self, written: int) -> None:
        self.written = written
        self._progress.set()
        self._progress = asyncio.Event()

    async def wait_progress(self) -> None:
        await self._progress.wait()

    def finish(self, entry: CacheEntry | None, error: BaseException | None) -> None:
        self.entry, self.error, self.done = entry, error, True
        self.headers_ready.set()
        self.finished.set()
        self._progress.set()

    async def wait_entry(self) -> CacheEntry:
        await self.finished.wait()
        if self.error is not None:
            raise self.error
        if self.entry is None:
            raise UpstreamNotFound(f"{self.key.server_name}/{self.key.media_id} was purged")
        return self.entry


class StreamingBody:
    """The body of a download in progress, read from its growing temporary file."""

    path: Path | None = None
    sha256: str | None = None

    def __init__(self, flight: _Flight, temp_path: Path) -> None:
        self._flight = flight
        self.content_type = flight.content_type
        self.length = flight.length
        self.filename = flight.filename
        # Opened now, while the flight is known to be writing this file; an fd keeps
        # reading valid after the rename (or an unlink on failure).
        fd = os.open(temp_path, os.O_RDONLY)
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        flight = self._flight
        offset = 0
        try:
            while True:
                available = flight.written
                if offset < available:
                    want = min(READ_CHUNK, available - offset)
                    data = await asyncio.to_thread(os.pread, self._fd, want, offset)
                    if not data:
                        raise UpstreamError("cache file shrank while streaming")
                    offset += len(data)
                    yield data
                    continue
                if flight.error is not None:
                    raise flight.error
                if flight.done:
                    return
                await flight.wait_progress()
        finally:
            self._close()


class MediaSource:
    """Opens media for the public server: cached file, or a shared download."""

    def __init__(self, fetcher: MediaFetcher, cache: MediaCache, metrics: Metrics) -> None:
        self.fetcher = fetcher
        self.cache = cache
        self._metrics = metrics
        self._flights: dict[CacheKey, _Flight] = {}

    @staticmethod
    def cache_key(
        media: MediaId,
        encryption: EncryptionLike | None = None,
        thumbnail: Thumbnail | None = None,
    ) -> CacheKey:
        """The cache key of a rendition; decrypted plaintext never shares the ciphertext's."""
        if not is_valid_server_name(media.server_name) or not is_valid_media_id(media.media_id):
            # MediaId is a plain dataclass: refuse anything parse_mxc would have refused.
            raise InvalidMxc("invalid media id")
        variant = variant_key(thumbnail)
        if encryption is not None:
            if thumbnail is not None:
                # The homeserver cannot thumbnail ciphertext; encrypted thumbnails are
                # separate encrypted files (``info.thumbnail_file``).
                raise ValueError("encrypted media has no server-side thumbnails")
            validate_encryption(encryption)
            variant = plaintext_variant(encryption, variant)
        return CacheKey(media.server_name, media.media_id, variant)

    async def open(
        self,
        media: MediaId,
        encryption: EncryptionLike | None = None,
        *,
        thumbnail: Thumbnail | None = None,
    ) -> MediaBody:
        """The media body: a cached file, or a stream of the download under way.

        Raises the ``Upstream*`` exceptions (and CiphertextHashMismatch) when the
        download fails before its first byte; a stream raises them mid-body.
        """
        key = self.cache_key(media, encryption, thumbnail)
        entry = self.cache.lookup(key)
        if entry is not None:
            return FileBody(entry)
        flight = self._join(key, media, encryption, thumbnail)
        if encryption is None:
            await flight.headers_ready.wait()
            if flight.error is not None:
                raise flight.error
            if not flight.done and not flight.committing and flight.writer is not None:
                # No await between this check and the open inside StreamingBody.
                return StreamingBody(flight, flight.writer.path)
        return FileBody(await flight.wait_entry())

    async def open_file(
        self,
        media: MediaId,
        encryption: EncryptionLike | None = None,
        *,
        thumbnail: Thumbnail | None = None,
    ) -> CacheEntry:
        """The complete cached file, downloading it first (single-flight) if needed."""
        key = self.cache_key(media, encryption, thumbnail)
        entry = self.cache.lookup(key)
        if entry is not None:
            return entry
        return await self._join(key, media, encryption, thumbnail).wait_entry()

    async def purge(self, server_name: str, media_id: str) -> None:
        """Forget every cached rendition of a media item (revocation).

        Downloads under way are detached so they are never committed and new
        requests start afresh.
        """
        for key in [
            k for k in self._flights if (k.server_name, k.media_id) == (server_name, media_id)
        ]:
            self._flights.pop(key).purged = True
        removed = await self.cache.purge(server_name, media_id)
        log.info("purged %d cached renditions of mxc://%s/%s", removed, server_name, media_id)

    async def close(self) -> None:
        """Cancel downloads under way (their waiters get an UpstreamError)."""
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def downloads_in_progress(self) -> int:
        return len(self._flights)

    # -- flights ------------------------------------------------------------------------

    def _join(
        self,
        key: CacheKey,
        media: MediaId,
        encryption: EncryptionLike | None,
        thumbnail: Thumbnail | None,
    ) -> _Flight:
        flight = self._flights.get(key)
        if flight is not None:
            self._metrics.coalesced_waiters.inc()
            return flight
        flight = _Flight(key)
        self._flights[key] = flight
        flight.task = asyncio.create_task(
            self._run(flight, media, encryption, thumbnail), name=f"fetch {media}"
        )
        return flight

    async def _run(
        self,
        flight: _Flight,
        media: MediaId,
        encryption: EncryptionLike | None,
        thumbnail: Thumbnail | None,
    ) -> None:
        """Own the download; every outcome ends in ``flight.finish`` (never raises out)."""
        try:
            if encryption is None:
                entry = await self._download(flight, media, thumbnail)
            else:
                entry = await self._download_encrypted(flight, media, encryption)
        except asyncio.CancelledError:
            flight.finish(None, UpstreamError("the relay is shutting down", status=503))
            raise
        except Exception as e:
            # Exception, not BaseException: waiters re-raise it; nothing escapes the task.
            if isinstance(e, FetchError):
                log.info("download of %s failed: %s: %s", media, type(e).__name__, e)
            else:
                log.warning("download of %s failed", media, exc_info=True)
            flight.finish(None, e)
        else:
            flight.finish(entry, None)
        finally:
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]

    async def _download(
        self, flight: _Flight, media: MediaId, thumbnail: Thumbnail | None
    ) -> CacheEntry | None:
        async with self.fetcher.open(media, thumbnail) as upstream:
            flight.content_type = upstream.content_type or DEFAULT_CONTENT_TYPE
            flight.length = upstream.content_length
            flight.filename = upstream.filename
            writer = self.cache.begin(flight.key)
            flight.writer = writer
            flight.headers_ready.set()
            try:
                async for chunk in upstream.iter_chunks():
                    await writer.write(chunk)
                    flight.progress(writer.written)
                flight.committing = True
                if flight.purged:
                    writer.abort()
                    return None
                return await writer.commit(flight.content_type, flight.filename)
            except BaseException:
                writer.abort()
                raise

    async def _download_encrypted(
        self, flight: _Flight, media: MediaId, encryption: EncryptionLike
    ) -> CacheEntry | None:
        decryptor = AttachmentDecryptor(encryption)
        ciphertext = self.cache.new_temp_path()
        fd = os.open(ciphertext, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            async with self.fetcher.open(media) as upstream:
                async for chunk in upstream.iter_chunks():
                    await asyncio.to_thread(_write_and_hash, fd, chunk, decryptor)
            # Spec: the hash covers the ciphertext; check all of it before any plaintext.
            decryptor.verify()
            writer = self.cache.begin(flight.key)
            try:
                offset = 0
                while True:
                    plain = await asyncio.to_thread(_read_and_decrypt, fd, offset, decryptor)
                    if plain is None:
                        break
                    offset += len(plain)
                    await writer.write(plain)
                flight.committing = True
                if flight.purged:
                    writer.abort()
                    return None
                # The ciphertext's type and name say nothing about the plaintext.
                return await writer.commit(DEFAULT_CONTENT_TYPE, None)
            except BaseException:
                writer.abort()
                raise
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                ciphertext.unlink()


def _write_and_hash(fd: int, data: bytes, decryptor: AttachmentDecryptor) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    decryptor.hash_only(data)


def _read_and_decrypt(fd: int, offset: int, decryptor: AttachmentDecryptor) -> bytes | None:
    data = os.pread(fd, READ_CHUNK, offset)
    return decryptor.decrypt(data) if data else None

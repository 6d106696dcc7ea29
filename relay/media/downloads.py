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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

from relay.core.mxc import InvalidMxc, MediaId, is_canonical_server_name, is_valid_media_id
from relay.core.variant import variant_key
from relay.media.attachments import (
    AttachmentDecryptor,
    EncryptionLike,
    plaintext_variant,
    validate_encryption,
)
from relay.media.cache import CacheWriter, MediaCache
from relay.media.cache_layout import CacheEntry, CacheKey
from relay.support.metrics import Metrics
from relay.support.singleflight import Flight, SingleFlight
from relay.upstream.errors import FetchError, UpstreamError, UpstreamNotFound
from relay.upstream.fetcher import MediaFetcher

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
# Leading bytes a caller sees before choosing to stream (magic numbers; thumbnails.SNIFF_BYTES).
HEAD_BYTES = 16
DEFAULT_CONTENT_TYPE = "application/octet-stream"


class Purged(UpstreamNotFound):
    """The media was purged (revoked) while being made: nothing of it was kept."""


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


class _Download(Flight[CacheEntry]):
    """One download shared by every request for the same cache key; readers follow its file."""

    def __init__(
        self, source: MediaSource, key: CacheKey, media: MediaId, encryption: EncryptionLike | None
    ) -> None:
        self._source = source
        self.key = key
        self.media = media
        self.encryption = encryption
        self.content_type = DEFAULT_CONTENT_TYPE
        self.length: int | None = None
        self.filename: str | None = None
        self.writer: CacheWriter | None = None
        self.written = 0
        # Set once the temporary file is being renamed: late joiners wait for the entry.
        self.committing = False
        self.done = False
        self.error: BaseException | None = None
        self.headers_ready = asyncio.Event()
        self._progress = asyncio.Event()

    def progress(self, written: int) -> None:
        self.written = written
        self._progress.set()
        self._progress = asyncio.Event()

    async def wait_progress(self) -> None:
        await self._progress.wait()

    async def head(self) -> bytes:
        """The first HEAD_BYTES of the body (fewer if it is shorter), once they are written.

        Empty when the file was already renamed into the cache (the caller then waits
        for the entry instead of streaming); raises the download's error.
        """
        while self.written < HEAD_BYTES and not self.done:
            await self.wait_progress()
        if self.error is not None:
            raise self.error
        writer = self.writer
        if writer is None or self.committing:
            return b""
        try:
            return await asyncio.to_thread(read_head, writer.path)
        except FileNotFoundError:
            return b""

    async def result(self) -> CacheEntry:
        try:
            return await super().result()
        except asyncio.CancelledError:
            if self.task.cancelled() and self.error is not None:
                raise self.error from None  # the relay is stopping, not this caller
            raise

    async def work(self) -> CacheEntry:
        """Own the download; every outcome wakes the readers (they re-raise a failure)."""
        try:
            return await self._source._download(self)
        except Purged:
            # Readers already streaming got every byte: they finish; nothing is kept.
            raise
        except asyncio.CancelledError:
            self.error = UpstreamError("the relay is shutting down", status=503)
            raise
        except Exception as e:
            if isinstance(e, FetchError):
                log.info("download of %s failed: %s: %s", self.media, type(e).__name__, e)
            else:
                log.warning("download of %s failed", self.media, exc_info=True)
            self.error = e
            raise
        finally:
            self.done = True
            self.headers_ready.set()
            self._progress.set()


class StreamingBody:
    """The body of a download in progress, read from its growing temporary file."""

    path: Path | None = None
    sha256: str | None = None

    def __init__(self, flight: _Download, temp_path: Path) -> None:
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
    """Opens originals for the pipeline: a cached file, or a download shared by all."""

    def __init__(self, fetcher: MediaFetcher, cache: MediaCache, metrics: Metrics) -> None:
        self.fetcher = fetcher
        self.cache = cache
        self._metrics = metrics
        self._downloads: SingleFlight[CacheKey, _Download] = SingleFlight("fetch")

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
            writer = download.writer
            in_progress = not download.done and not download.committing
            if writer is not None and in_progress and not whole_if(download.content_type, head):
                # No await between this check and the open inside StreamingBody.
                return StreamingBody(download, writer.path)
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

    async def close(self) -> None:
        """Cancel downloads under way (their waiters get an UpstreamError)."""
        await self._downloads.close()
        await self.fetcher.close()

    @property
    def downloads_in_progress(self) -> int:
        return len(self._downloads)

    # -- downloads ----------------------------------------------------------------------

    def _join(
        self, key: CacheKey, media: MediaId, encryption: EncryptionLike | None
    ) -> _Download:
        joined = self._downloads.joined
        download = self._downloads.join(key, lambda: _Download(self, key, media, encryption))
        if self._downloads.joined != joined:
            self._metrics.coalesced_waiters.inc()
        return download

    async def _download(self, download: _Download) -> CacheEntry:
        # Begun before the first byte, so a purge at any point marks it (cache.purge).
        writer = self.cache.begin(download.key)
        download.writer = writer
        try:
            if download.encryption is None:
                await self._stream_into(download, writer)
            else:
                await self._decrypt_into(writer, download.media, download.encryption)
            download.committing = True
            entry = await writer.commit(download.content_type, download.filename)
        except BaseException:
            writer.abort()
            raise
        if entry is None:
            raise Purged(f"{download.media} was purged while downloading")
        return entry

    async def _stream_into(self, download: _Download, writer: CacheWriter) -> None:
        async with self.fetcher.open(download.media) as upstream:
            download.content_type = upstream.content_type or DEFAULT_CONTENT_TYPE
            download.length = upstream.content_length
            download.filename = upstream.filename
            download.headers_ready.set()
            async for chunk in upstream.iter_chunks():
                await writer.write(chunk)
                download.progress(writer.written)

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
        reserved = 0  # the ciphertext sits in tmp/ too: it counts against the cap
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


def read_head(path: Path) -> bytes:
    """The first HEAD_BYTES of a file (what magic numbers are read from)."""
    with path.open("rb") as f:
        return f.read(HEAD_BYTES)


def _write_and_hash(fd: int, data: bytes, decryptor: AttachmentDecryptor) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    decryptor.hash_only(data)


def _read_and_decrypt(fd: int, offset: int, decryptor: AttachmentDecryptor) -> bytes | None:
    data = os.pread(fd, READ_CHUNK, offset)
    return decryptor.decrypt(data) if data else None

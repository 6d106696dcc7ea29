"""Renditions the relay derives from a cached original: thumbnails and stripped originals.

A rendition is a file of its own in the media cache, under a key derived from its
source's key: ``<source variant>+thumb-64x48-crop`` or ``<source variant>+stripped``
(the source is ``original``, or ``enc-…-original`` for a decrypted attachment). So it
never collides with an original, a ciphertext, a plaintext or a thumbnail fetched
from the homeserver, and ``MediaCache.purge(server, id)`` (revocation) removes it with
every other rendition of the media.

Each key is produced once (single-flight): the first request starts a task that
fetches the original through :class:`~relay.media.downloads.MediaSource` (itself one
shared download), runs Pillow in a worker thread into a temporary file, and copies
the result into a cache writer that was opened *before* the work began, so a
revocation arriving meanwhile marks the writer and nothing is committed. Every
concurrent request for the key awaits that one task; a client that leaves does not
cancel it. At most ``max_concurrent_renders`` Pillow jobs run at once, which bounds
CPU and memory (a 32-megapixel RGBA frame alone is 128 MB).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from relay.core.errors import Codes, MatrixError
from relay.core.mxc import MediaId
from relay.core.variant import Thumbnail, variant_key
from relay.http.headers import normalise_content_type
from relay.media.attachments import EncryptionLike
from relay.media.cache import CacheEntry, CacheKey, CacheWriter, MediaCache
from relay.media.downloads import FileBody, MediaBody, MediaSource
from relay.media.image_privacy import strip_metadata
from relay.media.thumbnails import (
    ImageTooLarge,
    NotAnImage,
    RenderedThumbnail,
    ThumbnailError,
    ThumbnailLimits,
    check_request,
    render_thumbnail,
)
from relay.support.metrics import Metrics
from relay.upstream.fetcher import UpstreamNotFound

log = logging.getLogger(__name__)

T = TypeVar("T")

STRIPPED = "stripped"
# What relay.image_privacy.strip_metadata can clean without re-encoding.
STRIPPABLE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})
# Declared types that are surely not images: refused before downloading (a film
# need not be fetched to learn that it cannot be thumbnailed).
NON_IMAGE_MAJOR_TYPES = frozenset({"text", "video", "audio", "font", "model", "multipart"})
# One Pillow job per core on the 2-core reference machine.
MAX_CONCURRENT_RENDERS = 2
# Originals found to carry nothing to strip, remembered so they are not scanned again.
MAX_REMEMBERED_CLEAN = 10_000
# A cached original can be evicted between lookup and open: fetch it again this often.
SOURCE_ATTEMPTS = 3
COPY_CHUNK = 256 * 1024
RETRY_AFTER = 5
# ImageTooLarge: the request and link are fine, the content cannot be processed.
# 422 as the issue suggests (413 would wrongly say the *request* was too large).
TOO_LARGE_STATUS = 422

_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp"}


class RenditionFailed(Exception):
    """A rendition could not be written for a local reason (a full disk, say)."""


def to_matrix_error(error: ThumbnailError | RenditionFailed) -> MatrixError:
    """The client's answer: 400 (not an image, bad size, undecodable), 422 (too many
    pixels) or 503 (local failure); never 500. ``ThumbnailError`` messages are safe."""
    if isinstance(error, RenditionFailed):
        return MatrixError(
            503, Codes.UNKNOWN, "The media could not be prepared", {"Retry-After": str(RETRY_AFTER)}
        )
    if isinstance(error, ImageTooLarge):
        return MatrixError(TOO_LARGE_STATUS, Codes.UNKNOWN, str(error))
    return MatrixError(400, Codes.UNKNOWN, str(error))


def derived_key(source: CacheKey, rendition: str) -> CacheKey:
    """The cache key of ``rendition`` made from ``source`` (``+`` never occurs in a source's)."""
    return CacheKey(source.server_name, source.media_id, f"{source.variant}+{rendition}")


def thumbnail_filename(filename: str | None, content_type: str) -> str | None:
    """The original's name with the thumbnail's extension (``cat.png`` → ``cat.jpg``)."""
    extension = _EXTENSIONS.get(content_type)
    if filename is None or extension is None:
        return None
    stem, dot, _ = filename.rpartition(".")
    return f"{stem if dot and stem else filename}.{extension}"


def essence(content_type: str | None) -> str:
    """``type/subtype`` of a content type, lower case, without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


class Renditions:
    """Makes, caches and hands out the renditions of media (see the module docstring)."""

    def __init__(
        self,
        media: MediaSource,
        metrics: Metrics,
        *,
        limits: ThumbnailLimits | None = None,
        strip_metadata: bool = True,
        max_concurrent_renders: int = MAX_CONCURRENT_RENDERS,
    ) -> None:
        self._media = media
        self._cache: MediaCache = media.cache
        self._metrics = metrics
        self.limits = limits or ThumbnailLimits()
        self.strip_metadata = strip_metadata
        self._renders = asyncio.Semaphore(max_concurrent_renders)
        self._flights: dict[CacheKey, asyncio.Task[CacheEntry]] = {}
        # source key → sha256 of a source that had nothing to strip (LRU, bounded).
        self._clean: OrderedDict[CacheKey, str] = OrderedDict()

    # -- thumbnails ---------------------------------------------------------------------

    async def thumbnail(
        self,
        media: MediaId,
        encryption: EncryptionLike | None,
        thumb: Thumbnail,
        declared_type: str | None = None,
    ) -> FileBody:
        """The cached thumbnail, rendered from the original first if needed.

        ``declared_type`` is the type the sender gave; a surely non-image one is
        refused before anything is downloaded. Raises ``ThumbnailError`` (see
        :func:`to_matrix_error`), :class:`RenditionFailed`, the ``FetchError`` family
        and ``ValueError`` for unusable encryption info.
        """
        check_request(thumb, self.limits)
        declared = essence(declared_type)
        if declared.partition("/")[0] in NON_IMAGE_MAJOR_TYPES:
            raise NotAnImage(f"Only images have thumbnails; this media is {declared}")
        source_key = MediaSource.cache_key(media, encryption)
        key = derived_key(source_key, variant_key(thumb))
        entry = await self._single_flight(
            key, lambda: self._render_thumbnail(key, media, encryption, thumb)
        )
        return FileBody(entry)

    async def _render_thumbnail(
        self, key: CacheKey, media: MediaId, encryption: EncryptionLike | None, thumb: Thumbnail
    ) -> CacheEntry:
        def render(src: Path, dst: Path) -> RenderedThumbnail:
            return render_thumbnail(src, dst, thumb, self.limits)

        # Opened before the work, so a revocation meanwhile marks it (see module docstring).
        writer = self._begin(key)
        try:
            source, rendered, dst = await self._work_on_source(media, encryption, render)
            try:
                entry = await self._commit(writer, dst, rendered.content_type, source.filename)
            finally:
                _unlink(dst)
        except BaseException:
            writer.abort()
            raise
        self._metrics.thumbnails_generated.inc()
        log.debug("rendered %s of %s (%dx%d)", key.variant, media, rendered.width, rendered.height)
        return entry

    # -- originals ----------------------------------------------------------------------

    def strips(self, content_type: str) -> bool:
        """Whether originals of this served type go out stripped of metadata."""
        return self.strip_metadata and essence(content_type) in STRIPPABLE_TYPES

    async def original(
        self,
        media: MediaId,
        encryption: EncryptionLike | None,
        body: MediaBody,
        content_type: str,
    ) -> MediaBody:
        """The body to serve for the original: ``body``, or the stripped rendition.

        Trade-off: stripping needs the complete file, so a JPEG, PNG or WebP is not
        streamed while it downloads; the first request waits for the whole download
        (bounded by ``media.max_size``). Every other type streams as before. When
        nothing needs removing, the original itself is served (and remembered, so it
        is not scanned again).
        """
        if not self.strips(content_type):
            return body
        source_key = MediaSource.cache_key(media, encryption)
        if body.path is not None and self._is_clean(source_key, body.sha256):
            return body
        key = derived_key(source_key, STRIPPED)
        entry = await self._single_flight(
            key, lambda: self._strip(key, source_key, media, encryption, content_type)
        )
        return FileBody(entry)

    async def _strip(
        self,
        key: CacheKey,
        source_key: CacheKey,
        media: MediaId,
        encryption: EncryptionLike | None,
        content_type: str,
    ) -> CacheEntry:
        """The stripped rendition, or the source entry itself when it is already clean."""

        def strip(src: Path, dst: Path) -> bool:
            return strip_metadata(src, dst, content_type)

        writer = self._begin(key)
        try:
            source, changed, dst = await self._work_on_source(media, encryption, strip)
            try:
                if not changed:
                    writer.abort()
                    self._remember_clean(source_key, source.sha256)
                    return source
                content_type = normalise_content_type(content_type)
                entry = await self._commit(writer, dst, content_type, source.filename)
            finally:
                _unlink(dst)
        except BaseException:
            writer.abort()
            raise
        log.debug("stripped metadata from %s (%d → %d bytes)", media, source.length, entry.length)
        return entry

    def _is_clean(self, source_key: CacheKey, sha256: str | None) -> bool:
        known = self._clean.get(source_key)
        if known is None or known != sha256:
            return False
        self._clean.move_to_end(source_key)
        return True

    def _remember_clean(self, source_key: CacheKey, sha256: str) -> None:
        self._clean[source_key] = sha256
        self._clean.move_to_end(source_key)
        while len(self._clean) > MAX_REMEMBERED_CLEAN:
            self._clean.popitem(last=False)

    # -- machinery ----------------------------------------------------------------------

    async def _single_flight(
        self, key: CacheKey, make: Callable[[], Coroutine[Any, Any, CacheEntry]]
    ) -> CacheEntry:
        """The cached entry for ``key``, else the result of the one task making it."""
        entry = self._cache.lookup(key)
        if entry is not None:
            return entry
        task = self._flights.get(key)
        if task is None:
            task = asyncio.create_task(make(), name=f"render {key.variant}")
            self._flights[key] = task
            task.add_done_callback(lambda done: self._landed(key, done))
        # shield: a client that disconnects must not cancel the work others wait for.
        return await asyncio.shield(task)

    def _landed(self, key: CacheKey, task: asyncio.Task[CacheEntry]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not logged as lost

    async def _work_on_source(
        self,
        media: MediaId,
        encryption: EncryptionLike | None,
        work: Callable[[Path, Path], T],
    ) -> tuple[CacheEntry, T, Path]:
        """Run ``work(original_path, temp_path)`` in a thread; the original is fetched first.

        Returns the source entry, the work's result and the temporary path (the
        caller removes it). A source evicted before the thread opened it is fetched again.
        """
        for _ in range(SOURCE_ATTEMPTS):
            source = await self._media.open_file(media, encryption)
            dst = self._cache.new_temp_path()
            try:
                async with self._renders:
                    result = await _in_thread(work, source.path, dst)
            except FileNotFoundError:
                _unlink(dst)
                if source.path.exists():
                    raise RenditionFailed("temporary file vanished") from None
                log.debug("cached original of %s vanished before rendering; again", media)
                continue
            except OSError as e:
                _unlink(dst)
                log.warning("rendering from %s failed: %s", media, e)
                raise RenditionFailed(str(e)) from e
            except BaseException:
                _unlink(dst)
                raise
            return source, result, dst
        raise RenditionFailed("the original kept vanishing from the cache")

    def _begin(self, key: CacheKey) -> CacheWriter:
        try:
            return self._cache.begin(key)
        except OSError as e:
            log.warning("cannot start caching %s: %s", key.variant, e)
            raise RenditionFailed(str(e)) from e

    async def _commit(
        self, writer: CacheWriter, path: Path, content_type: str, filename: str | None
    ) -> CacheEntry:
        """Copy a finished file into ``writer`` and commit it (atomic, purge-aware)."""
        key = writer.key
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
            try:
                offset = 0
                while data := await asyncio.to_thread(os.pread, fd, COPY_CHUNK, offset):
                    await writer.write(data)
                    offset += len(data)
            finally:
                os.close(fd)
            entry = await writer.commit(content_type, filename)
        except OSError as e:
            writer.abort()
            log.warning("caching %s failed: %s", key.variant, e)
            raise RenditionFailed(str(e)) from e
        except BaseException:
            writer.abort()
            raise
        if entry is None:
            # MediaSource.purge ran meanwhile (revocation): serve nothing of it.
            raise UpstreamNotFound(f"{key.server_name}/{key.media_id} was purged")
        return entry

    async def close(self) -> None:
        """Cancel renders under way (their waiters see CancelledError)."""
        tasks = list(self._flights.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @property
    def renders_in_progress(self) -> int:
        return len(self._flights)


async def _in_thread(work: Callable[[Path, Path], T], src: Path, dst: Path) -> T:
    """``work(src, dst)`` in a worker thread. A thread cannot be stopped: when the caller
    is cancelled, ``dst`` is removed once the thread has finished writing it."""
    future = asyncio.ensure_future(asyncio.to_thread(work, src, dst))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda done: _abandoned(done, dst))
        raise


def _abandoned(future: asyncio.Future[Any], dst: Path) -> None:
    if not future.cancelled():
        future.exception()  # nobody waits for it any more; do not log it as lost
    _unlink(dst)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

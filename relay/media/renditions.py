"""Renditions the relay derives from a cached original: thumbnails and stripped originals.

A rendition is a file of its own in the media cache, under a key derived from its
source's key: ``<source variant>+thumb-64x48-crop`` or ``<source variant>+stripped``
(the source is ``original``, or ``enc-…-original`` for a decrypted attachment). So it
never collides with an original, a ciphertext or a plaintext, and
``MediaCache.purge(server, id)`` (revocation) removes it with every other rendition.

Each key is produced once (:mod:`relay.support.singleflight`): the first request starts
the work, which gets the complete original from :class:`~relay.media.downloads.MediaSource`
(itself one shared download) and runs Pillow in a worker thread straight into a cache
writer opened *before* the work began, so the bytes are written once and a revocation
arriving meanwhile marks the writer and nothing is committed. A client that leaves
does not cancel the work. At most ``max_concurrent_renders`` Pillow jobs run at once,
which bounds CPU and memory (a 32-megapixel RGBA frame alone is 128 MB).

With a shared tier (``media.store``, :mod:`relay.media.shared_tier`) the flight first
copies the rendition down from it, and renders only when the tier has none; a
rendition made here is copied up after it is committed, in the background (a copy that
lands after a revocation's purge is deleted again by the tier itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from relay.core.errors import Codes, MatrixError
from relay.core.mxc import MediaId
from relay.core.variant import Thumbnail, variant_key
from relay.http.headers import media_type, normalise_content_type
from relay.media.attachments import EncryptionLike
from relay.media.cache import CacheWriter, MediaCache
from relay.media.cache_layout import CacheEntry, CacheKey
from relay.media.downloads import MediaSource, Purged, read_head
from relay.media.image_privacy import STRIPPED_TYPES, Stripped, handled_type, strip_metadata
from relay.media.thumbnail_encoding import RenderedThumbnail
from relay.media.thumbnails import (
    ImageTooLarge,
    NotAnImage,
    ThumbnailError,
    ThumbnailLimits,
    check_request,
    render_thumbnail,
)
from relay.media.tiers import SharedTier
from relay.support.memo import TTLCache
from relay.support.metrics import Metrics
from relay.support.singleflight import Call, SingleFlight

log = logging.getLogger(__name__)

T = TypeVar("T")

STRIPPED = "stripped"
# What relay.image_privacy.strip_metadata can clean without re-encoding (by the bytes;
# a declared type among these also makes the download wait for the whole file).
STRIPPABLE_TYPES = frozenset(STRIPPED_TYPES.values())
# Declared types that are surely not images: refused before downloading (a film
# need not be fetched to learn that it cannot be thumbnailed).
NON_IMAGE_MAJOR_TYPES = frozenset({"text", "video", "audio", "font", "model", "multipart"})
# One Pillow job per core on the 2-core reference machine.
MAX_CONCURRENT_RENDERS = 2
# Originals found to carry nothing to strip, remembered so they are not scanned again.
MAX_REMEMBERED_CLEAN = 10_000
# A cached original can be evicted between lookup and open: fetch it again this often.
SOURCE_ATTEMPTS = 3
RETRY_AFTER = 5
# ImageTooLarge: the request and link are fine, the content cannot be processed.
# 422 as the issue suggests (413 would wrongly say the *request* was too large).
TOO_LARGE_STATUS = 422

_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp"}


class RenditionFailed(Exception):
    """A rendition could not be written for a local reason (a full disk, say)."""


class UnstrippableImage(ThumbnailError):
    """A JPEG, PNG or WebP (by its bytes) whose structure cannot be walked, so its
    metadata cannot be found: refused (422) rather than served with it."""


def to_matrix_error(error: ThumbnailError | RenditionFailed) -> MatrixError:
    """The client's answer: 400 (not an image, bad size, undecodable), 422 (too many
    pixels, or metadata that cannot be removed) or 503 (local failure); never 500.
    ``ThumbnailError`` messages are safe."""
    if isinstance(error, RenditionFailed):
        return MatrixError(
            503, Codes.UNKNOWN, "The media could not be prepared", {"Retry-After": str(RETRY_AFTER)}
        )
    if isinstance(error, ImageTooLarge | UnstrippableImage):
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


class Renditions:
    """Makes, caches and hands out the renditions of media (see the module docstring)."""

    def __init__(
        self,
        source: MediaSource,
        metrics: Metrics,
        *,
        limits: ThumbnailLimits | None = None,
        strip_metadata: bool = True,
        max_concurrent_renders: int = MAX_CONCURRENT_RENDERS,
        tier: SharedTier | None = None,
    ) -> None:
        self._source = source
        self._tier = tier
        # Copies up to the tier under way (cancelled at close).
        self._uploads: dict[asyncio.Task[None], CacheKey] = {}
        self._cache: MediaCache = source.cache
        self._metrics = metrics
        self.limits = limits or ThumbnailLimits()
        self.strip_metadata = strip_metadata
        self._renders = asyncio.Semaphore(max_concurrent_renders)
        self._flights: SingleFlight[CacheKey, Call[CacheEntry]] = SingleFlight("render")
        # source key → sha256 of a source that had nothing to strip.
        self._clean: TTLCache[CacheKey, str] = TTLCache(math.inf, MAX_REMEMBERED_CLEAN)

    # -- thumbnails ---------------------------------------------------------------------

    async def thumbnail(
        self,
        media: MediaId,
        encryption: EncryptionLike | None,
        thumb: Thumbnail,
        declared_type: str | None = None,
    ) -> CacheEntry:
        """The cached thumbnail, rendered from the original first if needed.

        ``declared_type`` is the type the sender gave; a surely non-image one is
        refused before anything is downloaded. Raises ``ThumbnailError`` (see
        :func:`to_matrix_error`), :class:`RenditionFailed`, the ``FetchError`` family
        and ``ValueError`` for unusable encryption info.
        """
        check_request(thumb, self.limits)
        declared = media_type(declared_type) if declared_type else ""
        if declared.partition("/")[0] in NON_IMAGE_MAJOR_TYPES:
            raise NotAnImage(f"Only images have thumbnails; this media is {declared}")
        key = derived_key(MediaSource.cache_key(media, encryption), variant_key(thumb))

        def render(src: Path, dst: Path) -> RenderedThumbnail:
            return render_thumbnail(src, dst, thumb, self.limits)

        async def make() -> CacheEntry:
            writer = self._begin(key)
            source, rendered = await self._work_on_source(writer, media, encryption, None, render)
            entry = await self._commit(writer, rendered.content_type, source.filename)
            self._metrics.thumbnails_generated.inc()
            log.debug(
                "rendered %s of %s (%dx%d)", key.variant, media, rendered.width, rendered.height
            )
            return entry

        return await self._once(key, make)

    # -- originals ----------------------------------------------------------------------

    def strips(self, content_type: str, head: bytes) -> bool:
        """Whether an original whose first bytes are ``head`` goes out stripped of
        metadata: decided by the bytes, or by a declared type that says it should."""
        if not self.strip_metadata:
            return False
        return handled_type(head) is not None or media_type(content_type) in STRIPPABLE_TYPES

    async def head(self, entry: CacheEntry) -> bytes:
        """The first bytes of a cached file (empty when it vanished: served as a miss)."""
        try:
            return await asyncio.to_thread(read_head, entry.path)
        except FileNotFoundError:
            return b""

    async def stripped(
        self,
        media: MediaId,
        encryption: EncryptionLike | None,
        source: CacheEntry,
        content_type: str,
    ) -> CacheEntry:
        """The original without metadata: the stripped rendition, or ``source`` when clean
        or not a JPEG, PNG or WebP by its bytes. ``content_type`` is what the stripped
        file is served as (the sniffed type). Raises :class:`UnstrippableImage`.

        Trade-off: stripping needs the complete file, so a JPEG, PNG or WebP is not
        streamed while it downloads; the first request waits for the whole download
        (bounded by ``media.max_size``). A clean original is remembered, so it is not
        scanned again.
        """
        source_key = MediaSource.cache_key(media, encryption)
        if self._clean.get(source_key) == source.sha256:
            return source
        key = derived_key(source_key, STRIPPED)

        async def make() -> CacheEntry:
            writer = self._begin(key)
            try:
                # The stripped copy is never larger than the original: room for it first
                # (media.cache_max_size counts files being written; relay.media.cache).
                writer.reserve(source.length, keep=source_key)
            except OSError as e:
                writer.abort()
                raise RenditionFailed(str(e)) from e
            used, outcome = await self._work_on_source(
                writer, media, encryption, source, strip_metadata
            )
            if outcome is Stripped.MALFORMED:
                writer.abort()
                log.info("refusing %s: its metadata cannot be located", media)
                raise UnstrippableImage("The image is damaged; its metadata cannot be removed")
            if outcome is not Stripped.REMOVED:
                writer.abort()
                self._clean.put(source_key, used.sha256)
                return used
            entry = await self._commit(writer, normalise_content_type(content_type), used.filename)
            log.debug("stripped metadata from %s (%d → %d bytes)", media, used.length, entry.length)
            return entry

        return await self._once(key, make)

    # -- machinery ----------------------------------------------------------------------

    async def _once(
        self, key: CacheKey, make: Callable[[], Coroutine[Any, Any, CacheEntry]]
    ) -> CacheEntry:
        """The cached entry for ``key``, else the result of the one flight making it."""
        entry = self._cache.lookup(key)
        if entry is not None:
            return entry

        async def shared_or_make() -> CacheEntry:
            return await self._from_tier(key) or await make()

        return await self._flights.join(key, lambda: Call(shared_or_make)).result()

    async def _from_tier(self, key: CacheKey) -> CacheEntry | None:
        """The rendition copied down from the shared tier into the cache, or None (none
        there, or the tier failed: the caller renders it)."""
        tier = self._tier
        if tier is None or not tier.holds(key):
            return None
        found = await tier.get(key)
        if found is None:
            return None
        try:
            writer = self._begin(key)
            try:
                async for chunk in found.iter_chunks():
                    await writer.write(chunk)
                if found.content_length is not None and writer.written != found.content_length:
                    raise ValueError(f"{writer.written} bytes of {found.content_length}")
                entry = await writer.commit(found.content_type, found.filename)
            except Exception as e:  # the tier's trouble or a full cache: render instead
                writer.abort()
                log.warning("copying %s down from the shared tier failed: %s", key.variant, e)
                return None
            except BaseException:
                writer.abort()
                raise
        finally:
            await found.close()
        if entry is None:
            raise Purged(f"{key.server_name}/{key.media_id} was purged")
        return entry

    def _upload(self, key: CacheKey, entry: CacheEntry) -> None:
        """Copy a committed rendition up to the shared tier, in the background."""
        tier = self._tier
        if tier is None or not tier.holds(key):
            return
        task = asyncio.ensure_future(tier.put(key, entry))
        self._uploads[task] = key
        task.add_done_callback(lambda done: self._uploads.pop(done, None))

    async def _work_on_source(
        self,
        writer: CacheWriter,
        media: MediaId,
        encryption: EncryptionLike | None,
        source: CacheEntry | None,
        work: Callable[[Path, Path], T],
    ) -> tuple[CacheEntry, T]:
        """Run ``work(original_path, writer.path)`` in a thread; returns the source used.

        ``source`` is the original when the caller has it; otherwise (and when it was
        evicted before the thread opened it) it is fetched. The writer is aborted on
        any failure.
        """
        try:
            for _ in range(SOURCE_ATTEMPTS):
                if source is None:
                    source = await self._source.open_file(media, encryption)
                try:
                    async with self._renders:
                        result = await _in_thread(work, source.path, writer.path)
                except FileNotFoundError:
                    if source.path.exists():
                        raise RenditionFailed("temporary file vanished") from None
                    log.debug("cached original of %s vanished before rendering; again", media)
                    source = None
                    continue
                except OSError as e:
                    log.warning("rendering from %s failed: %s", media, e)
                    raise RenditionFailed(str(e)) from e
                return source, result
            raise RenditionFailed("the original kept vanishing from the cache")
        except BaseException:
            writer.abort()
            raise

    def _begin(self, key: CacheKey) -> CacheWriter:
        try:
            return self._cache.begin(key)
        except OSError as e:
            log.warning("cannot start caching %s: %s", key.variant, e)
            raise RenditionFailed(str(e)) from e

    async def _commit(
        self, writer: CacheWriter, content_type: str, filename: str | None
    ) -> CacheEntry:
        """Commit the file the work wrote at ``writer.path`` (atomic, purge-aware)."""
        key = writer.key
        try:
            entry = await writer.commit_file(content_type, filename)
        except OSError as e:
            writer.abort()
            log.warning("caching %s failed: %s", key.variant, e)
            raise RenditionFailed(str(e)) from e
        except BaseException:
            writer.abort()
            raise
        if entry is None:
            # MediaSource.purge ran meanwhile (revocation): serve nothing of it.
            raise Purged(f"{key.server_name}/{key.media_id} was purged")
        self._upload(key, entry)
        return entry

    def forget(self, media: MediaId) -> None:
        """Drop what is remembered of ``media`` (revocation): clean-source answers, and
        renders under way (detached: they run on, but their writers were purged)."""
        item = (media.server_name, media.media_id)
        self._clean.discard_where(lambda key: (key.server_name, key.media_id) == item)
        self._flights.detach(lambda key: (key.server_name, key.media_id) == item)

    async def close(self) -> None:
        """Cancel renders and copies up to the tier under way (waiters see CancelledError)."""
        await self._flights.close()
        uploads = list(self._uploads)
        for task in uploads:
            task.cancel()
        await asyncio.gather(*uploads, return_exceptions=True)

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
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()

"""The flight of one download and the bodies read from it: a cached file, or the file
of a download in progress followed as it grows.

:class:`Download` is what every request for one uncached key shares within a process
(:mod:`relay.media.downloads` runs it); it carries the upstream headers, the file being
written (this process's writer, or another process's file followed through
:mod:`relay.media.shared_download`) and how much of it is there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from relay.core.mxc import MediaId
from relay.media import shared_download as shared
from relay.media.attachments import EncryptionLike
from relay.media.cache import CacheWriter
from relay.media.cache_layout import CacheEntry, CacheKey
from relay.support.singleflight import Flight
from relay.upstream.errors import FetchError, UpstreamError, UpstreamNotFound

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


class Download(Flight[CacheEntry]):
    """One download shared by every request for the same cache key; readers follow its file.

    ``run(download)`` does the work (``MediaSource._download``): it sets the headers,
    the writer or the followed file, and reports :meth:`progress`.
    """

    def __init__(
        self,
        run: Callable[[Download], Awaitable[CacheEntry]],
        key: CacheKey,
        media: MediaId,
        encryption: EncryptionLike | None,
    ) -> None:
        self._run = run
        self.key = key
        self.media = media
        self.encryption = encryption
        self.content_type = DEFAULT_CONTENT_TYPE
        self.length: int | None = None
        self.filename: str | None = None
        self.writer: CacheWriter | None = None
        # Following another process's download: its file, open (see shared_download).
        self.follow_fd = -1
        self._close_follow: Callable[[], object] | None = None
        self.readers = 0
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
        if not self.streamable:
            return b""
        try:
            fd = self._open()
        except FileNotFoundError:
            return b""
        try:
            return await asyncio.to_thread(os.pread, fd, HEAD_BYTES, 0)
        finally:
            os.close(fd)

    @property
    def streamable(self) -> bool:
        """Whether readers may follow the file being written now."""
        has_file = self.writer is not None or self.follow_fd >= 0
        return has_file and not self.done and not self.committing

    def open_reader(self) -> int:
        """A descriptor of the file being written for a reader that streams it (call
        only while :attr:`streamable`)."""
        fd = self._open()
        self.readers += 1
        return fd

    def _open(self) -> int:
        if self.follow_fd >= 0:
            return os.dup(self.follow_fd)
        if self.writer is None:
            raise FileNotFoundError("no file is being written")
        return os.open(self.writer.path, os.O_RDONLY)

    # -- following another process's download (shared_download.Follower) -----------------

    def announced(self, announcement: shared.Announcement, fd: int) -> None:
        self.content_type = announcement.content_type or DEFAULT_CONTENT_TYPE
        self.length = announcement.length
        self.filename = announcement.filename
        self.follow_fd = fd
        self._close_follow = weakref.finalize(self, os.close, fd)
        self.headers_ready.set()

    def unfollow(self) -> None:
        if self._close_follow is not None:
            self._close_follow()
        self._close_follow, self.follow_fd, self.written = None, -1, 0

    def _stop_following(self) -> None:
        """The flight ended: its readers hold descriptors of their own."""
        if self._close_follow is not None:
            self._close_follow()
        self._close_follow, self.follow_fd = None, -1

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
            return await self._run(self)
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
            self._stop_following()
            self.headers_ready.set()
            self._progress.set()


class StreamingBody:
    """The body of a download in progress, read from its growing temporary file."""

    path: Path | None = None
    sha256: str | None = None

    def __init__(self, flight: Download) -> None:
        self._flight = flight
        self.content_type = flight.content_type
        self.length = flight.length
        self.filename = flight.filename
        # Opened now, while the flight is known to be writing this file; an fd keeps
        # reading valid after the rename (or an unlink on failure).
        fd = flight.open_reader()
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


def read_head(path: Path) -> bytes:
    """The first HEAD_BYTES of a file (what magic numbers are read from)."""
    with path.open("rb") as f:
        return f.read(HEAD_BYTES)

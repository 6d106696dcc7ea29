"""Carry out a response plan: headers, then the body read whole, by ``sendfile``, or streamed.

aiohttp's ``FileResponse`` does the same underneath, but it also decides Range,
If-None-Match and the ETag itself (an ETag from mtime and size); the relay's ETag is
the content's SHA-256 and its Range and conditional rules live in
:mod:`relay.http.response`, so the plan makes every decision and this module only
moves bytes. The file is opened *before* anything is sent, so a file evicted or
purged between lookup and open is a miss the caller can retry, never a broken response.

Opening and reading happen on the event loop: for a local file in the page cache an
open, fstat and pread cost less than the hop to a worker thread, and ``sendfile(2)``
runs on the loop thread anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO, Protocol

from aiohttp import web

from relay.core.mxc import MediaId
from relay.http.response import ResponsePlan
from relay.support.metrics import Metrics
from relay.upstream.errors import FetchError
from relay.web.kernel_send import kernel_socket, send_range
from relay.web.ready import HttpDate, ReadyAnswer, ReadyHead

log = logging.getLogger(__name__)

COPY_CHUNK = 256 * 1024


class Chunks(Protocol):
    """A body that arrives in chunks (a download in progress)."""

    def iter_chunks(self) -> AsyncIterator[bytes]: ...


def open_cached(path: Path, length: int) -> BinaryIO | None:
    """Open a cached file for sending; ``None`` if it vanished or changed size meanwhile.

    An open descriptor keeps the data readable even if the entry is unlinked later
    (POSIX), so once this returns a file the whole body can be sent.
    """
    try:
        fobj = path.open("rb")
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        # Eviction unlinks, never truncates, but a size mismatch means this is not the
        # entry that was looked up: refuse it rather than send the wrong bytes.
        if os.fstat(fobj.fileno()).st_size != length:
            fobj.close()
            return None
    except BaseException:
        fobj.close()
        raise
    return fobj


def read_cached(path: Path, length: int, offset: int, count: int) -> bytes | None:
    """``count`` bytes from ``offset`` of a cached file of ``length`` bytes, read whole.

    ``None`` if the file vanished or changed size meanwhile (the same check as
    :func:`open_cached`), so the caller can look it up again before sending anything.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if os.fstat(fd).st_size != length:
            return None
        data = os.pread(fd, count, offset)
    finally:
        os.close(fd)
    return data if len(data) == count else None


async def send_file(
    request: web.Request, response: web.StreamResponse, fobj: BinaryIO, offset: int, count: int
) -> bool:
    """Prepare ``response`` and send ``count`` bytes of ``fobj`` from ``offset``.

    Returns True when the kernel sent them (``sendfile(2)`` into the socket:
    :mod:`relay.web.kernel_send`), False when they were copied through the response
    because the transport cannot do it (TLS terminated in-process, or a platform
    without ``os.sendfile``). The caller closes ``fobj``.
    """
    await response.prepare(request)
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client connection lost before the body")
    sock_fd = kernel_socket(transport)
    zero_copy = sock_fd is not None
    if count > 0:
        if sock_fd is not None:
            await send_range(transport, sock_fd, fobj, offset, count)
        else:
            await _copy(response, fobj, offset, count)
    await response.write_eof()
    return zero_copy


async def _copy(response: web.StreamResponse, fobj: BinaryIO, offset: int, count: int) -> None:
    fd = fobj.fileno()
    while count > 0:
        data = await asyncio.to_thread(os.pread, fd, min(COPY_CHUNK, count), offset)
        if not data:
            raise ConnectionResetError("cached file ended early; closing the response")
        await response.write(data)
        offset += len(data)
        count -= len(data)


def close_quietly(fobj: BinaryIO | None) -> None:
    """Close a file opened by :func:`open_cached` (errors on close are irrelevant here)."""
    if fobj is not None:
        with contextlib.suppress(OSError):
            fobj.close()


class Sender:
    """Sends planned responses and counts how their bodies left."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # Cached-file bodies by how they left: sent by the kernel (sendfile), read whole
        # and written with the headers (small files), or copied through Python in chunks
        # (only on transports without sendfile). For tests and debugging.
        self.files_sent_zero_copy = 0
        self.files_sent_buffered = 0
        self.files_sent_copied = 0
        self._date = HttpDate()

    def whole(
        self, plan: ResponsePlan, data: bytes, cache_control: str | None = None
    ) -> web.Response:
        """A small body in one Response: aiohttp writes the headers and body together."""
        self.files_sent_buffered += 1
        self._metrics.served_bytes.inc(len(data))
        response = web.Response(status=plan.status, headers=plan.headers, body=data)
        if cache_control is not None:
            response.headers["Cache-Control"] = cache_control
        return response

    def ready(self, head: ReadyHead, cache_control: str) -> ReadyAnswer:
        """A remembered small file's 200, written whole with its prepared head."""
        self.files_sent_buffered += 1
        self._metrics.served_bytes.inc(len(head.body))
        per_request = self._date.line() + f"Cache-Control: {cache_control}\r\n".encode()
        return ReadyAnswer(head, per_request)

    async def file(
        self,
        request: web.Request,
        media: MediaId,
        plan: ResponsePlan,
        path: Path,
        length: int,
        cache_control: str | None = None,
    ) -> web.StreamResponse | None:
        """Send ``plan``'s part of a cached file by sendfile; None if it vanished (nothing sent)."""
        fobj = open_cached(path, length)
        if fobj is None:
            return None
        try:
            return await self.send(request, media, plan, fobj=fobj, cache_control=cache_control)
        finally:
            close_quietly(fobj)

    async def send(
        self,
        request: web.Request,
        media: MediaId,
        plan: ResponsePlan,
        *,
        stream: Chunks | None = None,
        fobj: BinaryIO | None = None,
        cache_control: str | None = None,
    ) -> web.StreamResponse:
        """Send headers, then the body from ``fobj`` (sendfile) or ``stream`` (chunks)."""
        response = web.StreamResponse(status=plan.status, headers=plan.headers)
        if cache_control is not None:
            response.headers["Cache-Control"] = cache_control
        if plan.length is not None:
            response.content_length = plan.length
        if not plan.send_body:
            await response.prepare(request)
            await response.write_eof()
            return response
        try:
            if fobj is not None:
                start = plan.byte_range.start if plan.byte_range is not None else 0
                count = plan.length or 0
                if await send_file(request, response, fobj, start, count):
                    self.files_sent_zero_copy += 1
                else:
                    self.files_sent_copied += 1
                self._metrics.served_bytes.inc(count)
            elif stream is not None:
                await response.prepare(request)
                async for chunk in stream.iter_chunks():
                    await response.write(chunk)
                    self._metrics.served_bytes.inc(len(chunk))
                await response.write_eof()
        except ConnectionError as e:
            log.debug("client left while %s was being sent: %s", media, e)
            _close_connection(request)
        except (FetchError, OSError) as e:
            # The status line is gone already: end the connection so the client sees
            # a truncated body (short of Content-Length, or no last chunk), never a whole one.
            # (Never log the path: the token in it is a capability.)
            log.warning("sending %s failed mid-body: %s: %s", media, type(e).__name__, e)
            _close_connection(request)
        return response


def _close_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()

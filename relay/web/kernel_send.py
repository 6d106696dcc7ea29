"""``sendfile(2)`` from a cached file straight into a client's socket, on any event loop.

asyncio's ``loop.sendfile`` does this on the selector loop, but uvloop does not
implement it and would copy every byte through Python; owning this small mechanism
keeps the choice of loop one line in :mod:`relay.cli.main` (the README's Performance
section says why it is asyncio's today): wait until the transport has flushed what it
holds (the status line and headers, or the tail of the previous response on a
kept-alive connection), then call ``os.sendfile`` on the non-blocking socket until the
range is sent, waiting for writability whenever the socket buffer is full.

The loop refuses ``add_writer`` on a descriptor a transport owns (both asyncio and
uvloop), so writability is watched on a duplicate of the socket's descriptor: the same
open socket, another number, removed from the loop and closed when the send ends.
Reading from the client is paused meanwhile, as ``loop.sendfile`` does, so that its
next request is not parsed under a response still in progress.

A client that leaves, resets, or stops reading past ``TCP_USER_TIMEOUT``
(:mod:`relay.web.listener`) makes ``sendfile`` fail with a connection error, raised as
:class:`ConnectionResetError`; cancelling the send (a revocation cutting it) leaves the
socket and loop clean.
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import BinaryIO

# Errors of the connection, not of the file: the client left or the kernel gave up on it.
_CONNECTION_ERRNOS = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ETIMEDOUT, errno.ECONNABORTED}
)


def kernel_socket(transport: asyncio.Transport) -> int | None:
    """The descriptor to ``sendfile`` into, or None (TLS in-process, no socket, closing)."""
    if transport.is_closing() or transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(os, "sendfile"):
        return None
    fd = sock.fileno()
    return fd if fd >= 0 else None


async def send_range(
    transport: asyncio.Transport, sock_fd: int, fobj: BinaryIO, offset: int, count: int
) -> None:
    """Send ``count`` bytes of ``fobj`` from ``offset`` into ``sock_fd`` by ``sendfile``.

    Raises ConnectionResetError when the client is gone, OSError for a failing file
    (a short file: the cached entry changed under us).
    """
    loop = asyncio.get_running_loop()
    file_fd = fobj.fileno()
    watch = os.dup(sock_fd)
    # Pausing reads of a transport that is closing raises on some loops; it is checked.
    reading = transport.is_reading()
    if reading:
        transport.pause_reading()
    try:
        while count > 0:
            if transport.is_closing():
                raise ConnectionResetError("client connection lost during the body")
            if transport.get_write_buffer_size() == 0:
                try:
                    sent = os.sendfile(sock_fd, file_fd, offset, count)
                except BlockingIOError:
                    sent = -1
                except OSError as e:
                    if e.errno in _CONNECTION_ERRNOS:
                        raise ConnectionResetError(f"client left during the body: {e}") from e
                    raise
                if sent == 0:
                    raise OSError(errno.EIO, "cached file ended before its length")
                if sent > 0:
                    offset += sent
                    count -= sent
                    continue
            await _writable(loop, watch)
    finally:
        loop.remove_writer(watch)
        os.close(watch)
        if reading and not transport.is_closing():
            transport.resume_reading()


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Until ``fd`` is writable (or in error: the next ``sendfile`` then reports it)."""
    ready = loop.create_future()

    def on_writable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, on_writable)
    try:
        await ready
    finally:
        loop.remove_writer(fd)

"""The responses sending each media item right now, so a revocation can cut them.

A redaction, an operator's revocation or the homeserver dropping the media must also
stop responses already under way: a large download that began before must not run to
its end. The public server registers each response (its handler task and connection)
while it sends, and :meth:`InFlight.cut` ends them: the connection is aborted (the
client sees a truncated body, never a whole one) and the handler cancelled (a
``sendfile`` into an aborted socket would otherwise wait until shutdown). A kept-alive
connection is registered only while it carries that media's response.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Iterator

from aiohttp import web

from relay.core.mxc import MediaId

_Sending = tuple[asyncio.Task[object], asyncio.Transport]


class InFlight:
    """media → the (handler task, transport) pairs of the responses sending it now."""

    def __init__(self) -> None:
        self._by_media: dict[MediaId, set[_Sending]] = {}

    @contextlib.contextmanager
    def track(self, media: MediaId, request: web.Request) -> Iterator[None]:
        """Register ``request``'s response for ``media`` while the block runs."""
        transport = request.transport
        task = asyncio.current_task()
        if transport is None or task is None:
            yield
            return
        entry: _Sending = (task, transport)
        sending = self._by_media.setdefault(media, set())
        sending.add(entry)
        try:
            yield
        finally:
            sending.discard(entry)
            if not sending and self._by_media.get(media) is sending:
                del self._by_media[media]

    def cut(self, media: MediaId) -> int:
        """End every response sending ``media`` now; returns how many."""
        sending = self._by_media.pop(media, set())
        current = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for task, transport in sending:
            if task is not current:
                task.cancel()
            # abort, not close: close would first flush what is buffered for the client.
            # Soon, not now: the cancelled task first leaves loop.sendfile, which must
            # release the transport (aborting under it makes asyncio log InvalidStateError).
            loop.call_soon(_reset, transport)
        return len(sending)

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_media.values())


def _reset(transport: asyncio.Transport) -> None:
    """Abort with a TCP reset: a plain close would still deliver the kernel's send
    buffer (megabytes) to the client before the FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()

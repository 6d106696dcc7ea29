"""Room follow-ups of committed transactions: joining, declining invites, purging.

Ingest commits what a transaction means (relay.web.appservice); what must then be done
against the homeserver or the disk is done here, from the outbox (relay.store.outbox)
where it was written in the same database transaction, so a crash between the commit
and the work loses nothing: what is left is done at the next start, or after the next
commit when it failed for a reason that may pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from relay.core.mxc import InvalidMxc, MediaId, parse_mxc
from relay.store import Store
from relay.store.outbox import FollowUp, Kind, Outbox
from relay.upstream.homeserver import HomeserverClient, HomeserverError, HomeserverUnreachable

log = logging.getLogger(__name__)

JOIN_ATTEMPTS = 5


class RoomFollowUps:
    """Joins rooms, declines invites and purges revoked media after a commit."""

    def __init__(
        self,
        homeserver: HomeserverClient,
        store: Store,
        outbox: Outbox,
        purge: Callable[[MediaId], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._homeserver = homeserver
        self._store = store
        self._outbox = outbox
        self._purge = purge
        self._spawn = spawn
        # Follow-ups under way here (a retry skips them), and whether one failed for a
        # reason that may pass (the homeserver unreachable, a purge error).
        self._running: set[FollowUp] = set()
        self._failed = False

    def join_rooms(self, room_ids: Sequence[str]) -> None:
        for room_id in room_ids:
            self._spawn(self._join(room_id))

    def decline_invites(self, room_ids: Sequence[str]) -> None:
        for room_id in room_ids:
            followup = FollowUp(Kind.DECLINE, room_id)
            if followup not in self._running:
                # Marked before the task runs, so a retry spawned meanwhile skips it.
                self._running.add(followup)
                self._spawn(self._leave(room_id))

    def retry(self) -> None:
        """After a commit: if a follow-up failed earlier, do what the outbox still holds."""
        if self._failed:
            self._failed = False
            self._spawn(self.resume())

    async def resume(self) -> None:
        """Do what the last run committed but did not live to do."""
        pending = [f for f in await self._outbox.pending() if f not in self._running]
        if not pending:
            return
        log.info("resuming %d follow-up(s) of transactions committed before", len(pending))
        self.decline_invites([f.subject for f in pending if f.kind is Kind.DECLINE])
        media: list[MediaId] = []
        for f in pending:
            if f.kind is Kind.PURGE:
                try:
                    media.append(parse_mxc(f.subject))
                except InvalidMxc:
                    log.warning("dropping an outbox row with an invalid mxc: %r", f.subject)
                    await self._outbox.done(f)
        if media:
            self._spawn(self.purge(media))

    async def purge(self, media: Sequence[MediaId]) -> None:
        """Purge each item's files, then delete its outbox row (kept if the purge failed)."""
        for item in media:
            followup = FollowUp(Kind.PURGE, str(item))
            if followup in self._running:
                continue
            self._running.add(followup)
            try:
                await self._purge(item)
                await self._outbox.done(followup)
            except Exception:
                # Links are dead regardless (revocation is in the database); only the
                # files are left, until a later commit or start retries.
                log.exception("could not purge revoked %s; will retry", item)
                self._failed = True
            finally:
                self._running.discard(followup)

    async def _join(self, room_id: str) -> None:
        for attempt in range(JOIN_ATTEMPTS):
            try:
                await self._homeserver.join_room(room_id)
            except HomeserverError as e:
                if e.status in (403, 404):
                    log.warning("cannot join %s (%s); forgetting it", room_id, e)
                    await self._store.forget_room(room_id)
                    return
                log.warning("joining %s failed (%s), attempt %d", room_id, e, attempt + 1)
            except HomeserverUnreachable as e:
                log.warning("joining %s failed (%s), attempt %d", room_id, e, attempt + 1)
            else:
                await self._store.mark_room_joined(room_id)
                log.info("joined %s", room_id)
                return
            await asyncio.sleep(min(30, 2**attempt))
        log.error("giving up joining %s for now; will retry at the next start", room_id)

    async def _leave(self, room_id: str) -> None:
        followup = FollowUp(Kind.DECLINE, room_id)
        try:
            await self._homeserver.leave_room(room_id)
        except HomeserverUnreachable as e:
            # The outbox row stays: the next commit (or start) tries again.
            log.warning("could not decline the invite to %s: %s", room_id, e)
            self._failed = True
            return
        except HomeserverError as e:
            # The homeserver's word (no such invite any more): retrying cannot help.
            log.warning("could not decline the invite to %s: %s", room_id, e)
        finally:
            self._running.discard(followup)
        await self._outbox.done(followup)

"""The Application Service API (spec: application-service-api.md), on the internal listener.

A transaction is acknowledged with 200 ``{}`` only after its id and everything
extracted from it are committed together, so a crash at any point makes the
homeserver retry and nothing is lost or counted twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from relay.core.errors import Codes, MatrixError
from relay.core.ingest_plan import RoomPolicy, TransactionPlan, plan_transaction, room_ids
from relay.core.mxc import MediaId
from relay.store import CommitResult, Store
from relay.support.metrics import Metrics
from relay.web.auth import check_token
from relay.web.json_body import parse_json_object, read_json_object, salvage_items

log = logging.getLogger(__name__)

# Prefixed routes (v1) and the legacy unprefixed ones (spec: "Legacy routes").
V1 = "/_matrix/app/v1"
LEGACY_THIRDPARTY = "/_matrix/app/unstable/thirdparty"


@dataclass(frozen=True, slots=True)
class IngestHooks:
    """What happens after a commit: join invited rooms, decline others, act on revocations.

    ``retry_followups`` runs after every commit: follow-ups of earlier transactions that
    failed for a reason that may have passed (relay.store.outbox) are tried again.
    """

    join_rooms: Callable[[Sequence[str]], None]
    decline_invites: Callable[[Sequence[str]], None]
    revoked: Callable[[Sequence[MediaId]], Awaitable[None]]
    retry_followups: Callable[[], None]


class AppserviceAPI:
    def __init__(
        self,
        store: Store,
        hs_token: str,
        policy: RoomPolicy,
        metrics: Metrics,
        hooks: IngestHooks,
    ) -> None:
        self.store = store
        self._hs_token = hs_token
        self.policy = policy
        self.metrics = metrics
        self.hooks = hooks

    def routes(self) -> list[web.RouteDef]:
        r: list[web.RouteDef] = []
        for prefix in (V1, ""):
            r += [
                web.put(prefix + "/transactions/{txn_id}", self.put_transaction),
                web.get(prefix + "/users/{user_id}", self.query_user),
                web.get(prefix + "/rooms/{alias}", self.query_room),
            ]
        r.append(web.post(V1 + "/ping", self.ping))
        for prefix in (V1 + "/thirdparty", LEGACY_THIRDPARTY):
            r += [
                web.get(prefix + "/protocol/{protocol}", self.thirdparty_protocol),
                web.get(prefix + "/location", self.thirdparty_empty),
                web.get(prefix + "/location/{protocol}", self.thirdparty_empty),
                web.get(prefix + "/user", self.thirdparty_empty),
                web.get(prefix + "/user/{protocol}", self.thirdparty_empty),
            ]
        return r

    # ------------------------------------------------------------ handlers

    async def put_transaction(self, request: web.Request) -> web.Response:
        check_token(request, self._hs_token)
        txn_id = request.match_info["txn_id"]
        if "\x00" in txn_id:
            # PostgreSQL text cannot hold NUL, so storing it would fail on every retry.
            # Homeservers number their transactions (Synapse: an integer sequence), so
            # only a hand-made request with the hs_token gets here: refusing it stalls
            # no homeserver.
            raise MatrixError(400, Codes.INVALID_PARAM, "Transaction id must not contain NUL")
        events = await self._read_events(request)
        started = time.perf_counter()
        try:
            # A repeated id is detected by the commit itself (ON CONFLICT … RETURNING).
            rooms = room_ids(events)
            served = await self.store.served_rooms(rooms)
            levels = await self.store.power_levels(rooms)
            plan = plan_transaction(events, served, self.policy, levels)
            result = await self.store.commit_transaction(txn_id, plan)
        except Exception:
            # 500 makes the homeserver retry the same id later; nothing was committed.
            self.metrics.transactions.labels("failed").inc()
            log.exception("could not store transaction %s; the homeserver will retry", txn_id)
            raise MatrixError(500, Codes.UNKNOWN, "Could not store the transaction") from None
        if result is None:
            self.metrics.transactions.labels("duplicate").inc()
            return web.json_response({})
        self.metrics.transaction_seconds.observe(time.perf_counter() - started)
        self._count(plan)
        await self._after_commit(plan, result)
        return web.json_response({})

    async def _read_events(self, request: web.Request) -> list[Any]:
        raw = await request.read()  # bounded by the app's client_max_size → 413
        try:
            events = parse_json_object(raw).get("events")
        except MatrixError as refused:
            # A body that fails as a whole (one event nested too deep, an integer too long
            # to parse, one broken event) would fail the same way on every retry, and the
            # homeserver retries forever while every later event (redactions too) waits.
            # So the events that parse on their own are kept and the others dropped and
            # counted; only a body that is not a transaction at all is refused (a 400
            # that no homeserver's own transaction provokes).
            salvaged = salvage_items(raw, "events")
            if salvaged is None:
                raise refused from None
            events, dropped = salvaged
            self.metrics.events.labels("rejected").inc(dropped)
            log.warning("dropped %d unparsable event(s) of a transaction: %s", dropped, refused)
        if not isinstance(events, list):
            raise MatrixError(400, Codes.BAD_JSON, "'events' must be a list")
        return events

    def _count(self, plan: TransactionPlan) -> None:
        m = self.metrics
        m.transactions.labels("processed").inc()
        m.events.labels("processed").inc(plan.events - plan.rejected)
        if plan.rejected:
            m.events.labels("rejected").inc(plan.rejected)
        if plan.trimmed:
            # Recorded, but without a field no column could hold (relay.core.events).
            m.events.labels("trimmed").inc(plan.trimmed)
        if plan.invalid_references:
            m.invalid_mxc.inc(plan.invalid_references)
        for ref in plan.references:
            m.media_references.labels(str(ref.ref.role)).inc()

    async def _after_commit(self, plan: TransactionPlan, result: CommitResult) -> None:
        self.hooks.retry_followups()
        if result.rooms_to_join:
            self.hooks.join_rooms(result.rooms_to_join)
        if plan.invites_to_decline:
            self.hooks.decline_invites(sorted(plan.invites_to_decline))
        if result.revoked:
            self.metrics.revocations.inc(len(result.revoked))
            log.info(
                "revoked %d media item(s): their last live reference was redacted",
                len(result.revoked),
            )
            try:
                await self.hooks.revoked(result.revoked)
            except Exception:
                # Already committed: the serving side checks the database, so links are dead
                # regardless; only the cache purge failed.
                log.exception("could not purge revoked media from the cache")

    async def query_user(self, request: web.Request) -> web.Response:
        check_token(request, self._hs_token)
        if request.match_info["user_id"] == self.policy.bot_user_id:
            return web.json_response({})
        raise MatrixError(404, Codes.NOT_FOUND, "The relay owns no users besides its bot")

    async def query_room(self, request: web.Request) -> web.Response:
        check_token(request, self._hs_token)
        raise MatrixError(404, Codes.NOT_FOUND, "The relay owns no room aliases")

    async def ping(self, request: web.Request) -> web.Response:
        check_token(request, self._hs_token)
        # The spec's request body is optional ({"transaction_id"?}); Synapse sends one.
        body = await read_json_object(request, optional=True)
        log.info("homeserver ping (transaction_id=%s)", body.get("transaction_id"))
        return web.json_response({})

    async def thirdparty_protocol(self, request: web.Request) -> web.Response:
        check_token(request, self._hs_token)
        raise MatrixError(404, Codes.NOT_FOUND, "The relay bridges no third-party protocol")

    async def thirdparty_empty(self, request: web.Request) -> web.Response:
        check_token(request, self._hs_token)
        return web.json_response([])

"""Start-up, wiring and shutdown of one relay process: two listeners, one database."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web

from relay.config import Config
from relay.errors import error_middleware
from relay.homeserver import HomeserverClient, HomeserverError, HomeserverUnreachable
from relay.ingest import AppserviceAPI, IngestHooks
from relay.ingest_plan import RoomPolicy
from relay.metrics import Metrics
from relay.mxc import MediaId
from relay.store import DatabaseUnusable, Store, open_database

log = logging.getLogger(__name__)

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_HOMESERVER = 4
EXIT_DATABASE = 5
EXIT_NEEDS_SETUP = 6

JOIN_ATTEMPTS = 5


class StartupError(Exception):
    """Start-up failed for a reason the operator can fix; ``exit_code`` says which kind."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class Relay:
    """One relay process. ``start()`` checks everything, then listens; ``stop()`` undoes it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self._runners: list[web.AppRunner] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.session: aiohttp.ClientSession | None = None
        self.store: Store | None = None
        self.homeserver: HomeserverClient | None = None
        self._db: Any = None
        self.internal_url = ""
        self.public_url = ""

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, limit_per_host=50),
            headers={"User-Agent": "matrix-media-relay"},
        )
        try:
            self._db = await open_database(cfg.database)
        except DatabaseUnusable as e:
            raise StartupError(EXIT_DATABASE, str(e)) from e
        self.store = Store(self._db)
        self.homeserver = HomeserverClient(
            self.session, cfg.homeserver.address, cfg.appservice.as_token
        )
        await self._check_homeserver()

        internal = web.Application(
            middlewares=[error_middleware], client_max_size=cfg.appservice.max_transaction_size
        )
        appservice = AppserviceAPI(
            self.store,
            cfg.appservice.hs_token,
            RoomPolicy.build(
                cfg.bot_user_id, cfg.appservice.allowed_inviters, cfg.appservice.room_namespace
            ),
            self.metrics,
            IngestHooks(self.join_rooms, self.decline_invites, self._on_revoked),
        )
        internal.add_routes(appservice.routes())
        internal.add_routes([web.get("/_relay/health", health), web.get("/metrics", self._metrics)])

        public = web.Application(middlewares=[error_middleware])
        public.add_routes([web.get("/_relay/health", health)])

        self.internal_url = await self._listen(
            internal, cfg.appservice.hostname, cfg.appservice.port
        )
        self.public_url = await self._listen(public, cfg.public.hostname, cfg.public.port)
        log.info("internal listener (homeserver and bridges) on %s", self.internal_url)
        log.info(
            "public listener (signed media links) on %s, links start with %s",
            self.public_url,
            cfg.public.url,
        )
        self.join_rooms(await self.store.rooms_joining())

    async def _check_homeserver(self) -> None:
        assert self.homeserver is not None
        cfg = self.config
        try:
            versions = await self.homeserver.versions()
            await self.homeserver.ensure_bot(cfg.appservice.bot_localpart, cfg.bot_user_id)
        except HomeserverUnreachable as e:
            raise StartupError(EXIT_HOMESERVER, f"homeserver unreachable: {e}") from e
        except HomeserverError as e:
            raise StartupError(
                EXIT_HOMESERVER,
                f"homeserver rejected the relay's as_token as {cfg.bot_user_id}: {e} "
                "(is the registration file loaded by the homeserver?)",
            ) from e
        log.info(
            "homeserver %s supports %s",
            cfg.homeserver.address,
            ", ".join(v for v in versions.get("versions", []) if isinstance(v, str)),
        )

    async def _listen(self, app: web.Application, host: str, port: int) -> str:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise StartupError(EXIT_CONFIG, f"cannot listen on {host}:{port}: {e.strerror}") from e
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    # ------------------------------------------------------------ rooms

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def join_rooms(self, room_ids: Sequence[str]) -> None:
        for room_id in room_ids:
            self._spawn(self._join(room_id))

    def decline_invites(self, room_ids: Sequence[str]) -> None:
        for room_id in room_ids:
            self._spawn(self._leave(room_id))

    async def _join(self, room_id: str) -> None:
        assert self.homeserver is not None and self.store is not None
        for attempt in range(JOIN_ATTEMPTS):
            try:
                await self.homeserver.join_room(room_id)
            except HomeserverError as e:
                if e.status in (403, 404):
                    log.warning("cannot join %s (%s); forgetting it", room_id, e)
                    await self.store.forget_room(room_id)
                    return
                log.warning("joining %s failed (%s), attempt %d", room_id, e, attempt + 1)
            except HomeserverUnreachable as e:
                log.warning("joining %s failed (%s), attempt %d", room_id, e, attempt + 1)
            else:
                await self.store.mark_room_joined(room_id)
                log.info("joined %s", room_id)
                return
            await asyncio.sleep(min(30, 2**attempt))
        log.error("giving up joining %s for now; will retry at the next start", room_id)

    async def _leave(self, room_id: str) -> None:
        assert self.homeserver is not None
        try:
            await self.homeserver.leave_room(room_id)
        except (HomeserverError, HomeserverUnreachable) as e:
            log.warning("could not decline the invite to %s: %s", room_id, e)

    async def _on_revoked(self, media: Sequence[MediaId]) -> None:
        """Hook for the serving side: purge caches of revoked media (wired in later)."""

    # ------------------------------------------------------------ shutdown

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._db is not None:
            await self._db.stop()
            self._db = None
        if self.session is not None:
            await self.session.close()
            self.session = None

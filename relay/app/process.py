"""One relay process: start-up, its two listeners, revocation follow-ups, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from relay.app.media import build_media
from relay.app.rooms import RoomFollowUps
from relay.app.workers import PublicWorkers, merged_exposition
from relay.config.settings import Config
from relay.core.exit_codes import EXIT_CONFIG, EXIT_DATABASE, EXIT_HOMESERVER, StartupError
from relay.core.ingest_plan import RoomPolicy
from relay.core.mxc import MediaId
from relay.media.downloads import MediaSource
from relay.media.pipeline import MediaPipeline
from relay.media.renditions import Renditions
from relay.media.revocation import RevocationCheck
from relay.store import DatabaseUnusable, Store, open_database
from relay.store.audit import AuditTrail, AuditWriter
from relay.store.leader import Leadership, leadership
from relay.store.outbox import Outbox
from relay.store.revocation_feed import RevocationFeed, revocation_feed
from relay.store.takedown import HOMESERVER, REDACTION, Takedowns
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.homeserver import HomeserverClient, HomeserverError, HomeserverUnreachable
from relay.web.appservice import AppserviceAPI, IngestHooks
from relay.web.edge import PublicEdge
from relay.web.fast_path import FastPath
from relay.web.listener import ConnectionLimits, LimitedSite, ensure_descriptors, runner_args
from relay.web.middleware import error_middleware
from relay.web.public import HEALTH_PATH, MediaServer

if TYPE_CHECKING:
    from relay.media.shared_tier import BucketTier  # only with media.store (botocore)

log = logging.getLogger(__name__)

READY_TIMEOUT = 5.0


@contextlib.contextmanager
def stop_signals() -> Iterator[asyncio.Event]:
    """An event that SIGTERM or SIGINT sets while the block runs (handlers removed after).

    Installed before start-up, so a signal during start-up stops cleanly afterwards
    instead of killing the process half-started.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class Relay:
    """One relay process. ``start()`` checks everything, then listens; ``stop()`` undoes it.

    ``public_only``: a public worker (relay.app.workers) started by a primary that has
    checked the homeserver already: the public listener and what it needs, nothing else.
    """

    def __init__(self, config: Config, *, public_only: bool = False) -> None:
        self.config = config
        self.public_only = public_only
        # A primary's public workers (set by whoever starts them): /metrics shows theirs too.
        self.public_workers: PublicWorkers | None = None
        self.metrics = Metrics()
        self._runners: list[web.AppRunner] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.session: aiohttp.ClientSession | None = None
        self.store: Store | None = None
        self.audit: AuditWriter | None = None
        self.leader: Leadership | None = None
        self.outbox: Outbox | None = None
        self.rooms: RoomFollowUps | None = None
        self.homeserver: HomeserverClient | None = None
        self.capabilities: Capabilities | None = None
        self.media_source: MediaSource | None = None
        self.renditions: Renditions | None = None
        self.revocations: RevocationCheck | None = None
        self.revocation_feed: RevocationFeed | None = None
        self.pipeline: MediaPipeline | None = None
        self.tier: BucketTier | None = None
        self.media_server: MediaServer | None = None
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
        cfg, public_only = self.config, self.public_only
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, limit_per_host=50),
            headers={"User-Agent": "matrix-media-relay"},
        )
        try:
            self._db = await open_database(cfg.database)
        except DatabaseUnusable as e:
            raise StartupError(EXIT_DATABASE, str(e)) from e
        self.store = Store(self._db)
        self.outbox = Outbox(self._db)
        self.audit = AuditWriter(AuditTrail(self._db))
        self.audit.start()
        # Cluster-wide jobs run in one process per database (relay.store.leader), one
        # of the primaries (a public worker has no /metrics to show relay_cluster_leader);
        # more are registered with self.leader.add_job(name, coroutine function).
        self.leader = leadership(self._db, on_change=self.metrics.cluster_leader.set)
        trail, retention = AuditTrail(self._db), cfg.signing.audit_retention
        self.leader.add_job("audit retention", lambda: trail.sweep_forever(retention))
        if not public_only:
            self._spawn(self.leader.run())  # stop() cancels it: jobs stopped, lock released
        self.homeserver = HomeserverClient(
            self.session, cfg.homeserver.address, cfg.appservice.as_token
        )
        if not public_only:
            await self._check_homeserver()
        self.rooms = RoomFollowUps(
            self.homeserver, self.store, self.outbox, self._purge, self._spawn
        )

        stack = await build_media(
            cfg,
            self.session,
            self.store,
            self.metrics,
            self.audit,
            on_discovered=self._on_discovered,
            on_gone=self._on_gone,
        )
        self.capabilities = stack.capabilities
        self.media_source, self.renditions = stack.source, stack.renditions
        self.revocations, self.pipeline = stack.revocations, stack.pipeline
        self.tier = stack.tier
        if self.tier is not None and self.tier.max_size > 0:
            # Its eviction is cluster-wide: listed by the leader, not by every process.
            self.leader.add_job("shared tier eviction", self.tier.sweep_forever)
        self.media_server = media_server = stack.media_server
        # Revocations committed elsewhere: pushed on PostgreSQL, polled on SQLite.
        self.revocation_feed = revocation_feed(self._db)
        await self.revocation_feed.start()
        self._spawn(self.revocations.watch(self.revocation_feed))

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
            IngestHooks(
                self.rooms.join_rooms,
                self.rooms.decline_invites,
                self._on_revoked,
                self.rooms.retry,
            ),
        )
        internal.add_routes(appservice.routes())
        internal.add_routes(stack.bridge_api.routes())
        internal.add_routes(
            [
                web.get("/_relay/health", health),
                web.get("/_relay/ready", self._ready),
                # The mautrix bridges' convention, so their probes and dashboards fit.
                web.get("/_matrix/mau/live", health),
                web.get("/_matrix/mau/ready", self._ready),
                web.get("/metrics", self._metrics),
            ]
        )

        # One middleware: errors, headers, counters and the access log (relay.web.edge).
        edge = PublicEdge(self.metrics, skip=HEALTH_PATH)
        public = web.Application(middlewares=[edge.middleware])
        public.add_routes([web.get("/_relay/health", health)])
        public.add_routes(media_server.routes())
        public.add_routes(stack.compat_routes)

        if not public_only:
            self.internal_url = await self._listen(
                internal, cfg.appservice.hostname, cfg.appservice.port
            )
        limits = ConnectionLimits(
            cfg.public.header_timeout, cfg.public.send_timeout, cfg.public.max_connections
        )
        ensure_descriptors(limits)
        self.public_url = await self._listen(
            public,
            cfg.public.hostname,
            cfg.public.port,
            limits,
            reuse_port=cfg.public.workers > 1,
            fast=FastPath(media_server, edge),
        )
        if public_only:
            log.info("public listener (signed media links) on %s", self.public_url)
            return
        log.info("internal listener (homeserver and bridges) on %s", self.internal_url)
        log.info(
            "public listener (signed media links) on %s, links start with %s",
            self.public_url,
            cfg.public.url,
        )
        self.rooms.join_rooms(await self.store.rooms_joining())
        await self.rooms.resume()

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

    async def _listen(
        self,
        app: web.Application,
        host: str,
        port: int,
        limits: ConnectionLimits | None = None,
        *,
        reuse_port: bool = False,
        fast: FastPath | None = None,
    ) -> str:
        """Serve ``app``; the public listener gets ``limits`` (relay.web.listener).

        No access log on either: a public path is a signed link, a capability.
        ``reuse_port``: the port is shared with the other processes of public.workers.
        """
        extra = runner_args(limits) if limits is not None else {}
        runner = web.AppRunner(app, access_log=None, handle_signals=False, **extra)
        await runner.setup()
        self._runners.append(runner)
        site: web.BaseSite = (
            LimitedSite(runner, host, port, limits, self.metrics, reuse_port=reuse_port, fast=fast)
            if limits is not None
            else web.TCPSite(runner, host, port)
        )
        try:
            await site.start()
        except OSError as e:
            raise StartupError(EXIT_CONFIG, f"cannot listen on {host}:{port}: {e.strerror}") from e
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        if self.public_workers is not None:
            # One scrape for every process of public.workers, each series labelled.
            workers = await self.public_workers.scrape()
            body = merged_exposition([("primary", body), *workers])
        return web.Response(body=body, content_type="text/plain")

    async def _ready(self, request: web.Request) -> web.Response:
        """200 when the database answers and the homeserver accepts our token, else 503."""
        problems: list[str] = []
        if self._db is None:
            problems.append("database: not open")
        else:
            try:
                await asyncio.wait_for(self._db.fetchval("SELECT 1"), READY_TIMEOUT)
            except Exception as e:
                problems.append(f"database: {type(e).__name__}")
        if self.capabilities is not None and not self.capabilities.identity_ok:
            problems.append(f"homeserver: {self.capabilities.last_error or 'token refused'}")
        if problems:
            return web.json_response({"status": "unavailable", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    # ------------------------------------------------------------ revocations

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_revoked(self, media: Sequence[MediaId]) -> None:
        """After a redaction commits: refuse the media at once here, and purge its cache."""
        for item in media:
            if self.revocations is not None:
                self.revocations.mark_revoked(item)
            self.metrics.revocations_by_source.labels(REDACTION).inc()
        if self.rooms is not None:
            await self.rooms.purge(media)

    async def _on_discovered(self, media: MediaId) -> None:
        """Another process (or ``media-relay revoke``) revoked it: purge here, count by source."""
        await self._purge(media)
        if self._db is not None:
            source = await Takedowns(self._db).source(media)
            self.metrics.revocations_by_source.labels(source or REDACTION).inc()

    async def _on_gone(self, media: MediaId) -> None:
        """Revalidation found it gone upstream: refuse it here at once, purge, record it."""
        if self.revocations is not None:
            self.revocations.mark_revoked(media)
        self.metrics.revocations_by_source.labels(HOMESERVER).inc()
        await self._purge(media)
        if self._db is not None:
            # For every process on the database (relay.store.revocation_feed).
            await Takedowns(self._db).revoke(media, HOMESERVER)

    async def _purge(self, media: MediaId) -> None:
        """Forget the media here (also when another process revoked it), then its files."""
        if self.media_server is not None:
            self.media_server.forget(media)
        if self.pipeline is not None:
            await self.pipeline.purge(media)

    # ------------------------------------------------------------ shutdown

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self.pipeline is not None:
            await self.pipeline.close()
        if self.tier is not None:
            await self.tier.close()
            self.tier = None
        if self.audit is not None:
            # Before the database closes: rows of links already handed out are kept.
            await self.audit.close()
        if self.capabilities is not None:
            await self.capabilities.stop()
        if self.revocation_feed is not None:
            await self.revocation_feed.close()
            self.revocation_feed = None
        if self._db is not None:
            await self._db.stop()
            self._db = None
        if self.session is not None:
            await self.session.close()
            self.session = None

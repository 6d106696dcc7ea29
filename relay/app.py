"""Start-up, wiring and shutdown of one relay process: two listeners, one database."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from relay.config.settings import Config
from relay.core.exit_codes import EXIT_CONFIG, EXIT_DATABASE, EXIT_HOMESERVER, StartupError
from relay.core.ingest_plan import RoomPolicy
from relay.core.minting import LinkMinter
from relay.core.mxc import InvalidMxc, MediaId, parse_mxc
from relay.core.signing import KeyRing, SigningKey
from relay.media.cache import MediaCache
from relay.media.downloads import MediaSource
from relay.media.pipeline import MediaPipeline
from relay.media.renditions import Renditions
from relay.media.revalidation import Revalidator
from relay.media.revocation import RevocationCheck
from relay.media.thumbnails import ThumbnailLimits
from relay.store import DatabaseUnusable, Store, open_database
from relay.store.audit import AuditTrail, AuditWriter
from relay.store.outbox import FollowUp, Kind, Outbox
from relay.store.takedown import HOMESERVER, REDACTION, Takedowns
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.fetcher import MediaFetcher, Timeouts
from relay.upstream.homeserver import HomeserverClient, HomeserverError, HomeserverUnreachable
from relay.upstream.probe import MediaProbe
from relay.upstream.redirects import RedirectPolicy
from relay.web.appservice import AppserviceAPI, IngestHooks
from relay.web.bridge_api import BridgeAPI
from relay.web.compat import CompatServer, SeenCheck
from relay.web.legacy_media import LegacyMedia
from relay.web.listener import ConnectionLimits, LimitedSite, ensure_descriptors, runner_args
from relay.web.middleware import error_middleware
from relay.web.public import MediaServer

log = logging.getLogger(__name__)

JOIN_ATTEMPTS = 5
# A revalidation holds the requests for its item while it runs: never for long.
PROBE_TIMEOUT = 10.0
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


def key_ring(config: Config) -> KeyRing:
    """The configured signing keys (the first signs, all verify)."""
    return KeyRing([SigningKey(k.id, k.secret.encode()) for k in config.signing.keys])


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
        self.audit: AuditWriter | None = None
        self.outbox: Outbox | None = None
        # Outbox follow-ups under way here (a retry skips them), and whether one failed
        # for a reason that may pass (the homeserver unreachable, a purge error).
        self._followups_running: set[FollowUp] = set()
        self._followups_failed = False
        self.homeserver: HomeserverClient | None = None
        self.capabilities: Capabilities | None = None
        self.media_source: MediaSource | None = None
        self.renditions: Renditions | None = None
        self.revocations: RevocationCheck | None = None
        self.pipeline: MediaPipeline | None = None
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
        self.outbox = Outbox(self._db)
        self.audit = AuditWriter(AuditTrail(self._db))
        self.audit.start()
        self._spawn(AuditTrail(self._db).sweep_forever(cfg.signing.audit_retention))
        self.homeserver = HomeserverClient(
            self.session, cfg.homeserver.address, cfg.appservice.as_token
        )
        await self._check_homeserver()

        media_server, bridge_api = await self._start_media()
        assert self.revocations is not None
        # Revocations committed elsewhere reach this process within a second.
        self._spawn(self.revocations.watch(Takedowns(self._db)))

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
                self.join_rooms, self.decline_invites, self._on_revoked, self.retry_followups
            ),
        )
        internal.add_routes(appservice.routes())
        internal.add_routes(bridge_api.routes())
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

        public = web.Application(middlewares=[media_server.middleware, error_middleware])
        public.add_routes([web.get("/_relay/health", health)])
        public.add_routes(media_server.routes())
        public.add_routes(self._compat_routes(media_server))

        self.internal_url = await self._listen(
            internal, cfg.appservice.hostname, cfg.appservice.port
        )
        limits = ConnectionLimits(
            cfg.public.header_timeout, cfg.public.send_timeout, cfg.public.max_connections
        )
        ensure_descriptors(limits)
        self.public_url = await self._listen(public, cfg.public.hostname, cfg.public.port, limits)
        log.info("internal listener (homeserver and bridges) on %s", self.internal_url)
        log.info(
            "public listener (signed media links) on %s, links start with %s",
            self.public_url,
            cfg.public.url,
        )
        self.join_rooms(await self.store.rooms_joining())
        await self._resume_followups()

    async def _start_media(self) -> tuple[MediaServer, BridgeAPI]:
        """Capabilities, fetcher, cache, revocations; the public server and the bridge API."""
        assert self.session is not None and self.store is not None
        cfg = self.config
        media = cfg.media
        self.capabilities = Capabilities(
            cfg.homeserver.address, cfg.appservice.as_token, session=self.session
        )
        self.capabilities.start()
        fetcher = MediaFetcher(
            self.session,
            cfg.homeserver.address,
            cfg.appservice.as_token,
            self.capabilities,
            self.metrics,
            max_size=media.max_size,
            timeouts=Timeouts(media.connect_timeout, media.read_timeout, media.download_timeout),
            not_found_ttl=media.not_found_ttl,
            redirect_policy=RedirectPolicy.from_entries(cfg.homeserver.redirect_hosts),
            local_server_name=cfg.homeserver.domain,
        )
        cache = MediaCache(media.cache_dir, media.cache_max_size, self.metrics)
        try:
            await cache.start()
        except OSError as e:
            raise StartupError(
                EXIT_CONFIG, f"media.cache_dir {media.cache_dir} is unusable: {e}"
            ) from e
        self.media_source = MediaSource(fetcher, cache, self.metrics)
        self.renditions = Renditions(
            self.media_source,
            self.metrics,
            limits=ThumbnailLimits(
                max_side=cfg.thumbnails.max_side, max_pixels=cfg.thumbnails.max_pixels
            ),
            strip_metadata=media.strip_metadata,
        )
        self.revocations = RevocationCheck(self.store, on_discovered=self._on_discovered)
        probe = MediaProbe(
            self.session,
            cfg.homeserver.address,
            cfg.appservice.as_token,
            fetcher,
            self.metrics,
            timeout=min(PROBE_TIMEOUT, media.read_timeout),
        )
        revalidator = Revalidator(
            probe, self._on_gone, self.metrics, interval=media.revalidate_after
        )
        self.pipeline = MediaPipeline(
            self.store,
            self.revocations,
            self.media_source,
            self.renditions,
            revalidator=revalidator,
        )
        ring = key_ring(cfg)
        try:
            self.media_server = MediaServer(
                ring, self.pipeline, self.metrics, path_prefix=cfg.public.path_prefix
            )
        except ValueError as e:
            raise StartupError(EXIT_CONFIG, str(e)) from e
        bridge_api = BridgeAPI(
            cfg.bridges,
            LinkMinter(ring, cfg.public.url),
            self.store,
            self.revocations,
            self.metrics,
            default_ttl=cfg.signing.ttl,
            require_seen=cfg.signing.require_seen,
            max_thumbnail_side=cfg.thumbnails.max_side,
            audit=self.audit,
        )
        return self.media_server, bridge_api

    def _compat_routes(self, media_server: MediaServer) -> list[web.RouteDef]:
        """Routes for the links bridges mint themselves (``compat:``), and legacy paths."""
        cfg = self.config
        assert self.store is not None and self.pipeline is not None
        seen = SeenCheck(self.store)
        routes: list[web.RouteDef] = []
        if cfg.compat.legacy_media:
            legacy = LegacyMedia(
                media_server, self.pipeline, seen, max_thumbnail_side=cfg.thumbnails.max_side
            )
            routes += legacy.routes()
        try:
            compat = CompatServer(
                cfg.compat,
                media_server,
                self.pipeline,
                seen,
                require_seen=cfg.signing.require_seen,
            )
            routes += compat.routes()
        except (OSError, ValueError) as e:  # a JWK file gone since check-config, braces
            raise StartupError(EXIT_CONFIG, str(e)) from e
        return routes

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
        self, app: web.Application, host: str, port: int, limits: ConnectionLimits | None = None
    ) -> str:
        """Serve ``app``; the public listener gets ``limits`` (relay.web.listener).

        No access log on either: a public path is a signed link, a capability.
        """
        extra = runner_args(limits) if limits is not None else {}
        runner = web.AppRunner(app, access_log=None, handle_signals=False, **extra)
        await runner.setup()
        self._runners.append(runner)
        site: web.BaseSite = (
            LimitedSite(runner, host, port, limits, self.metrics)
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
        return web.Response(body=self.metrics.render(), content_type="text/plain")

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
            followup = FollowUp(Kind.DECLINE, room_id)
            if followup not in self._followups_running:
                # Marked before the task runs, so a retry spawned meanwhile skips it.
                self._followups_running.add(followup)
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
        assert self.homeserver is not None and self.outbox is not None
        followup = FollowUp(Kind.DECLINE, room_id)
        try:
            await self.homeserver.leave_room(room_id)
        except HomeserverUnreachable as e:
            # The outbox row stays: the next commit (or start) tries again.
            log.warning("could not decline the invite to %s: %s", room_id, e)
            self._followups_failed = True
            return
        except HomeserverError as e:
            # The homeserver's word (no such invite any more): retrying cannot help.
            log.warning("could not decline the invite to %s: %s", room_id, e)
        finally:
            self._followups_running.discard(followup)
        await self.outbox.done(followup)

    def retry_followups(self) -> None:
        """After a commit: if a follow-up failed earlier, do what the outbox still holds."""
        if self._followups_failed:
            self._followups_failed = False
            self._spawn(self._resume_followups())

    async def _resume_followups(self) -> None:
        """Do what the last run committed but did not live to do (relay.store.outbox)."""
        assert self.outbox is not None
        pending = [f for f in await self.outbox.pending() if f not in self._followups_running]
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
                    await self.outbox.done(f)
        if media:
            self._spawn(self._purge_followups(media))

    async def _on_revoked(self, media: Sequence[MediaId]) -> None:
        """After a redaction commits: refuse the media at once here, and purge its cache."""
        for item in media:
            if self.revocations is not None:
                self.revocations.mark_revoked(item)
            self.metrics.revocations_by_source.labels(REDACTION).inc()
        await self._purge_followups(media)

    async def _purge_followups(self, media: Sequence[MediaId]) -> None:
        """Purge each item's files, then delete its outbox row (kept if the purge failed)."""
        assert self.outbox is not None
        for item in media:
            followup = FollowUp(Kind.PURGE, str(item))
            if followup in self._followups_running:
                continue
            self._followups_running.add(followup)
            try:
                await self._purge(item)
                await self.outbox.done(followup)
            except Exception:
                # Links are dead regardless (revocation is in the database); only the
                # files are left, until a later commit or start retries.
                log.exception("could not purge revoked %s; will retry", item)
                self._followups_failed = True
            finally:
                self._followups_running.discard(followup)

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
            # For every process on the database (within a second, like a redaction).
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
        if self.audit is not None:
            # Before the database closes: rows of links already handed out are kept.
            await self.audit.close()
        if self.capabilities is not None:
            await self.capabilities.stop()
        if self._db is not None:
            await self._db.stop()
            self._db = None
        if self.session is not None:
            await self.session.close()
            self.session = None

"""Building the media side of a relay process from its config: upstream to public server.

Everything here is constructed, none of it runs yet except the capability check, which
starts last so a failure before it leaves nothing behind.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from relay.config.settings import Config
from relay.core.exit_codes import EXIT_CONFIG, StartupError
from relay.core.minting import LinkMinter
from relay.core.mxc import MediaId
from relay.core.signing import KeyRing, SigningKey
from relay.media.cache import MediaCache
from relay.media.downloads import MediaSource
from relay.media.pipeline import MediaPipeline
from relay.media.renditions import Renditions
from relay.media.revalidation import Revalidator
from relay.media.revocation import RevocationCheck
from relay.media.thumbnails import ThumbnailLimits
from relay.store import Store
from relay.store.audit import AuditWriter
from relay.support.metrics import Metrics
from relay.upstream.capabilities import Capabilities
from relay.upstream.fetcher import MediaFetcher, Timeouts
from relay.upstream.probe import MediaProbe
from relay.upstream.redirects import RedirectPolicy
from relay.web.bridge_api import BridgeAPI
from relay.web.compat import CompatServer, SeenCheck
from relay.web.legacy_media import LegacyMedia
from relay.web.public import MediaServer

if TYPE_CHECKING:
    # Imported only when media.store is set: botocore alone costs ~25 MiB of memory.
    from relay.media.shared_tier import BucketTier

log = logging.getLogger(__name__)

# A revalidation holds the requests for its item while it runs: never for long.
PROBE_TIMEOUT = 10.0


def key_ring(config: Config) -> KeyRing:
    """The configured signing keys (the first signs, all verify)."""
    return KeyRing([SigningKey(k.id, k.secret.encode()) for k in config.signing.keys])


@dataclass(frozen=True, slots=True)
class MediaStack:
    """The parts a relay process serves media with."""

    capabilities: Capabilities
    source: MediaSource
    renditions: Renditions
    revocations: RevocationCheck
    pipeline: MediaPipeline
    media_server: MediaServer
    bridge_api: BridgeAPI
    # Links bridges mint themselves (compat:) and the legacy paths.
    compat_routes: list[web.RouteDef]
    # media.store, started: close it after the pipeline (None: local disk only).
    tier: BucketTier | None = None


async def build_media(
    cfg: Config,
    session: aiohttp.ClientSession,
    store: Store,
    metrics: Metrics,
    audit: AuditWriter | None,
    *,
    on_discovered: Callable[[MediaId], Awaitable[None]],
    on_gone: Callable[[MediaId], Awaitable[None]],
) -> MediaStack:
    """Fetcher, cache, renditions, revocations, pipeline; the public server and bridge API.

    ``on_discovered``: another process revoked an item; ``on_gone``: the homeserver no
    longer serves it. Raises StartupError (exit 3) for an unusable cache or config.
    """
    media = cfg.media
    capabilities = Capabilities(cfg.homeserver.address, cfg.appservice.as_token, session=session)
    fetcher = MediaFetcher(
        session,
        cfg.homeserver.address,
        cfg.appservice.as_token,
        capabilities,
        metrics,
        max_size=media.max_size,
        timeouts=Timeouts(media.connect_timeout, media.read_timeout, media.download_timeout),
        not_found_ttl=media.not_found_ttl,
        redirect_policy=RedirectPolicy.from_entries(cfg.homeserver.redirect_hosts),
        local_server_name=cfg.homeserver.domain,
    )
    cache = MediaCache(media.cache_dir, media.cache_max_size, metrics)
    try:
        await cache.start()
    except OSError as e:
        raise StartupError(
            EXIT_CONFIG, f"media.cache_dir {media.cache_dir} is unusable: {e}"
        ) from e
    # Started last (below), when nothing else can fail and leave its client open.
    tier: BucketTier | None = None
    if media.store is not None:
        from relay.media.shared_tier import BucketTier

        tier = BucketTier.from_config(media.store, metrics)
    source = MediaSource(fetcher, cache, metrics, tier=tier)
    renditions = Renditions(
        source,
        metrics,
        limits=ThumbnailLimits(
            max_side=cfg.thumbnails.max_side, max_pixels=cfg.thumbnails.max_pixels
        ),
        strip_metadata=media.strip_metadata,
        tier=tier,
    )
    revocations = RevocationCheck(store, on_discovered=on_discovered)
    probe = MediaProbe(
        session,
        cfg.homeserver.address,
        cfg.appservice.as_token,
        fetcher,
        metrics,
        timeout=min(PROBE_TIMEOUT, media.read_timeout),
    )
    revalidator = Revalidator(probe, on_gone, metrics, interval=media.revalidate_after)
    pipeline = MediaPipeline(store, revocations, source, renditions, revalidator=revalidator)
    ring = key_ring(cfg)
    try:
        media_server = MediaServer(ring, pipeline, metrics, path_prefix=cfg.public.path_prefix)
    except ValueError as e:
        raise StartupError(EXIT_CONFIG, str(e)) from e
    bridge_api = BridgeAPI(
        cfg.bridges,
        LinkMinter(ring, cfg.public.url),
        store,
        revocations,
        metrics,
        default_ttl=cfg.signing.ttl,
        require_seen=cfg.signing.require_seen,
        max_thumbnail_side=cfg.thumbnails.max_side,
        audit=audit,
    )
    routes = _compat_routes(cfg, store, pipeline, media_server)
    if tier is not None:
        await start_tier(tier)
    capabilities.start()
    return MediaStack(
        capabilities,
        source,
        renditions,
        revocations,
        pipeline,
        media_server,
        bridge_api,
        routes,
        tier,
    )


async def start_tier(tier: BucketTier) -> None:
    """Start the ``media.store`` client. A bucket that does not answer now is logged, not
    fatal: the relay serves from the homeserver until it does."""
    from relay.s3.bucket import S3Error

    await tier.start()
    try:
        await tier.bucket.check()
    except S3Error as e:
        log.warning(
            "media.store: the bucket does not answer (%s); media comes from the homeserver "
            "until it does",
            e,
        )


def _compat_routes(
    cfg: Config, store: Store, pipeline: MediaPipeline, media_server: MediaServer
) -> list[web.RouteDef]:
    """Routes for the links bridges mint themselves (``compat:``), and legacy paths."""
    seen = SeenCheck(store)
    routes: list[web.RouteDef] = []
    if cfg.compat.legacy_media:
        legacy = LegacyMedia(
            media_server, pipeline, seen, max_thumbnail_side=cfg.thumbnails.max_side
        )
        routes += legacy.routes()
    try:
        compat = CompatServer(
            cfg.compat, media_server, pipeline, seen, require_seen=cfg.signing.require_seen
        )
        routes += compat.routes()
    except (OSError, ValueError) as e:  # a JWK file gone since check-config, braces
        raise StartupError(EXIT_CONFIG, str(e)) from e
    return routes

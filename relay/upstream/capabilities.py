"""What the homeserver can do for us: authenticated media, upload limit, our identity.

Authenticated media arrived in Matrix v1.11 (MSC3916, Client-Server API "Content
repository"); a server that predates it only has the legacy ``/_matrix/media/v3``
paths. :class:`Capabilities` holds the current view, re-read periodically, so the
fetcher can choose paths and readiness can report a broken appservice token.

Readiness is decided here alone, by an authenticated request about the relay itself
(the media config, with the as_token): a media item the homeserver refuses says
nothing about the token, so the fetcher only asks for an early re-check
(:meth:`Capabilities.request_check`) when an answer names the token (M_UNKNOWN_TOKEN).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

# The first spec version that has /_matrix/client/v1/media/* (MSC3916).
AUTHENTICATED_MEDIA_VERSION = (1, 11)
AUTHENTICATED_MEDIA_FEATURE = "org.matrix.msc3916.stable"

# Spec "Specification versions": vX.Y (the older r0.x.y releases never had it).
_VERSION = re.compile(r"v([0-9]{1,6})\.([0-9]{1,6})")

VERSIONS_PATH = "/_matrix/client/versions"
AUTHENTICATED_CONFIG_PATH = "/_matrix/client/v1/media/config"
LEGACY_CONFIG_PATH = "/_matrix/media/v3/config"
# An early re-check asked for by the fetcher runs at most this often (seconds).
MIN_RECHECK_INTERVAL = 10.0


def parse_spec_version(version: object) -> tuple[int, int] | None:
    """``"v1.11"`` → ``(1, 11)``; anything else (``"r0.6.1"``, ``"v1"``, non-strings) → None."""
    if not isinstance(version, str):
        return None
    m = _VERSION.fullmatch(version)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2))


def supports_authenticated_media(versions_body: Mapping[str, Any]) -> bool:
    """True when a ``GET /_matrix/client/versions`` body says authenticated media is served.

    Versions are compared numerically (``v1.9`` < ``v1.11`` < ``v2.0``), never as strings.
    A malformed body means "no": the legacy paths are the safe fallback.
    """
    if not isinstance(versions_body, Mapping):
        return False
    versions = versions_body.get("versions")
    if isinstance(versions, list):
        for v in versions:
            parsed = parse_spec_version(v)
            if parsed is not None and parsed >= AUTHENTICATED_MEDIA_VERSION:
                return True
    features = versions_body.get("unstable_features")
    return isinstance(features, Mapping) and features.get(AUTHENTICATED_MEDIA_FEATURE) is True


def parse_max_upload_size(config_body: object) -> int | None:
    """``m.upload.size`` from a media config body, or None when absent or malformed."""
    if not isinstance(config_body, Mapping):
        return None
    size = config_body.get("m.upload.size")
    # bool is an int subclass; true is not a size.
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    return None


class Capabilities:
    """The relay's current view of the homeserver, refreshed by a background task.

    Before the first successful refresh, authenticated media is assumed (every current
    server has it); the fetcher falls back to the legacy paths on ``M_UNRECOGNIZED``.
    """

    def __init__(
        self,
        homeserver_url: str,
        as_token: str,
        *,
        interval: float = 300.0,
        request_timeout: float = 10.0,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.homeserver_url = homeserver_url.rstrip("/")
        self._as_token = as_token
        self.interval = interval
        self._request_timeout = request_timeout
        self._session = session
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.authenticated_media = True
        self.max_upload_size: int | None = None
        self.identity_ok = True
        self.last_error: str | None = None
        # Monotonic times of the last successful and of the last attempted refresh.
        self.checked_at: float | None = None
        self.attempted_at: float | None = None

    # -- what the fetcher reports -------------------------------------------------------

    def mark_unsupported(self) -> None:
        """The authenticated path answered ``M_UNRECOGNIZED``: use legacy until next refresh."""
        if self.authenticated_media:
            log.warning("homeserver does not recognise authenticated media; using legacy paths")
        self.authenticated_media = False

    def mark_identity_broken(self, reason: str) -> None:
        """A media endpoint refused our as_token (401/403); readiness reports it."""
        if self.identity_ok:
            log.error("homeserver refused the relay's appservice token: %s", reason)
        self.identity_ok = False
        self.last_error = reason

    def mark_identity_ok(self) -> None:
        """A media request with our token succeeded."""
        if not self.identity_ok:
            log.info("homeserver accepts the relay's appservice token again")
            self.last_error = None
        self.identity_ok = True

    def request_check(self) -> None:
        """Re-check soon (the background task wakes), at most every MIN_RECHECK_INTERVAL s."""
        if self.attempted_at is None or self._clock() - self.attempted_at >= MIN_RECHECK_INTERVAL:
            self._wake.set()

    # -- refreshing ---------------------------------------------------------------------

    async def refresh(self, session: aiohttp.ClientSession | None = None) -> None:
        """Re-read ``/versions`` and the media config; never raises for upstream failures.

        A failure keeps the previous view and records ``last_error``.
        """
        session = session or self._session
        if session is None:
            raise RuntimeError("Capabilities.refresh needs a client session")
        async with self._lock:
            self.attempted_at = self._clock()
            try:
                await self._refresh(session)
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                self.last_error = f"capability check failed: {type(e).__name__}: {e}"
                log.warning("%s", self.last_error)
            else:
                self.checked_at = self._clock()

    async def ensure_checked(
        self, session: aiohttp.ClientSession, *, retry_after: float = 10.0
    ) -> None:
        """Refresh if the view was never read successfully (at most every ``retry_after`` s)."""
        if self.checked_at is not None:
            return
        if self.attempted_at is not None and self._clock() - self.attempted_at < retry_after:
            return
        await self.refresh(session)

    async def _refresh(self, session: aiohttp.ClientSession) -> None:
        timeout = aiohttp.ClientTimeout(total=self._request_timeout)
        headers = {"Authorization": f"Bearer {self._as_token}"}
        async with session.get(
            self.homeserver_url + VERSIONS_PATH, timeout=timeout, allow_redirects=False
        ) as resp:
            if resp.status != 200:
                raise ValueError(f"/versions answered HTTP {resp.status}")
            body = await resp.json(content_type=None)
        authenticated = supports_authenticated_media(body)
        self.authenticated_media = authenticated
        config_path = AUTHENTICATED_CONFIG_PATH if authenticated else LEGACY_CONFIG_PATH
        async with session.get(
            self.homeserver_url + config_path,
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
        ) as resp:
            if resp.status in (401, 403):
                # The media config is a media endpoint: a refusal means our token is broken.
                self.mark_identity_broken(f"media config answered HTTP {resp.status}")
                return
            if resp.status != 200:
                raise ValueError(f"media config answered HTTP {resp.status}")
            self.max_upload_size = parse_max_upload_size(await resp.json(content_type=None))
        self.mark_identity_ok()
        self.last_error = None

    # -- background task ----------------------------------------------------------------

    def start(self, session: aiohttp.ClientSession | None = None) -> None:
        """Start re-checking every ``interval`` seconds (the first check runs at once)."""
        if session is not None:
            self._session = session
        if self._session is None:
            raise RuntimeError("Capabilities.start needs a client session")
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="capabilities-refresh")

    async def stop(self) -> None:
        """Stop the background task and wait for it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                # One bad answer must not end the re-checks for the life of the process.
                log.exception("unexpected error while checking homeserver capabilities")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

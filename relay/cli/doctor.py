"""``media-relay doctor -c config.yaml``: check a deployment end to end, say how to fix it.

Each check is one line, ``ok`` or ``FAIL`` with the fix under it; the exit code is 0
only when every check passes (otherwise that of the first failure's kind, as at
start-up: 3 config, 4 homeserver, 5 database, 1 the rest). The checks that need the
relay running (the homeserver's ping, the probe link through ``public.url``) say so
when its internal listener does not answer here.

Opening the database migrates it, as starting the relay would; nothing else is changed
(the bot is not registered, no link is recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from relay.app import key_ring
from relay.cli.common import load_config
from relay.config.settings import Config, ConfigError
from relay.core.exit_codes import (
    EXIT_CONFIG,
    EXIT_DATABASE,
    EXIT_ERROR,
    EXIT_HOMESERVER,
    EXIT_OK,
)
from relay.core.minting import LinkMinter
from relay.core.mxc import MediaId
from relay.store import DatabaseUnusable, open_database
from relay.upstream.capabilities import AUTHENTICATED_MEDIA_FEATURE, supports_authenticated_media
from relay.upstream.homeserver import HomeserverClient, HomeserverError, HomeserverUnreachable

TIMEOUT = 10.0  # per request: a doctor that hangs is no help
# Synapse's answers to POST /_matrix/client/v1/appservice/{id}/ping (spec: Application
# Service API, "Pinging"; v1.7), and what each means the operator should do.
PING_FIXES = {
    "M_URL_NOT_SET": "the registration the homeserver loaded has no url: set appservice.address, "
    "run generate-registration again and restart the homeserver",
    "M_CONNECTION_FAILED": "the homeserver cannot connect to appservice.address {address}: start "
    "the relay, and make that URL reachable from the homeserver (inside containers use the "
    "relay's service name, e.g. http://media-relay:8009, and appservice.hostname 0.0.0.0)",
    "M_CONNECTION_TIMEOUT": "the homeserver's connection to appservice.address {address} timed "
    "out: check firewalls and that the relay listens on appservice.hostname:appservice.port",
    "M_BAD_STATUS": "the relay at appservice.address {address} refused the homeserver's call: "
    "the hs_token in the homeserver's registration differs from appservice.hs_token (run "
    "generate-registration again, install it, restart the homeserver) or the URL leads elsewhere",
    "M_FORBIDDEN": "the as_token belongs to another appservice id than appservice.id {id}: make "
    "appservice.id match the registration's id",
}


@dataclass(frozen=True, slots=True)
class Finding:
    """The outcome of one check: what was seen and, when it failed, how to fix it."""

    check: str
    ok: bool
    detail: str
    fix: str = ""
    exit_code: int = EXIT_ERROR


def render(findings: Sequence[Finding]) -> str:
    """The report: one line a check, the fix indented under each failure, a summary."""
    lines: list[str] = []
    for f in findings:
        lines.append(f"{'ok  ' if f.ok else 'FAIL'}  {f.check}: {f.detail}")
        if not f.ok and f.fix:
            lines.append(f"      fix: {f.fix}")
    problems = sum(not f.ok for f in findings)
    lines.append(
        f"all {len(findings)} checks passed"
        if not problems
        else f"{problems} of {len(findings)} checks failed"
    )
    return "\n".join(lines)


def exit_code(findings: Sequence[Finding]) -> int:
    """0 when all passed, else the exit code of the first failure's kind."""
    return next((f.exit_code for f in findings if not f.ok), EXIT_OK)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Entry point of ``media-relay doctor`` (arguments defined in relay.cli)."""
    findings = asyncio.run(diagnose(args.config))
    print(render(findings))
    return exit_code(findings)


async def diagnose(config_path: Path) -> list[Finding]:
    """Every check in order; a check whose premise failed is reported as not run."""
    try:
        config = load_config(config_path)
    except ConfigError as e:
        return [Finding("config", False, str(e), f"edit {config_path}", EXIT_CONFIG)]
    findings = [
        Finding(
            "config",
            True,
            f"{config_path} is valid (homeserver {config.homeserver.address}, "
            f"links under {config.public.url})",
        )
    ]
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        headers={"User-Agent": "matrix-media-relay doctor"},
    ) as session:
        doctor = _Doctor(config, session)
        findings.append(await doctor.database())
        findings += await doctor.homeserver()
        findings += await doctor.reachability()
    return findings


class _Doctor:
    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self.client = HomeserverClient(
            session, config.homeserver.address, config.appservice.as_token, timeout=TIMEOUT
        )
        self.token_ok = False

    async def database(self) -> Finding:
        cfg = self.config
        try:
            db = await open_database(cfg.database)
        except DatabaseUnusable as e:
            return Finding(
                "database",
                False,
                str(e),
                "check the database URL, that the server runs and the user may connect, and "
                "for SQLite that the directory is writable by the relay's user (uid 1337 in "
                "the image)",
                EXIT_DATABASE,
            )
        try:
            await asyncio.wait_for(db.fetchval("SELECT 1"), TIMEOUT)
        finally:
            await db.stop()
        return Finding("database", True, "opens and answers (schema up to date)")

    async def homeserver(self) -> list[Finding]:
        """Reachable, serves authenticated media, accepts the as_token as the bot."""
        cfg = self.config
        address = cfg.homeserver.address
        try:
            versions = await self.client.versions()
        except (HomeserverUnreachable, HomeserverError) as e:
            fix = (
                f"check homeserver.address ({address}): it is the client-server API as the "
                "relay reaches it (inside containers, the homeserver's service name, e.g. "
                "http://synapse:8008), and the homeserver must be running"
            )
            not_run = "not checked: the homeserver is unreachable"
            return [
                Finding("homeserver", False, _unanswered(address, e), fix, EXIT_HOMESERVER),
                Finding("authenticated media", False, not_run, exit_code=EXIT_HOMESERVER),
                Finding("as_token", False, not_run, exit_code=EXIT_HOMESERVER),
            ]
        found = [Finding("homeserver", True, f"{address} answers /_matrix/client/versions")]
        if supports_authenticated_media(versions):
            found.append(Finding("authenticated media", True, "served (v1.11 or later)"))
        else:
            found.append(
                Finding(
                    "authenticated media",
                    False,
                    f"/versions lists neither v1.11 nor {AUTHENTICATED_MEDIA_FEATURE}",
                    "upgrade the homeserver (Synapse 1.120 or later) and enable authenticated "
                    "media (Synapse: enable_authenticated_media: true)",
                    EXIT_HOMESERVER,
                )
            )
        found.append(await self._token())
        return found

    async def _token(self) -> Finding:
        cfg = self.config
        try:
            user_id = await self.client.whoami()
        except (HomeserverUnreachable, HomeserverError) as e:
            unknown = isinstance(e, HomeserverError) and e.errcode == "M_UNKNOWN_TOKEN"
            fix = (
                "the homeserver does not know appservice.as_token: add the registration file "
                "to its app_service_config_files (Synapse) and restart it; after changing "
                "tokens run generate-registration again"
                if unknown
                else "starting the relay registers its bot; if that fails, check the "
                "registration's namespaces include the bot user"
            )
            return Finding("as_token", False, f"whoami refused: {e}", fix, EXIT_HOMESERVER)
        if user_id != cfg.bot_user_id:
            return Finding(
                "as_token",
                False,
                f"the as_token acts as {user_id}, expected {cfg.bot_user_id}",
                "make appservice.bot_localpart and homeserver.domain match the registration's "
                "sender_localpart and the homeserver's server_name",
                EXIT_HOMESERVER,
            )
        self.token_ok = True
        return Finding("as_token", True, f"accepted as {user_id}")

    async def reachability(self) -> list[Finding]:
        """The homeserver reaches the relay (ping), and public.url reaches the relay (probe)."""
        running = await self._relay_running()
        hint = (
            ""
            if running
            else f" (the relay's internal listener {self._internal_url()} does not answer "
            "here: start the relay, then run doctor again)"
        )
        return [await self._ping(hint), await self._probe(hint)]

    def _internal_url(self) -> str:
        host = self.config.appservice.hostname
        # A wildcard listener is reached on loopback from the same host or container.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.config.appservice.port}"

    async def _relay_running(self) -> bool:
        try:
            async with self.session.get(self._internal_url() + "/_relay/health") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _ping(self, hint: str) -> Finding:
        cfg = self.config
        name = "homeserver → appservice.address"
        if not self.token_ok:
            return Finding(name, False, "not checked: needs the homeserver to accept the as_token")
        try:
            answer = await self.client.ping_appservice(cfg.appservice.id)
        except HomeserverError as e:
            template = PING_FIXES.get(e.errcode or "", "see the homeserver's log")
            fix = template.format(address=cfg.appservice.address, id=cfg.appservice.id)
            return Finding(name, False, f"ping failed: {e}{hint}", fix)
        except HomeserverUnreachable as e:
            return Finding(name, False, f"ping not answered: {e}", "see the homeserver's log")
        return Finding(
            name,
            True,
            f"the homeserver reached {cfg.appservice.address} in {answer.get('duration_ms')} ms",
        )

    async def _probe(self, hint: str) -> Finding:
        """GET a link signed for media nobody has: only this relay answers it as it does."""
        cfg = self.config
        name = "public.url → relay"
        if not cfg.signing.keys:
            return Finding(
                name,
                False,
                "not checked: no signing key yet",
                "start the relay once: it writes a signing key into the config",
            )
        media = MediaId(cfg.homeserver.domain, "doctor-probe-" + secrets.token_hex(8))
        url = LinkMinter(key_ring(cfg), cfg.public.url).mint(media, 300).url
        try:
            async with self.session.get(url, allow_redirects=False) as resp:
                status, body = resp.status, await _matrix_error(resp)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return Finding(
                name,
                False,
                f"{cfg.public.url} unreachable from here: {type(e).__name__}: {e}{hint}",
                "check public.url (the address people outside Matrix use), DNS and the "
                "reverse proxy in front of public.hostname:public.port",
            )
        return probe_verdict(cfg, status, body, hint)


def _unanswered(address: str, e: Exception) -> str:
    # HomeserverUnreachable already names the address; an error status does not.
    if isinstance(e, HomeserverUnreachable):
        return f"unreachable: {e}"
    return f"{address}/_matrix/client/versions answered {e}: is this the client-server API?"


async def _matrix_error(resp: aiohttp.ClientResponse) -> dict[str, Any] | None:
    """The answer's Matrix error JSON, or None when it is something else (a proxy's page)."""
    if resp.content_type != "application/json":
        return None
    try:
        body = await resp.json()
    except (ValueError, aiohttp.ContentTypeError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("errcode"), str) else None


def probe_verdict(cfg: Config, status: int, body: dict[str, Any] | None, hint: str) -> Finding:
    """What the answer to the probe link says about the route from public.url to the relay."""
    name = "public.url → relay"
    listener = f"{cfg.public.hostname}:{cfg.public.port}"
    if body is None:
        return Finding(
            name,
            False,
            f"something other than the relay answered {status}{hint}",
            f"route {cfg.public.url} to the relay's public listener {listener} in the "
            "reverse proxy (see the README's nginx and Caddy blocks)",
        )
    errcode = body["errcode"]
    if status == 403:
        return Finding(
            name,
            False,
            "a relay answered but refused this config's signing key",
            "public.url leads to another relay, or one with other signing.keys: give every "
            "relay process the same keys",
        )
    if errcode == "M_UNRECOGNIZED":
        return Finding(
            name,
            False,
            f"{status} M_UNRECOGNIZED: the link did not reach the relay's link handler{hint}",
            "public.url leads to another Matrix server or listener, or the reverse proxy "
            "changes the path: pass it through unchanged, or strip exactly public.url's path",
        )
    # Signature verified: the media is unknown (404) or refused by policy (410).
    return Finding(name, True, f"{cfg.public.url} reaches this relay ({status} {errcode})")

"""Which upstream redirects the fetcher follows, and where its connections may go.

A homeserver's media repository may redirect a download to object storage (S3 and
friends); nothing else needs a redirect, and a redirect is how an upstream (or whoever
controls its Location header) would make the relay fetch something for it. So:

- **same origin** (RFC 6454: scheme, host, port): followed, with the as_token, only
  inside the media API (``<base path>/_matrix/client/v1/media/`` and
  ``<base path>/_matrix/media/``). A redirect to ``/_synapse/admin/…`` or any other API
  is refused before anything is sent: the token would act there with the bot's rights.
- **another origin**: refused unless its host is in ``homeserver.redirect_hosts``; then
  followed *without* the token, never from https down to http, and only to addresses
  that are public (``ipaddress`` ``is_global``) or inside a network that is listed too
  (``10.0.0.0/8`` for an internal MinIO). The addresses are checked where the
  connection is made (:class:`GuardedResolver`), so a listed name that resolves, or is
  re-pointed, to ``127.0.0.1`` is refused as well; an IP-literal target is checked here,
  as aiohttp does not resolve literals.
- once a hop has left the origin, the token is never sent again on that download.

Everything but :class:`GuardedResolver` is pure.
"""

from __future__ import annotations

import enum
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from relay.core.hosts import IPAddress, IPNetwork, ip_address_of, parse_host_entry

log = logging.getLogger(__name__)

# The media API (Client-Server API "Content repository", v1.11 and the legacy paths).
MEDIA_API_PREFIXES = ("/_matrix/client/v1/media/", "/_matrix/media/")
# Dot segments or encoded separators could walk out of the media API once the
# homeserver (or a proxy in front of it) decodes them.
_SNEAKY_PATH = re.compile(r"%2e|%2f|%5c|\\", re.IGNORECASE)


class RedirectRefused(Exception):
    """The redirect breaks the policy above; ``str()`` says why (safe to log)."""


class Hop(enum.Enum):
    """How to follow an accepted redirect."""

    SAME_ORIGIN = "same-origin"  # the homeserver's media API: with the token
    ALLOWED_HOST = "allowed-host"  # a listed host: no token, guarded connections


@dataclass(frozen=True, slots=True)
class RedirectPolicy:
    """Hosts a redirect may leave the homeserver's origin for, and private networks allowed."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> RedirectPolicy:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            parsed = parse_host_entry(entry)
            if isinstance(parsed, str):
                hosts.add(parsed)
            else:
                networks.append(parsed)
        return cls(frozenset(hosts), tuple(networks))

    def address_allowed(self, ip: IPAddress) -> bool:
        """Public addresses, or any inside a listed network (loopback only if listed)."""
        return ip.is_global or any(ip.version == n.version and ip in n for n in self.networks)

    def host_listed(self, host: str) -> bool:
        ip = ip_address_of(host)
        if ip is not None:
            return any(ip.version == n.version and ip in n for n in self.networks)
        return host.lower().rstrip(".") in self.hosts


def same_origin(a: URL, b: URL) -> bool:
    # RFC 6454 §5: same scheme, host and port (yarl fills the scheme's default port).
    return (a.scheme.lower(), (a.host or "").lower(), a.port) == (
        b.scheme.lower(),
        (b.host or "").lower(),
        b.port,
    )


def in_media_api(base: URL, target: URL) -> bool:
    """Whether ``target``'s path lies in the media API under ``base``'s path prefix."""
    raw = target.raw_path
    if _SNEAKY_PATH.search(raw) or any(s in (".", "..") for s in raw.split("/")):
        return False
    prefix = base.raw_path.rstrip("/")
    return any(raw.startswith(prefix + p) for p in MEDIA_API_PREFIXES)


def check_redirect(base: URL, current: URL, target: URL, policy: RedirectPolicy) -> Hop:
    """Decide whether a redirect from ``current`` to ``target`` is followed, and how.

    ``base`` is the homeserver's address. Raises :class:`RedirectRefused`.
    """
    if target.scheme not in ("http", "https") or not target.host:
        raise RedirectRefused("redirect to a non-HTTP location")
    if target.user is not None or target.password is not None:
        raise RedirectRefused("redirect carrying credentials")
    if same_origin(target, base):
        if not in_media_api(base, target):
            raise RedirectRefused("same-origin redirect out of the media API")
        return Hop.SAME_ORIGIN
    host = target.host
    if not policy.host_listed(host):
        raise RedirectRefused(f"redirect to {host}, not in homeserver.redirect_hosts")
    if current.scheme == "https" and target.scheme != "https":
        raise RedirectRefused("redirect from https down to http")
    ip = ip_address_of(host)
    if ip is not None and not policy.address_allowed(ip):
        raise RedirectRefused(f"redirect to the non-public address {ip}")
    return Hop.ALLOWED_HOST


class GuardedResolver(AbstractResolver):
    """DNS resolution that drops every address the policy does not allow.

    Used only for connections to listed redirect hosts: aiohttp connects to what this
    returns, so the check applies to the address really connected to (no TOCTOU
    between a check and a second lookup, and DNS rebinding gains nothing).
    """

    def __init__(self, policy: RedirectPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = []
        for result in results:
            ip = ip_address_of(result["host"])
            if ip is not None and self._policy.address_allowed(ip):
                allowed.append(result)
        if not allowed:
            log.warning("redirect host %s resolves only to non-public addresses; refused", host)
            # aiohttp turns an OSError here into ClientConnectorDNSError: no connection.
            raise OSError(f"{host} resolves only to addresses not allowed for redirects")
        return allowed

    async def close(self) -> None:
        await self._inner.close()

"""The redirect policy (pure): what is followed, with or without the token, and what not."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from relay.core.hosts import parse_host_entry
from relay.upstream.redirects import (
    GuardedResolver,
    Hop,
    RedirectPolicy,
    RedirectRefused,
    check_redirect,
)

BASE = URL("https://matrix.example.org")
HERE = BASE / "_matrix/client/v1/media/download/example.org/abc"
POLICY = RedirectPolicy.from_entries(["S3.Example.NET", "10.0.0.0/8", "[fd00::5]"])


@pytest.mark.parametrize(
    ("target", "hop"),
    [
        ("https://matrix.example.org/_matrix/client/v1/media/download/e.org/x", Hop.SAME_ORIGIN),
        ("https://MATRIX.example.org:443/_matrix/media/v3/download/example.org/x", Hop.SAME_ORIGIN),
        ("https://s3.example.net/bucket/x?X-Amz-Signature=1", Hop.ALLOWED_HOST),
        ("https://s3.example.net./bucket/x", Hop.ALLOWED_HOST),
        ("https://10.1.2.3/bucket/x", Hop.ALLOWED_HOST),
        ("https://[fd00::5]/bucket/x", Hop.ALLOWED_HOST),
    ],
)
def test_followed(target: str, hop: Hop) -> None:
    """Same-origin media API paths keep the token; listed hosts are followed without it."""
    assert check_redirect(BASE, HERE, URL(target), POLICY) is hop


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("https://matrix.example.org/_synapse/admin/v1/media/quarantine/x/y", "media API"),
        ("https://matrix.example.org/_matrix/client/v3/account/whoami", "media API"),
        ("https://matrix.example.org/_matrix/media/%2e%2e/client/v3/x", "media API"),
        ("http://matrix.example.org/_matrix/media/v3/download/a/b", "redirect_hosts"),
        ("https://matrix.example.org:8448/_matrix/media/v3/download/a/b", "redirect_hosts"),
        ("https://evil.example.com/x", "redirect_hosts"),
        ("https://s3.example.net.evil.com/x", "redirect_hosts"),
        ("http://s3.example.net/bucket/x", "down to http"),
        ("https://127.0.0.1/x", "redirect_hosts"),
        ("https://[::ffff:127.0.0.1]/x", "redirect_hosts"),
        ("https://169.254.169.254/latest/meta-data", "redirect_hosts"),
        ("https://user:pw@s3.example.net/x", "credentials"),
        ("ftp://s3.example.net/x", "non-HTTP"),
    ],
)
def test_refused(target: str, reason: str) -> None:
    """Everything else is refused before any request is sent, with a reason."""
    with pytest.raises(RedirectRefused, match=reason):
        check_redirect(BASE, HERE, URL(target), POLICY)


def test_base_path_prefix_is_part_of_the_media_api() -> None:
    """A homeserver address with a path: the media API is under that path."""
    base = URL("https://example.org/matrix")
    ok = URL("https://example.org/matrix/_matrix/media/v3/download/a/b")
    assert check_redirect(base, base, ok, RedirectPolicy()) is Hop.SAME_ORIGIN
    with pytest.raises(RedirectRefused):
        check_redirect(
            base, base, URL("https://example.org/_matrix/media/v3/download/a/b"), RedirectPolicy()
        )


@pytest.mark.parametrize("entry", ["", "exa mple.org", "-x.org", "10.0.0.0/33", "http://x.org"])
def test_bad_entries(entry: str) -> None:
    """Config entries are host names, IP addresses or networks, nothing else."""
    with pytest.raises(ValueError):
        parse_host_entry(entry)


def test_addresses() -> None:
    """Public addresses pass; private, loopback and link-local only inside a listed network."""
    policy = RedirectPolicy.from_entries(["127.0.0.1"])
    allowed = policy.address_allowed
    assert allowed(ipaddress.ip_address("93.184.216.34"))
    assert allowed(ipaddress.ip_address("127.0.0.1"))
    assert not allowed(ipaddress.ip_address("127.0.0.2"))
    assert not allowed(ipaddress.ip_address("10.0.0.1"))
    assert not allowed(ipaddress.ip_address("::1"))
    assert not allowed(ipaddress.ip_address("fe80::1"))


class _Fixed(AbstractResolver):
    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_resolver_drops_non_public_addresses() -> None:
    """The resolver returns only allowed addresses, and fails when none is left."""
    guarded = GuardedResolver(RedirectPolicy(), _Fixed("10.0.0.1", "93.184.216.34"))
    assert [r["host"] for r in await guarded.resolve("s3.example.net", 443)] == ["93.184.216.34"]
    rebound = GuardedResolver(RedirectPolicy(), _Fixed("127.0.0.1", "::1", "fe80::1%eth0"))
    with pytest.raises(OSError, match="not allowed"):
        await rebound.resolve("s3.example.net", 443)

"""Host names and IP addresses as the operator writes them (``homeserver.redirect_hosts``).

Pure: used by the configuration (to refuse a bad entry with its key) and by the
redirect policy of :mod:`relay.upstream.redirects` (to decide where a redirect may go).
"""

from __future__ import annotations

import ipaddress
import re

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 1123 §2.1 labels, compared in lowercase (RFC 4343: DNS names are case-insensitive).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
MAX_DNS_NAME_LENGTH = 253


def ip_address_of(text: str) -> IPAddress | None:
    """The address an IP literal names (``[::1]``, ``fe80::1%eth0``, ``::ffff:10.0.0.1``
    count as ``::1``, ``fe80::1``, ``10.0.0.1``), or None for anything else."""
    try:
        ip = ipaddress.ip_address(text.strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_host_entry(entry: str) -> str | IPNetwork:
    """A DNS name (lowercased, no trailing dot), or an IP address or network (CIDR).

    Raises ValueError, with a message fit for a configuration error.
    """
    text = entry.strip().lower().rstrip(".")
    if "/" in text or ip_address_of(text) is not None:
        try:
            return ipaddress.ip_network(text.strip("[]"), strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network") from None
    if len(text) > MAX_DNS_NAME_LENGTH or not _DNS_NAME.fullmatch(text):
        raise ValueError(f"{entry!r} is not a host name, IP address or network")
    return text

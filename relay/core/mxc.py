"""Strict ``mxc://`` parsing.

Grammar from the Matrix spec appendices ("Server Name" and "Matrix Content
(mxc://) URIs"); media ids are restricted to ``[A-Za-z0-9_-]+`` as the content
repository module requires. Anything that could become a path component
(``.``, ``..``, ``/``, ``%``) is refused here, before any URL is built.

Canonical server names (:func:`canonical_server_name`): one spelling per server, so
that a cache key, a media record, a signed link and a revocation of
``mxc://Example.ORG/abc`` are those of ``mxc://example.org/abc``; otherwise changing the
case of a name would dodge a revocation and fill the cache twice.

- DNS names are lowercased: DNS compares names case-insensitively (RFC 4343 §3).
  The spec's ``dns-name`` is ASCII only, so an internationalised name arrives as its
  punycode (``xn--…``) labels, kept as they are (lowercased); Unicode is refused.
  A trailing dot is refused (the grammar allows it, no homeserver uses it).
- IPv6 literals take their RFC 5952 form (``[0:0::1]`` → ``[::1]``); a name of four
  numeric labels must be a real IPv4 address (``010.0.0.1``, ``999.1.1.1`` refused).
- The port loses leading zeros (``:0443`` → ``:443``) but stays: ``example.org:443``
  and ``example.org`` are different server names (the first skips ``.well-known``
  delegation, Server-Server API "Resolving server names"), so they are not merged.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_SERVER_NAME_LENGTH = 255
MAX_MEDIA_ID_LENGTH = 255

_MEDIA_ID = re.compile(r"[A-Za-z0-9_-]+")
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]{2,45}")


class InvalidMxc(ValueError):
    """The string is not a valid ``mxc://<server-name>/<media-id>`` URI."""


@dataclass(frozen=True, slots=True)
class MediaId:
    """A validated media identifier: safe to use as URL path segments and file names."""

    server_name: str
    media_id: str

    def __str__(self) -> str:
        return f"mxc://{self.server_name}/{self.media_id}"


def is_valid_server_name(server_name: str) -> bool:
    """Server name grammar: ``hostname [":" port]`` with IPv4, ``[IPv6]`` or DNS name."""
    return canonical_server_name(server_name) is not None


def is_canonical_server_name(server_name: str) -> bool:
    """Whether ``server_name`` is valid and already in its canonical spelling."""
    return canonical_server_name(server_name) == server_name


def canonical_server_name(server_name: str) -> str | None:
    """The canonical spelling of a valid server name (see the module docstring), else None."""
    if not isinstance(server_name, str) or not server_name.isascii():
        return None
    if not server_name or len(server_name) > MAX_SERVER_NAME_LENGTH:
        return None
    host, port = server_name, None
    if server_name.startswith("["):
        end = server_name.find("]")
        if end == -1:
            return None
        host, rest = server_name[: end + 1], server_name[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
    elif ":" in server_name:
        host, port = server_name.rsplit(":", 1)
    if port is not None and not (_PORT.fullmatch(port) and 0 < int(port) < 65536):
        return None
    suffix = "" if port is None else f":{int(port)}"
    if host.startswith("["):
        inner = host[1:-1]
        if not _IPV6_CHARS.fullmatch(inner):
            return None
        try:
            return f"[{ipaddress.IPv6Address(inner).compressed}]{suffix}"
        except ValueError:
            return None
    labels = host.split(".")
    # Rejects empty labels, so "..", "." and "a..b" never pass as a host.
    if not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return None
    if len(labels) == 4 and all(label.isdigit() for label in labels):
        # The spec's IPv4address; ipaddress refuses leading zeros (octal ambiguity).
        try:
            return f"{ipaddress.IPv4Address(host)}{suffix}"
        except ValueError:
            return None
    return host.lower() + suffix


def is_valid_media_id(media_id: str) -> bool:
    return 0 < len(media_id) <= MAX_MEDIA_ID_LENGTH and bool(_MEDIA_ID.fullmatch(media_id))


def parse_mxc(uri: object) -> MediaId:
    """Parse and validate an ``mxc://`` URI, raising :class:`InvalidMxc` with the reason.

    The server name comes back canonical, so equal media compare equal.
    """
    if not isinstance(uri, str):
        raise InvalidMxc("mxc URI must be a string")
    if not uri.startswith("mxc://"):
        raise InvalidMxc("mxc URI must start with mxc://")
    rest = uri[len("mxc://") :]
    server_name, sep, media_id = rest.partition("/")
    if not sep:
        raise InvalidMxc("mxc URI has no media id")
    canonical = canonical_server_name(server_name)
    if canonical is None:
        raise InvalidMxc("mxc URI has an invalid server name")
    if not is_valid_media_id(media_id):
        raise InvalidMxc("mxc URI has an invalid media id (allowed: A-Z a-z 0-9 _ -)")
    return MediaId(canonical, media_id)

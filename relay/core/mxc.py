"""Strict ``mxc://`` parsing.

Grammar from the Matrix spec appendices ("Server Name" and "Matrix Content
(mxc://) URIs"); media ids are restricted to ``[A-Za-z0-9_-]+`` as the content
repository module requires. Anything that could become a path component
(``.``, ``..``, ``/``, ``%``) is refused here, before any URL is built.
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
    if not server_name or len(server_name) > MAX_SERVER_NAME_LENGTH:
        return False
    host, port = server_name, None
    if server_name.startswith("["):
        end = server_name.find("]")
        if end == -1:
            return False
        host, rest = server_name[: end + 1], server_name[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return False
            port = rest[1:]
    elif ":" in server_name:
        host, port = server_name.rsplit(":", 1)
    if port is not None and not (_PORT.fullmatch(port) and 0 < int(port) < 65536):
        return False
    if host.startswith("["):
        inner = host[1:-1]
        if not _IPV6_CHARS.fullmatch(inner):
            return False
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            return False
        return True
    labels = host.split(".")
    # Rejects empty labels, so "..", "." and "a..b" never pass as a host.
    return all(_DNS_LABEL.fullmatch(label) for label in labels)


def is_valid_media_id(media_id: str) -> bool:
    return 0 < len(media_id) <= MAX_MEDIA_ID_LENGTH and bool(_MEDIA_ID.fullmatch(media_id))


def parse_mxc(uri: object) -> MediaId:
    """Parse and validate an ``mxc://`` URI, raising :class:`InvalidMxc` with the reason."""
    if not isinstance(uri, str):
        raise InvalidMxc("mxc URI must be a string")
    if not uri.startswith("mxc://"):
        raise InvalidMxc("mxc URI must start with mxc://")
    rest = uri[len("mxc://") :]
    server_name, sep, media_id = rest.partition("/")
    if not sep:
        raise InvalidMxc("mxc URI has no media id")
    if not is_valid_server_name(server_name):
        raise InvalidMxc("mxc URI has an invalid server name")
    if not is_valid_media_id(media_id):
        raise InvalidMxc("mxc URI has an invalid media id (allowed: A-Z a-z 0-9 _ -)")
    return MediaId(server_name, media_id)

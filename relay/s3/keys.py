"""Object keys under the configured prefix: every name passes an allow-list first.

S3 keys are flat strings, so "escaping" the prefix means a name that, once joined to
it, would address objects another application (or another relay's prefix) owns: an
absolute name, a ``..`` segment, an empty segment (``a//b`` is a key of its own), or
characters that proxies and consoles treat specially. The relay only ever names
objects with hex digests, so the allow-list can be strict.
"""

from __future__ import annotations

import re

# Segments of letters, digits, '-', '_' and '.', joined by single '/'; no '..' segment.
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]{1,128}")
MAX_KEY_BYTES = 1024  # S3's own limit on a key, prefix included


def object_key(prefix: str, name: str) -> str:
    """``prefix + name`` once ``name`` is a safe relative name; ValueError otherwise."""
    check_name(name)
    key = prefix + name
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"object key longer than {MAX_KEY_BYTES} bytes")
    return key


def key_prefix(prefix: str, name: str) -> str:
    """The listing prefix of the folder ``name`` (``prefix + name + '/'``)."""
    return object_key(prefix, name) + "/"


def check_name(name: str) -> None:
    """Refuse any name that is not ``segment(/segment)*`` of the allow-list."""
    segments = name.split("/")
    for segment in segments:
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise ValueError(f"unsafe object name {name!r}")


def relative_name(prefix: str, key: str) -> str | None:
    """The name of a listed ``key`` under ``prefix`` (None for a key outside it)."""
    if not key.startswith(prefix):
        return None
    return key[len(prefix) :]

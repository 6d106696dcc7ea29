"""The media cache's files on disk: names, sidecars, the start-up scan, safe removal.

Layout under ``root`` (names come from a hash, never from raw ids)::

    tmp/<random>.part          downloads in progress (removed at start-up)
    ab/<sha256-hex>            the body of one entry (ab = first two hex digits)
    ab/<sha256-hex>.json       its metadata; present only once the body is complete

An entry is written to ``tmp/`` and ``os.replace``-d into place, then its sidecar is
written the same way, so a crash leaves either nothing or a whole entry (an orphan
body without sidecar is removed by :func:`scan`). Every path is checked to lie under
the root. The index, the size cap and the writers are :mod:`relay.media.cache`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from relay.support.atomic import write_atomic

log = logging.getLogger(__name__)

TMP_DIR = "tmp"
TMP_SUFFIX = ".part"
META_SUFFIX = ".json"
HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class CacheKey:
    """One cached rendition: ``variant`` is ``variant_key()`` output or an ``enc-…`` name."""

    server_name: str
    media_id: str
    variant: str

    def digest(self) -> str:
        """The hex SHA-256 naming this entry on disk."""
        raw = f"{self.server_name}\n{self.media_id}\n{self.variant}".encode()
        return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A complete cached file and its metadata."""

    path: Path
    content_type: str
    length: int
    sha256: str
    filename: str | None
    created_at: float


def scan(root: Path) -> list[tuple[CacheKey, CacheEntry, float]]:
    """Every complete entry under ``root`` with its last access time (mtime).

    Creates the root (0700) and ``tmp/``, removes stray temporary files, orphan
    bodies and sidecars, interrupted sidecar writes and entries that do not check out.
    """
    _private_directory(root)
    (root / TMP_DIR).mkdir(mode=0o700, exist_ok=True)
    for stray in (root / TMP_DIR).iterdir():
        unlink(stray)
    items: list[tuple[CacheKey, CacheEntry, float]] = []
    for shard in root.iterdir():
        if shard.name == TMP_DIR or not shard.is_dir() or len(shard.name) != 2:
            continue
        for path in shard.iterdir():
            if path.name.endswith(META_SUFFIX):
                body = path.with_name(path.name[: -len(META_SUFFIX)])
                if not body.exists():
                    unlink(path)
                continue
            if path.name.startswith("."):
                unlink(path)  # an interrupted sidecar write
                continue
            item = _load(path)
            if item is None:
                unlink(path)
                unlink(_meta_path(path))
            else:
                items.append(item)
    return items


def _load(body: Path) -> tuple[CacheKey, CacheEntry, float] | None:
    try:
        meta = json.loads(_meta_path(body).read_text(encoding="utf-8"))
        key = CacheKey(str(meta["server_name"]), str(meta["media_id"]), str(meta["variant"]))
        stat = body.stat()
        entry = CacheEntry(
            path=body,
            content_type=str(meta["content_type"]),
            length=int(meta["length"]),
            sha256=str(meta["sha256"]),
            filename=None if meta.get("filename") is None else str(meta["filename"]),
            created_at=float(meta["created_at"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if body.name != key.digest() or stat.st_size != entry.length:
        return None
    return key, entry, stat.st_mtime


def install(tmp: Path, key: CacheKey, entry: CacheEntry) -> None:
    """Move the finished file ``tmp`` to ``entry.path``, then write its sidecar."""
    meta = {
        "server_name": key.server_name,
        "media_id": key.media_id,
        "variant": key.variant,
        "content_type": entry.content_type,
        "length": entry.length,
        "sha256": entry.sha256,
        "filename": entry.filename,
        "created_at": entry.created_at,
    }
    body = entry.path
    body.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Body first, sidecar last: the sidecar marks the entry complete (see scan).
    os.replace(tmp, body)
    write_atomic(_meta_path(body), json.dumps(meta).encode())


def temp_path(root: Path) -> Path:
    """A fresh path in ``tmp/`` (same file system as the entries)."""
    return _checked(root, root / TMP_DIR / f"{secrets.token_hex(16)}{TMP_SUFFIX}")


def entry_path(root: Path, digest: str) -> Path:
    """Where the body of the entry named ``digest`` lives."""
    return _checked(root, root / digest[:2] / digest)


def _checked(root: Path, path: Path) -> Path:
    """Refuse any path that would resolve outside the cache root."""
    if not path.resolve().is_relative_to(root):
        raise ValueError(f"cache path escapes the cache root: {path}")
    return path


def hash_file(path: Path) -> tuple[int, str]:
    """Length and hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    length = 0
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            length += len(chunk)
    return length, digest.hexdigest()


def _private_directory(root: Path) -> None:
    """The cache root, 0700: its files are decrypted attachments (each also 0600)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(root.stat().st_mode)
    if mode & 0o077:
        root.chmod(mode & 0o700)
        log.warning(
            "media cache %s was open to others (mode %o); made it %o", root, mode, mode & 0o700
        )


def _meta_path(body: Path) -> Path:
    return body.with_name(body.name + META_SUFFIX)


def unlink(path: Path) -> None:
    """Remove a file that may already be gone."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def unlink_entries(paths: list[Path]) -> None:
    """Remove entries (bodies and their sidecars)."""
    for path in paths:
        # Sidecar first: a body without sidecar is an orphan that scan() removes.
        unlink(_meta_path(path))
        unlink(path)

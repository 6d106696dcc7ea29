"""The media cache's files on disk: names, sidecars, the start-up scan, safe removal.

Layout under ``root`` (names come from a hash, never from raw ids)::

    ab/<media>-<variant>        the body of one entry (media = SHA-256 of the server
                                name and media id, ab its first two hex digits;
                                variant = the SHA-256 of the whole key)
    ab/<media>-<variant>.json   its metadata; present only once the body is complete
    work/<random>/              one relay process's files being written, the
                                directory flock-ed for the process's life
    tmp/<variant>.lock          the lock of a download under way (see
                                relay.media.shared_download), gone when it ends

Several relay processes may share one root. Every variant of a media item sits in one
shard under one prefix, so a purge finds all of them, whoever wrote them. An entry is
written in the writer's ``work/`` directory and ``os.replace``-d into place, then its
sidecar is written the same way, so a crash leaves either nothing or a whole entry;
any process finds an entry another committed from its sidecar (:func:`read_entry`).
The start-up scan removes only what no live process can still be writing: ``work/``
directories whose lock is free, and orphans older than :data:`ORPHAN_GRACE`. Entries
of the layout before 0.x (``ab/<variant>``) are moved into place (their sidecars carry
the keys). Every path is checked to lie under the root. The index, the size cap and
the writers are :mod:`relay.media.cache`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from relay.support.atomic import write_atomic
from relay.support.file_lock import FileLock

log = logging.getLogger(__name__)

TMP_DIR = "tmp"
WORK_DIR = "work"
TMP_SUFFIX = ".part"
META_SUFFIX = ".json"
LOCK_SUFFIX = ".lock"
HASH_CHUNK = 1024 * 1024
# A body without sidecar (or a half-written sidecar) younger than this may be another
# process's commit in progress: the scan leaves it alone.
ORPHAN_GRACE = 300.0
_HEX_NAME = 64
_ENTRY_NAME = 2 * _HEX_NAME + 1


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

    def media_digest(self) -> str:
        """The hex SHA-256 shared by every variant of this media item."""
        return media_digest(self.server_name, self.media_id)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A complete cached file and its metadata."""

    path: Path
    content_type: str
    length: int
    sha256: str
    filename: str | None
    created_at: float


Found = tuple[CacheKey, CacheEntry, float]


def media_digest(server_name: str, media_id: str) -> str:
    """The hex SHA-256 naming every variant of one media item."""
    return hashlib.sha256(f"{server_name}\n{media_id}".encode()).hexdigest()


# -- the scan ---------------------------------------------------------------------------


def prepare(root: Path) -> None:
    """Create the root (0700), ``tmp/`` and ``work/``."""
    _private_directory(root)
    for name in (TMP_DIR, WORK_DIR):
        (root / name).mkdir(mode=0o700, exist_ok=True)


def scan(root: Path, *, now: float | None = None) -> list[Found]:
    """Every complete entry under ``root`` with its last access time (mtime).

    Removes the ``work/`` directories of dead processes, orphan bodies and sidecars,
    interrupted sidecar writes and entries that do not check out; moves entries of the
    old layout into place. Never touches what a live process may be writing.
    """
    prepare(root)
    now = time.time() if now is None else now
    remove_dead_work(root)
    for stray in (root / TMP_DIR).iterdir():
        if stray.name.endswith(TMP_SUFFIX):
            unlink(stray)  # the single-process layout's downloads in progress
        elif stray.name.endswith(LOCK_SUFFIX):
            lock = FileLock.try_acquire(stray)
            if lock is not None:
                lock.release(remove=True)  # its owner died mid-download
    items: list[Found] = []
    for shard in root.iterdir():
        if len(shard.name) != 2 or not shard.is_dir():
            continue
        for path in shard.iterdir():
            if path.name.endswith(META_SUFFIX):
                body = path.with_name(path.name[: -len(META_SUFFIX)])
                if not body.exists() and _older(path, now):
                    unlink(path)
                continue
            if path.name.startswith("."):
                if _older(path, now):
                    unlink(path)  # an interrupted sidecar write
                continue
            item = _load(path)
            if item is not None and len(path.name) == _HEX_NAME:
                item = _migrate(root, item)
            if item is not None:
                items.append(item)
            elif _older(path, now) or _meta_path(path).exists():
                unlink(_meta_path(path))
                unlink(path)
    return items


def remove_dead_work(root: Path) -> None:
    """Remove the ``work/`` directories whose lock no live process holds (their
    processes died, perhaps mid-download: killed, out of memory)."""
    for directory in (root / WORK_DIR).iterdir():
        lock = FileLock.try_acquire(directory, directory=True) if directory.is_dir() else None
        if lock is None:
            continue  # alive (or not a directory we made)
        try:
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            lock.release()


def _older(path: Path, now: float) -> bool:
    """Untouched for ORPHAN_GRACE: by ctime, which every write and rename sets (a
    moved entry keeps its old mtime, its last access)."""
    try:
        return now - path.stat().st_ctime > ORPHAN_GRACE
    except FileNotFoundError:
        return False


def _migrate(root: Path, item: Found) -> Found | None:
    """Move an entry of the old layout (``ab/<variant>``) to its place now."""
    key, entry, touched = item
    body = entry_path(root, key)
    body.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        os.replace(entry.path, body)
        os.replace(_meta_path(entry.path), _meta_path(body))
    except FileNotFoundError:
        return None  # another process starting now moved it first
    except OSError as e:
        log.warning("media cache: cannot move %s to the new layout: %s", entry.path, e)
        unlink_entries([entry.path, body])
        return None
    moved = CacheEntry(
        body, entry.content_type, entry.length, entry.sha256, entry.filename, entry.created_at
    )
    return key, moved, touched


def _load(body: Path) -> Found | None:
    try:
        meta = json.loads(_meta_path(body).read_text(encoding="utf-8"))
        key = CacheKey(str(meta["server_name"]), str(meta["media_id"]), str(meta["variant"]))
        entry = CacheEntry(
            path=body,
            content_type=str(meta["content_type"]),
            length=int(meta["length"]),
            sha256=str(meta["sha256"]),
            filename=None if meta.get("filename") is None else str(meta["filename"]),
            created_at=float(meta["created_at"]),
        )
        info = body.stat()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    names = {key.digest(), _entry_name(key)}
    if body.name not in names or info.st_size != entry.length:
        return None
    return key, entry, info.st_mtime


def read_entry(root: Path, key: CacheKey) -> tuple[CacheEntry, float] | None:
    """The entry another process committed for ``key`` (sidecar present and consistent
    with its body), with its last access time; None when there is none."""
    found = _load(entry_path(root, key))
    if found is None or found[0] != key:
        return None
    return found[1], found[2]


# -- writing ----------------------------------------------------------------------------


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


def new_work_dir(root: Path) -> FileLock:
    """A fresh ``work/`` directory for this process, locked for as long as it lives."""
    for _ in range(8):
        directory = _checked(root, root / WORK_DIR / secrets.token_hex(8))
        directory.mkdir(mode=0o700)
        lock = FileLock.try_acquire(directory, directory=True)
        if lock is not None:
            return lock
        # Another process's scan took it for a dead one's between mkdir and flock.
    raise OSError(f"cannot lock a work directory under {root / WORK_DIR}")


def temp_path(root: Path, work: Path) -> Path:
    """A fresh path in this process's ``work/`` directory (same file system as entries)."""
    return _checked(root, work / f"{secrets.token_hex(16)}{TMP_SUFFIX}")


def lock_path(root: Path, key: CacheKey) -> Path:
    """Where the lock of ``key``'s download under way lives."""
    return _checked(root, root / TMP_DIR / f"{key.digest()}{LOCK_SUFFIX}")


def entry_path(root: Path, key: CacheKey) -> Path:
    """Where the body of ``key``'s entry lives."""
    name = _entry_name(key)
    return _checked(root, root / name[:2] / name)


def _entry_name(key: CacheKey) -> str:
    return f"{key.media_digest()}-{key.digest()}"


def checked(root: Path, path: Path) -> Path:
    """``path``, refused (ValueError) when it would resolve outside the cache root."""
    return _checked(root, path)


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


# -- removal ----------------------------------------------------------------------------


def unlink(path: Path) -> None:
    """Remove a file that may already be gone."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def unlink_entries(paths: list[Path]) -> None:
    """Remove entries (bodies and their sidecars)."""
    for path in paths:
        # Sidecar first: a body without sidecar is an orphan, never taken for an entry.
        unlink(_meta_path(path))
        unlink(path)


def remove_media(root: Path, server_name: str, media_id: str) -> list[Path]:
    """Remove every variant of a media item on disk, whoever wrote it; returns the
    bodies removed."""
    prefix = media_digest(server_name, media_id) + "-"
    shard = _checked(root, root / prefix[:2])
    try:
        names = [e.name for e in os.scandir(shard) if e.name.startswith(prefix)]
    except FileNotFoundError:
        return []
    bodies = [shard / name for name in names if len(name) == _ENTRY_NAME]
    unlink_entries(bodies)
    for name in names:
        unlink(shard / name)  # a sidecar without body
    return bodies

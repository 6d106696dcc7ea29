"""Secrets at rest (issue 13, finding 9): the SQLite database and the media cache are private.

The database holds every attachment key the relay has seen and the cache holds
decrypted attachments, so neither may be readable by other local users, whatever the
umask. Each test runs under umask 0, so only the relay's own modes can pass it.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.media.cache import MediaCache
from relay.media.cache_layout import CacheKey
from relay.store import open_database
from relay.support.metrics import Metrics
from tests.harness.cache import put_bytes


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def entries(root: Path, prefix: str = "") -> list[Path]:
    return sorted(p for p in root.rglob(prefix + "*") if p != root)


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """umask 0: a file the relay does not restrict itself would come out 0666."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


async def test_new_sqlite_database_is_0600(tmp_path: Path) -> None:
    """A database file the relay creates is 0600 from the start, and so are its WAL files."""
    path = tmp_path / "relay.db"
    db = await open_database(f"sqlite:{path}")
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("CREATE TABLE t (x INTEGER)")
        await db.execute("INSERT INTO t VALUES (1)")
        companions = entries(tmp_path, "relay.db")
        assert len(companions) > 1, "the WAL files should exist while the database is open"
        for p in companions:
            assert mode(p) == 0o600, p.name
    finally:
        await db.stop()


async def test_existing_open_database_is_tightened_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An existing database readable by others is made 0600 at start-up, with a log line."""
    path = tmp_path / "relay.db"
    db = await open_database(f"sqlite:{path}")
    await db.stop()
    path.chmod(0o644)
    caplog.set_level(logging.WARNING, logger="relay.db")
    db = await open_database(f"sqlite:{path}")
    try:
        assert mode(path) == 0o600
        assert any(
            "readable by others" in r.getMessage() and str(path) in r.getMessage()
            for r in caplog.records
        )
        # Its data is still there: the migration table survived the chmod.
        assert await db.fetchval("SELECT COUNT(*) FROM relay_schema_version") == 1
    finally:
        await db.stop()


async def test_cache_directory_files_and_sidecars_are_private(tmp_path: Path) -> None:
    """The cache root is 0700; bodies, sidecars, shards and the temp directory are private."""
    root = tmp_path / "cache"
    cache = MediaCache(root, 1 << 20, Metrics())
    await cache.start()
    key = CacheKey("example.org", "abc", "original")
    entry = await put_bytes(cache, key, b"secret", "text/plain")
    assert entry is not None
    assert mode(root) == 0o700
    files = [p for p in entries(root) if p.is_file()]
    assert {p.name.endswith(".json") for p in files} == {True, False}, files
    for p in files:
        assert mode(p) == 0o600, p
    for d in [p for p in entries(root) if p.is_dir()]:
        assert mode(d) & 0o077 == 0, d
    # A download in progress is private too.
    writer = cache.begin(CacheKey("example.org", "def", "original"))
    try:
        assert mode(writer.path) == 0o600
    finally:
        writer.abort()


async def test_existing_open_cache_directory_is_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache directory created 0755 by an older version becomes 0700 at start-up, logged."""
    root = tmp_path / "cache"
    root.mkdir(mode=0o755)
    caplog.set_level(logging.WARNING, logger="relay.media.cache_layout")
    await MediaCache(root, 1 << 20, Metrics()).start()
    assert mode(root) == 0o700
    assert any("open to others" in r.getMessage() for r in caplog.records)

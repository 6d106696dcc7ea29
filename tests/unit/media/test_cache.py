"""The media cache index: lookups, LRU cap, files being written, purge, abort."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from relay.media import cache_layout as layout
from relay.media.cache import CacheFull, MediaCache
from relay.media.cache_layout import CacheKey
from relay.media.cache_sweep import sweep
from relay.support.metrics import Metrics
from tests.harness.cache import files_under as _files
from tests.harness.cache import put_bytes
from tests.harness.cache import started_cache as _cache

KEY = CacheKey("example.org", "abc", "original")


async def test_put_then_lookup_hit(tmp_path: Path) -> None:
    """A committed entry is found with its bytes, length, sha256, type and name."""
    cache, metrics = await _cache(tmp_path)
    data = b"hello cache"
    await put_bytes(cache, KEY, data, "text/plain", "hello.txt")
    entry = cache.lookup(KEY)
    assert entry is not None
    assert entry.path.read_bytes() == data
    assert entry.length == len(data)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.content_type == "text/plain"
    assert entry.filename == "hello.txt"
    assert metrics.value("relay_cache_hits") == 1
    assert metrics.value("relay_cache_misses") == 0


async def test_lookup_miss_is_counted(tmp_path: Path) -> None:
    """An unknown key is a miss and no hit is counted."""
    cache, metrics = await _cache(tmp_path)
    assert cache.lookup(KEY) is None
    assert metrics.value("relay_cache_misses") == 1
    assert metrics.value("relay_cache_hits") == 0


async def test_variants_are_separate_entries(tmp_path: Path) -> None:
    """Plaintext (enc- variant) and ciphertext (original) of one mxc never collide."""
    cache, _ = await _cache(tmp_path)
    plain = CacheKey("example.org", "abc", "enc-1234-original")
    await put_bytes(cache, KEY, b"ciphertext", "application/octet-stream")
    await put_bytes(cache, plain, b"plaintext", "application/octet-stream")
    hit_plain, hit_cipher = cache.lookup(plain), cache.lookup(KEY)
    assert hit_plain is not None and hit_cipher is not None
    assert hit_plain.path.read_bytes() == b"plaintext"
    assert hit_cipher.path.read_bytes() == b"ciphertext"


async def test_lru_eviction_under_cap(tmp_path: Path) -> None:
    """Past max_bytes the least recently used entry goes, and is counted."""
    cache, metrics = await _cache(tmp_path, max_bytes=10)
    a, b, c = (CacheKey("example.org", m, "original") for m in ("a", "b", "c"))
    await put_bytes(cache, a, b"aaaa", "text/plain")
    await put_bytes(cache, b, b"bbbb", "text/plain")
    assert cache.lookup(a) is not None  # a is now more recent than b
    await put_bytes(cache, c, b"cccc", "text/plain")
    assert b not in cache
    assert a in cache and c in cache
    assert cache.total_bytes == 8
    assert metrics.value("relay_cache_evictions") == 1
    assert len(_files(tmp_path)) == 4  # two bodies, two sidecars


async def test_entry_larger_than_cache_is_not_kept(tmp_path: Path) -> None:
    """An entry bigger than the whole cache is refused while written, evicting nothing."""
    cache, metrics = await _cache(tmp_path, max_bytes=10)
    small = CacheKey("example.org", "small", "original")
    await put_bytes(cache, small, b"tiny", "text/plain")
    with pytest.raises(CacheFull):
        await put_bytes(cache, KEY, b"x" * 11, "text/plain")
    assert KEY not in cache
    assert small in cache
    assert metrics.value("relay_cache_evictions") == 0
    assert (cache.total_bytes, cache.pending_bytes) == (4, 0)
    assert list((cache.root / "tmp").iterdir()) == []


async def test_restart_applies_a_smaller_cap(tmp_path: Path) -> None:
    """Entries over a lowered cap are evicted at start, oldest access first."""
    cache, _ = await _cache(tmp_path)
    old = CacheKey("example.org", "old", "original")
    new = CacheKey("example.org", "new", "original")
    old_entry = await put_bytes(cache, old, b"oooooo", "text/plain")
    new_entry = await put_bytes(cache, new, b"nnnnnn", "text/plain")
    assert old_entry is not None and new_entry is not None
    # Last access persists as the body's mtime.
    os.utime(old_entry.path, (1_000_000, 1_000_000))
    os.utime(new_entry.path, (2_000_000, 2_000_000))
    again, metrics = await _cache(tmp_path, max_bytes=8)
    assert old not in again
    assert new in again
    assert metrics.value("relay_cache_evictions") == 1
    assert not old_entry.path.exists()


async def test_vanished_file_is_a_miss(tmp_path: Path) -> None:
    """A body removed behind the cache's back is reported as a miss, not an error."""
    cache, metrics = await _cache(tmp_path)
    entry = await put_bytes(cache, KEY, b"soon gone", "text/plain")
    assert entry is not None
    entry.path.unlink()
    assert cache.lookup(KEY) is None
    assert metrics.value("relay_cache_misses") == 1
    assert KEY not in cache
    assert cache.total_bytes == 0


async def test_purge_removes_all_variants(tmp_path: Path) -> None:
    """Purge removes every variant of one media item and nothing else."""
    cache, _ = await _cache(tmp_path)
    variants = ["original", "thumb-32x32-crop", "enc-aa-original"]
    for v in variants:
        await put_bytes(cache, CacheKey("example.org", "abc", v), v.encode(), "text/plain")
    keep = CacheKey("example.org", "other", "original")
    kept = await put_bytes(cache, keep, b"keep", "text/plain")
    assert kept is not None
    assert await cache.purge("example.org", "abc") == 3
    assert len(cache) == 1
    assert _files(tmp_path) == sorted([kept.path, kept.path.with_name(kept.path.name + ".json")])
    assert await cache.purge("example.org", "abc") == 0


async def test_purge_during_write_prevents_commit(tmp_path: Path) -> None:
    """A download under way when its media is purged is never committed."""
    cache, _ = await _cache(tmp_path)
    writer = cache.begin(KEY)
    await writer.write(b"revoked bytes")
    assert await cache.purge("example.org", "abc") == 0
    assert await writer.commit("text/plain", None) is None
    assert KEY not in cache
    assert _files(tmp_path) == []


async def test_abort_leaves_nothing(tmp_path: Path) -> None:
    """An aborted write removes its temporary file and creates no entry."""
    cache, _ = await _cache(tmp_path)
    writer = cache.begin(KEY)
    await writer.write(b"half")
    assert writer.path.exists()
    writer.abort()
    writer.abort()
    assert _files(tmp_path) == []
    assert cache.lookup(KEY) is None


def _disk_bytes(cache: MediaCache) -> int:
    """What the cache's files take, bodies and temporary files (sidecars aside)."""
    return sum(
        p.stat().st_size
        for p in cache.root.rglob("*")
        if p.is_file() and not p.name.endswith(".json")
    )


async def test_files_being_written_count_against_the_cap(tmp_path: Path) -> None:
    """Bytes in tmp/ evict committed entries, and cannot pass the cap by themselves."""
    cache, _ = await _cache(tmp_path, max_bytes=1000)
    old = CacheKey("example.org", "old", "original")
    await put_bytes(cache, old, b"o" * 600, "text/plain")
    writers = [cache.begin(CacheKey("example.org", f"new{i}", "original")) for i in range(3)]
    await writers[0].write(b"a" * 500)  # 600 + 500 > 1000: the old entry goes
    assert old not in cache
    assert (cache.total_bytes, cache.pending_bytes) == (0, 500)
    await writers[1].write(b"b" * 400)
    with pytest.raises(CacheFull) as info:
        await writers[2].write(b"c" * 200)  # 900 in flight + 200 > 1000
    assert info.value.errno == errno.ENOSPC
    assert _disk_bytes(cache) <= cache.max_bytes
    writers[2].abort()
    await writers[0].commit("text/plain", None)
    assert (cache.total_bytes, cache.pending_bytes) == (500, 400)
    writers[1].abort()
    assert (cache.total_bytes, cache.pending_bytes) == (500, 0)
    assert _disk_bytes(cache) == 500


async def test_a_miss_adopts_an_entry_another_cache_committed(tmp_path: Path) -> None:
    """Two caches over one root (as two processes): a miss in one finds the other's
    entry on disk and counts as a hit; one evicted by the other is a miss."""
    mine, metrics = await _cache(tmp_path)
    theirs, _ = await _cache(tmp_path)
    entry = await put_bytes(theirs, KEY, b"written elsewhere", "text/plain", "e.txt")
    assert entry is not None
    found = mine.lookup(KEY)
    assert found == entry
    assert KEY in mine and mine.total_bytes == len(b"written elsewhere")
    assert (metrics.value("relay_cache_hits"), metrics.value("relay_cache_misses")) == (1, 0)
    assert await theirs.purge("example.org", "abc") == 1
    assert mine.lookup(KEY) is None
    assert (KEY in mine, mine.total_bytes) == (False, 0)


async def test_sweep_keeps_the_directory_under_the_cap(tmp_path: Path) -> None:
    """The sweep removes a dead process's files, counts every cache's entries and files
    being written, and removes the least recently used (by mtime) until it all fits."""
    # No sweep of their own during the test: this one calls sweep() itself.
    first = MediaCache(tmp_path, 1000, Metrics(), sweep_interval=3600)
    second = MediaCache(tmp_path, 1000, Metrics(), sweep_interval=3600)
    await first.start()
    await second.start()
    keys = [CacheKey("example.org", f"m{i}", "original") for i in range(4)]
    for i, key in enumerate(keys):
        entry = await put_bytes(first if i % 2 else second, key, bytes(300), "text/plain")
        assert entry is not None
        os.utime(entry.path, (1_000_000 + i, 1_000_000 + i))
    writing = second.begin(CacheKey("example.org", "new", "original"))
    await writing.write(bytes(200))
    dead = tmp_path / "work" / "0123456789abcdef"  # a killed process's, its lock free
    dead.mkdir()
    (dead / "left.part").write_bytes(bytes(500))
    removed = sweep(first.root, 1000)
    # 4 x 300 + 200 in flight = 1400: the two least recently used go.
    assert sorted(removed) == sorted(layout.entry_path(first.root, k) for k in keys[:2])
    assert _disk_bytes(first) == 800
    assert not dead.exists()
    writing.abort()

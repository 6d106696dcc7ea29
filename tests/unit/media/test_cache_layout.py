"""The media cache on disk: names from a hash, sidecars read back, the start-up scan."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from relay.media import cache_layout as layout
from relay.media.cache_layout import CacheKey
from relay.support.file_lock import FileLock
from tests.harness.cache import files_under as _files
from tests.harness.cache import put_bytes
from tests.harness.cache import started_cache as _cache

KEY = CacheKey("example.org", "abc", "original")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (CacheKey("a.org", "x", "original"), CacheKey("a.org", "x", "thumb-32x32-crop")),
        (CacheKey("a.org", "x", "original"), CacheKey("a.org", "x", "enc-00-original")),
        (CacheKey("a.org", "xy", "original"), CacheKey("a.orgx", "y", "original")),
        (CacheKey("a.org", "x", "original"), CacheKey("b.org", "x", "original")),
    ],
)
def test_keys_never_share_a_name(a: CacheKey, b: CacheKey) -> None:
    """Different server, media id or variant give different file names."""
    assert a.digest() != b.digest()


async def test_survives_restart(tmp_path: Path) -> None:
    """A new MediaCache over the same directory finds every committed entry."""
    cache, _ = await _cache(tmp_path)
    await put_bytes(cache, KEY, b"persisted", "image/png", "a.png")
    other = CacheKey("example.org", "def", "thumb-32x32-crop")
    await put_bytes(cache, other, b"thumb", "image/jpeg")
    again, metrics = await _cache(tmp_path)
    assert len(again) == 2
    assert again.total_bytes == len(b"persisted") + len(b"thumb")
    entry = again.lookup(KEY)
    assert entry is not None
    assert entry.path.read_bytes() == b"persisted"
    assert (entry.content_type, entry.filename) == ("image/png", "a.png")
    assert metrics.value("relay_cache_hits") == 1


async def test_start_removes_partial_and_corrupt_entries(tmp_path: Path) -> None:
    """Stray temp files, bodies without sidecar and bad sidecars are removed at start."""
    cache, _ = await _cache(tmp_path)
    good = await put_bytes(cache, KEY, b"good", "text/plain")
    assert good is not None
    stray = tmp_path / "tmp" / "0123.part"
    stray.write_bytes(b"partial download")
    orphan = tmp_path / "ab" / ("ab" + "0" * 62)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"no sidecar")
    bad_key = CacheKey("example.org", "bad", "original")
    bad = await put_bytes(cache, bad_key, b"truncated later", "text/plain")
    assert bad is not None
    bad.path.write_bytes(b"trunc")  # length no longer matches the sidecar
    broken_key = CacheKey("example.org", "broken", "original")
    broken = await put_bytes(cache, broken_key, b"x", "text/plain")
    assert broken is not None
    broken.path.with_name(broken.path.name + ".json").write_text("{not json")

    # Later than ORPHAN_GRACE: nobody is still committing the orphan.
    layout.scan(tmp_path, now=time.time() + layout.ORPHAN_GRACE + 1)
    again, _ = await _cache(tmp_path)
    assert len(again) == 1
    assert again.lookup(KEY) is not None
    assert again.lookup(bad_key) is None
    assert again.lookup(broken_key) is None
    remaining = _files(tmp_path)
    assert remaining == sorted([good.path, good.path.with_name(good.path.name + ".json")])


@pytest.mark.parametrize(
    "key",
    [
        CacheKey("..", "..", ".."),
        CacheKey("example.org", "../../etc/passwd", "original"),
        CacheKey("/etc", "passwd", "original"),
        CacheKey("example.org", "abc", "../../../x"),
    ],
)
async def test_hostile_keys_stay_under_root(tmp_path: Path, key: CacheKey) -> None:
    """File names come from a hash, so no key can place a file outside the root."""
    root = tmp_path / "cache"
    cache, _ = await _cache(root)
    entry = await put_bytes(cache, key, b"data", "text/plain")
    assert entry is not None
    assert entry.path.resolve().is_relative_to(root.resolve())
    assert entry.path.name == f"{key.media_digest()}-{key.digest()}"
    assert all(p.resolve().is_relative_to(root.resolve()) for p in _files(tmp_path))


async def test_scan_leaves_what_live_processes_write(tmp_path: Path) -> None:
    """Another process's work directory (its lock held) and a young orphan body (a commit
    in progress) survive a start-up scan; a dead process's work directory does not."""
    layout.prepare(tmp_path)
    other = layout.new_work_dir(tmp_path)  # held on its own descriptor, as another process
    writing = other.path / "abc.part"
    writing.write_bytes(b"half a download")
    dead = tmp_path / "work" / "0123456789abcdef"
    dead.mkdir()
    (dead / "left.part").write_bytes(b"from a process killed -9")
    young = layout.entry_path(tmp_path, KEY)
    young.parent.mkdir()
    young.write_bytes(b"sidecar comes next")
    try:
        cache, _ = await _cache(tmp_path)
        assert writing.read_bytes() == b"half a download"
        assert not dead.exists()
        assert young.exists()
        assert cache.lookup(KEY) is None
        mine = cache.work_dir
        await cache.close()
        assert not mine.exists()
    finally:
        other.release()


async def test_old_layout_entries_are_moved_into_place(tmp_path: Path) -> None:
    """An entry of the single-process layout (ab/<variant digest>) is found after start."""
    old = tmp_path / KEY.digest()[:2] / KEY.digest()
    old.parent.mkdir(parents=True)
    old.write_bytes(b"from before")
    meta = {
        "server_name": KEY.server_name,
        "media_id": KEY.media_id,
        "variant": KEY.variant,
        "content_type": "text/plain",
        "length": len(b"from before"),
        "sha256": "00",
        "filename": "a.txt",
        "created_at": 1.0,
    }
    old.with_name(old.name + ".json").write_text(json.dumps(meta))
    cache, _ = await _cache(tmp_path)
    entry = cache.lookup(KEY)
    assert entry is not None
    assert entry.path == layout.entry_path(cache.root, KEY)
    assert (entry.path.read_bytes(), entry.filename) == (b"from before", "a.txt")
    assert not old.exists()
    assert _files(tmp_path) == sorted([entry.path, entry.path.with_name(entry.path.name + ".json")])


async def test_a_dead_download_lock_is_removed(tmp_path: Path) -> None:
    """A download lock left by a killed owner (free) is removed; a held one is not."""
    layout.prepare(tmp_path)
    free = layout.lock_path(tmp_path, KEY)
    FileLock.try_acquire(free).release()  # type: ignore[union-attr]
    held = FileLock.try_acquire(layout.lock_path(tmp_path, CacheKey("a.org", "x", "original")))
    assert held is not None and free.exists()
    try:
        await _cache(tmp_path)
        assert not free.exists()
        assert held.path.exists()
    finally:
        held.release(remove=True)

"""What a download's owner writes in its lock file, and what the others read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay.media import cache_layout as layout
from relay.media import shared_download as shared
from relay.media.cache_layout import CacheKey
from relay.media.download_flight import Purged
from relay.upstream.errors import (
    FetchError,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamTooLarge,
)

KEY = CacheKey("example.org", "abc", "original")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    layout.prepare(tmp_path)
    return tmp_path.resolve()


@pytest.mark.parametrize(
    ("error", "expected", "status", "retry_after"),
    [
        (UpstreamNotFound("gone"), UpstreamNotFound, 404, None),
        (Purged("revoked meanwhile"), UpstreamNotFound, 404, None),
        (UpstreamTooLarge("big"), UpstreamTooLarge, 502, None),
        (UpstreamRateLimited("slow down", retry_after=7), UpstreamRateLimited, 503, 7),
        (UpstreamError("timed out", status=504, retry_after=30), UpstreamError, 504, 30),
    ],
)
def test_the_owner_failure_is_read_back_as_its_class(
    root: Path,
    error: FetchError,
    expected: type[FetchError],
    status: int,
    retry_after: int | None,
) -> None:
    """Every answer worth repeating crosses with its class, status and back-off."""
    claim = shared.try_claim(root, KEY)
    assert claim is not None
    watch = shared.Watch.open(root, KEY)
    assert watch is not None
    claim.announce(_part(root), "video/mp4", 5, "a" * 300)  # a longer record first
    claim.fail(error)
    claim.release()
    record = watch.read()  # the owner removed the file; an open one still reads
    watch.close()
    assert isinstance(record, shared.Failure)
    assert type(record.error) is expected
    assert record.error.status == status
    if retry_after is not None:
        assert isinstance(record.error, UpstreamError)
        assert record.error.retry_after == retry_after
    assert not layout.lock_path(root, KEY).exists()


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left"), shared.BrokeOff("gone"), RuntimeError("bug")]
)
def test_the_owner_own_trouble_is_not_passed_on(root: Path, error: BaseException) -> None:
    """Its disk, its shutdown, its bugs: nothing is written, so a follower retries itself."""
    claim = shared.try_claim(root, KEY)
    assert claim is not None
    claim.fail(error)
    assert layout.lock_path(root, KEY).read_bytes() == b""
    claim.release()


def test_an_announcement_names_the_growing_file(root: Path) -> None:
    """The headers and the file (with its inode) are read back; a second owner is refused."""
    part = _part(root)
    claim = shared.try_claim(root, KEY)
    assert claim is not None
    assert shared.try_claim(root, KEY) is None
    claim.announce(part, "image/png", None, "cat.png")
    watch = shared.Watch.open(root, KEY)
    assert watch is not None
    assert watch.read() == shared.Announcement(
        part, part.stat().st_ino, "image/png", None, "cat.png"
    )
    assert watch.current() and not watch.owner_gone()
    claim.release()
    assert not watch.current() and watch.owner_gone()
    watch.close()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"state": "streaming"}',
        b'"a string"',
        json.dumps(
            {
                "state": "streaming",
                "path": "/etc/passwd",
                "inode": 1,
                "content_type": "x",
                "length": 1,
                "filename": None,
            }
        ).encode(),
    ],
)
def test_unusable_records_are_nothing_yet(root: Path, content: bytes) -> None:
    """Half-written, malformed, or naming a file outside the cache: not an announcement."""
    path = layout.lock_path(root, KEY)
    path.write_bytes(content)
    watch = shared.Watch.open(root, KEY)
    assert watch is not None
    assert watch.read() is None
    watch.close()


def test_a_new_owner_forgets_what_a_dead_one_announced(root: Path) -> None:
    """The lock file of a killed owner (free, its record still there) is emptied on claim."""
    path = layout.lock_path(root, KEY)
    path.write_bytes(b'{"state": "streaming"}')
    claim = shared.try_claim(root, KEY)
    assert claim is not None
    assert path.read_bytes() == b""
    claim.release()


def _part(root: Path) -> Path:
    part = root / "work" / "x.part"
    part.parent.mkdir(exist_ok=True)
    part.write_bytes(b"hello")
    return part

"""relay.s3.bucket against a real S3-protocol server (moto's, started by the harness)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from relay.config.media_settings import ObjectStoreConfig
from relay.devtools.local_synapse import free_ports
from relay.s3.bucket import S3Bucket, S3Error
from tests.harness.s3_server import S3Store, store_config

MiB = 1024 * 1024


async def _started(config: ObjectStoreConfig, **options: int) -> S3Bucket:
    bucket = S3Bucket(config, **options)  # type: ignore[arg-type]
    await bucket.start()
    return bucket


@pytest_asyncio.fixture
async def bucket(s3_store: S3Store) -> AsyncIterator[S3Bucket]:
    started = await _started(s3_store.config)
    yield started
    await started.close()


async def _read(bucket: S3Bucket, name: str) -> bytes | None:
    found = await bucket.get(name)
    if found is None:
        return None
    try:
        return b"".join([chunk async for chunk in found.iter_chunks()])
    finally:
        await found.close()


def _file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / secrets.token_hex(4)
    path.write_bytes(data)
    return path


async def test_put_get_head_list(bucket: S3Bucket, s3_store: S3Store, tmp_path: Path) -> None:
    """A stored file reads back whole, with its type and metadata, under the prefix."""
    data = secrets.token_bytes(300_000)
    size = await bucket.put_file(
        "ab/cd", _file(tmp_path, data), content_type="image/png", metadata={"sha256": "x1"}
    )
    assert size == len(data)
    assert s3_store.listing() == ["relay-test/ab/cd"]
    found = await bucket.get("ab/cd")
    assert found is not None
    try:
        assert (found.content_type, found.content_length) == ("image/png", len(data))
        assert found.metadata == {"sha256": "x1"}
        assert b"".join([c async for c in found.iter_chunks()]) == data
    finally:
        await found.close()
    info = await bucket.head("ab/cd")
    assert info is not None and (info.name, info.size) == ("ab/cd", len(data))
    listed = [i async for i in bucket.objects()]
    assert [(i.name, i.size) for i in listed] == [("ab/cd", len(data))]
    assert abs(listed[0].last_modified - info.last_modified) < 1


async def test_missing_objects_are_none(bucket: S3Bucket) -> None:
    """An absent object is None for get and head, never an error."""
    assert await bucket.get("ab/nothing") is None
    assert await bucket.head("ab/nothing") is None
    assert [i async for i in bucket.objects("ab")] == []


async def test_large_file_goes_up_in_parts(s3_store: S3Store, tmp_path: Path) -> None:
    """A file over the part size is a multipart upload: identical bytes, no upload left open."""
    bucket = await _started(s3_store.config, part_size=5 * MiB)
    try:
        data = secrets.token_bytes(12 * MiB + 123)  # three parts, the last one short
        await bucket.put_file(
            "big/one", _file(tmp_path, data), content_type="video/mp4", metadata={}
        )
        assert await _read(bucket, "big/one") == data
        body, response = s3_store.read("relay-test/big/one")
        assert body == data and response["ContentType"] == "video/mp4"
        # A multipart object's ETag ends with the number of its parts.
        assert response["ETag"].strip('"').endswith("-3")
        uploads = s3_store.client.list_multipart_uploads(Bucket=s3_store.config.bucket)
        assert uploads.get("Uploads", []) == []
    finally:
        await bucket.close()


async def test_delete_folder_removes_only_that_folder(
    bucket: S3Bucket, s3_store: S3Store, tmp_path: Path
) -> None:
    """Deleting one folder leaves its siblings (even one whose name starts the same) and
    anything outside the prefix."""
    path = _file(tmp_path, b"x")
    for name in ("ab/1", "ab/2", "ab/3", "abc/1", "cd/1"):
        await bucket.put_file(name, path, content_type="text/plain", metadata={})
    s3_store.client.put_object(Bucket=s3_store.config.bucket, Key="elsewhere/ab/1", Body=b"y")
    assert await bucket.delete_folder("ab") == 3
    assert s3_store.listing() == ["elsewhere/ab/1", "relay-test/abc/1", "relay-test/cd/1"]
    assert await bucket.delete_folder("ab") == 0
    # The prefix's own listing never shows what lies outside it.
    assert sorted([i.name async for i in bucket.objects()]) == ["abc/1", "cd/1"]


@pytest.mark.parametrize("name", ["../elsewhere/ab/1", "/elsewhere", "ab//1", ""])
async def test_names_cannot_leave_the_prefix(
    bucket: S3Bucket, s3_store: S3Store, tmp_path: Path, name: str
) -> None:
    """Unsafe names are refused before any request: nothing outside the prefix is touched."""
    s3_store.client.put_object(Bucket=s3_store.config.bucket, Key="elsewhere/ab/1", Body=b"y")
    with pytest.raises(ValueError, match="unsafe object name"):
        await bucket.get(name)
    with pytest.raises(ValueError, match="unsafe object name"):
        await bucket.delete([name])
    with pytest.raises(ValueError, match="unsafe object name"):
        await bucket.put_file(name, _file(tmp_path, b"z"), content_type="x/y", metadata={})
    assert s3_store.listing() == ["elsewhere/ab/1"]


async def test_unreachable_store_raises_s3_error(tmp_path: Path) -> None:
    """Nobody listening: every operation raises S3Error (the caller decides), fast."""
    (port,) = free_ports(1)
    bucket = await _started(store_config(f"http://127.0.0.1:{port}", "relay-nowhere"))
    try:
        with pytest.raises(S3Error, match="GetObject"):
            await bucket.get("ab/cd")
        with pytest.raises(S3Error, match="PutObject"):
            await bucket.put_file("ab/cd", _file(tmp_path, b"x"), content_type="a/b", metadata={})
        with pytest.raises(S3Error, match="ListObjectsV2"):
            [i async for i in bucket.objects()]
        with pytest.raises(S3Error, match="ListObjectsV2"):
            await bucket.delete_folder("ab")
    finally:
        await bucket.close()


async def test_missing_bucket_is_an_error_not_an_absent_object(s3_store: S3Store) -> None:
    """A bucket that does not exist is a configuration problem: S3Error, not None."""
    config = s3_store.config.model_copy(update={"bucket": "relay-no-such-bucket"})
    bucket = await _started(config)
    try:
        with pytest.raises(S3Error, match="NoSuchBucket"):
            await bucket.get("ab/cd")
    finally:
        await bucket.close()


async def test_wrong_credentials_are_refused(s3_auth_store: S3Store, tmp_path: Path) -> None:
    """On a server that checks signatures, a wrong secret is a 403 S3Error; the right one
    works (so the refusal is about the key, not the server)."""
    good = await _started(s3_auth_store.config)
    wrong = s3_auth_store.config.model_copy(update={"secret_access_key": "not-the-secret"})
    bad = await _started(wrong)
    try:
        await good.put_file("ab/cd", _file(tmp_path, b"ok"), content_type="a/b", metadata={})
        assert await _read(good, "ab/cd") == b"ok"
        with pytest.raises(S3Error, match="403 SignatureDoesNotMatch"):
            await bad.get("ab/cd")
        with pytest.raises(S3Error, match="403"):
            await bad.delete_folder("ab")
        assert await _read(good, "ab/cd") == b"ok"
    finally:
        await good.close()
        await bad.close()


async def test_listing_and_deleting_go_past_one_page(bucket: S3Bucket, s3_store: S3Store) -> None:
    """More than 1,000 objects (one ListObjectsV2 page, one DeleteObjects batch): all are
    listed and all are deleted."""
    count = 1_003
    for i in range(count):
        s3_store.client.put_object(
            Bucket=s3_store.config.bucket, Key=f"relay-test/ab/{i}", Body=b""
        )
    listed = [info.name async for info in bucket.objects("ab")]
    assert sorted(listed) == sorted(f"ab/{i}" for i in range(count))
    assert await bucket.delete_folder("ab") == count
    assert s3_store.listing() == []

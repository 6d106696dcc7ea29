"""One S3-protocol bucket under one key prefix (aiobotocore): get, put, head, list, delete.

Every name is relative to the configured prefix and passes :mod:`relay.s3.keys` first,
so nothing here can read or delete outside it. The store's own trouble (unreachable,
refused, throttled, a broken answer) is raised as :class:`S3Error`; an absent object
is None, never an error. What to do about an error is the caller's choice (the media
tier treats a failed read as a miss and a failed purge as something to retry).

Uploads go from a file on disk: one ``PutObject`` up to :data:`PART_SIZE`, else a
multipart upload of parts read one at a time (aborted on failure, so no parts are
left behind to be billed), so memory stays at one part whatever the file's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from relay.config.media_settings import ObjectStoreConfig
from relay.s3.keys import key_prefix, object_key, relative_name

log = logging.getLogger(__name__)

# S3's smallest part (but the last) is 5 MiB; 8 MiB is what the AWS CLI uses.
PART_SIZE = 8 * 1024 * 1024
READ_CHUNK = 256 * 1024
# DeleteObjects takes at most this many keys per request.
DELETE_BATCH = 1000
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
# One retry for a throttled or dropped request; more would hold a client's request
# far longer than the homeserver would take to answer it.
MAX_ATTEMPTS = 2
_ABSENT = frozenset({"NoSuchKey", "404", "NotFound"})
# The way to the store failing (not the store answering with an error).
_TRANSPORT_ERRORS = (BotoCoreError, aiohttp.ClientError, TimeoutError)


class S3Error(Exception):
    """The object store failed: unreachable, refused (credentials, permissions), throttled."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object, as listed: its name under the prefix, size and store time."""

    name: str
    size: int
    last_modified: float  # Unix time


class S3Object:
    """An object being read: its headers now, its body as a stream (close it)."""

    def __init__(self, name: str, response: Mapping[str, Any]) -> None:
        self.name = name
        self.content_type = str(response.get("ContentType") or "application/octet-stream")
        length = response.get("ContentLength")
        self.content_length: int | None = int(length) if length is not None else None
        self.metadata: dict[str, str] = dict(response.get("Metadata") or {})
        self._body = response["Body"]

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body; a connection lost midway raises S3Error."""
        with _store_errors(f"reading {self.name}", os_errors=False):
            while True:
                chunk: bytes = await self._body.read(READ_CHUNK)
                if not chunk:
                    return
                yield chunk

    async def close(self) -> None:
        self._body.close()


class S3Bucket:
    """The configured bucket and prefix (``media.store``); ``start`` before use."""

    def __init__(
        self,
        config: ObjectStoreConfig,
        *,
        part_size: int = PART_SIZE,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        if part_size < 5 * 1024 * 1024:
            raise ValueError("part_size must be at least 5 MiB (S3's smallest part)")
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.part_size = part_size
        self._config = config
        self._botocore = AioConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            s3={"addressing_style": config.addressing_style},
            # Checksums only where S3 requires them: several S3-protocol servers
            # (older MinIO and Garage, R2 at times) refuse the newer default trailers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._context: Any = None
        self._client: Any = None

    async def start(self) -> None:
        """Create the client (no request is made: an unreachable store shows on first use)."""
        cfg = self._config
        context = get_session().create_client(
            "s3",
            endpoint_url=cfg.endpoint or None,
            region_name=cfg.region,
            # None: botocore's own chain (environment, profile, instance role).
            aws_access_key_id=cfg.access_key_id or None,
            aws_secret_access_key=cfg.secret_access_key or None,
            config=self._botocore,
        )
        self._client = await context.__aenter__()
        self._context = context

    async def close(self) -> None:
        context, self._context, self._client = self._context, None, None
        if context is not None:
            await context.__aexit__(None, None, None)

    @property
    def _s3(self) -> Any:
        if self._client is None:
            raise S3Error("the S3 client is not started")
        return self._client

    async def check(self) -> None:
        """Raise S3Error unless the bucket answers (and these credentials may use it)."""
        with _store_errors(f"HeadBucket {self.bucket}"):
            await self._s3.head_bucket(Bucket=self.bucket)

    # -- reading ------------------------------------------------------------------------

    async def get(self, name: str) -> S3Object | None:
        """The object ``name`` as a stream, or None when there is none."""
        key = object_key(self.prefix, name)
        with _store_errors(f"GetObject {key}"):
            try:
                response = await self._s3.get_object(Bucket=self.bucket, Key=key)
            except ClientError as e:
                if _code(e) in _ABSENT:
                    return None
                raise
        return S3Object(name, response)

    async def head(self, name: str) -> ObjectInfo | None:
        """Size and store time of ``name``, or None when there is none."""
        key = object_key(self.prefix, name)
        with _store_errors(f"HeadObject {key}"):
            try:
                response = await self._s3.head_object(Bucket=self.bucket, Key=key)
            except ClientError as e:
                if _code(e) in _ABSENT:
                    return None
                raise
        return ObjectInfo(
            name, int(response["ContentLength"]), response["LastModified"].timestamp()
        )

    async def objects(self, folder: str | None = None) -> AsyncIterator[ObjectInfo]:
        """Every object under the prefix (or its ``folder``), page by page."""
        prefix = self.prefix if folder is None else key_prefix(self.prefix, folder)
        paginator = self._s3.get_paginator("list_objects_v2")
        with _store_errors(f"ListObjectsV2 {prefix}"):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    name = relative_name(self.prefix, item["Key"])
                    if name:
                        yield ObjectInfo(name, int(item["Size"]), item["LastModified"].timestamp())

    # -- writing ------------------------------------------------------------------------

    async def put_file(
        self, name: str, path: Path, *, content_type: str, metadata: Mapping[str, str]
    ) -> int:
        """Store the file at ``path`` as ``name``; returns its size. OSError for the file."""
        key = object_key(self.prefix, name)
        size = (await asyncio.to_thread(path.stat)).st_size
        common = {
            "Bucket": self.bucket,
            "Key": key,
            "ContentType": content_type,
            "Metadata": dict(metadata),
        }
        with _store_errors(f"PutObject {key}", os_errors=False):
            if size <= self.part_size:
                body = await asyncio.to_thread(_read_part, path, 0, size)
                await self._s3.put_object(Body=body, **common)
            else:
                await self._put_multipart(common, path, size)
        return size

    async def _put_multipart(self, common: dict[str, Any], path: Path, size: int) -> None:
        upload = await self._s3.create_multipart_upload(**common)
        upload_id = upload["UploadId"]
        target = {"Bucket": self.bucket, "Key": common["Key"], "UploadId": upload_id}
        try:
            parts = []
            for number, offset in enumerate(range(0, size, self.part_size), start=1):
                body = await asyncio.to_thread(_read_part, path, offset, self.part_size)
                part = await self._s3.upload_part(PartNumber=number, Body=body, **target)
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
            await self._s3.complete_multipart_upload(MultipartUpload={"Parts": parts}, **target)
        except BaseException:
            # Parts of an upload never completed are kept (and billed) until aborted.
            try:
                await asyncio.shield(self._s3.abort_multipart_upload(**target))
            except (ClientError, *_TRANSPORT_ERRORS) as e:
                log.warning("could not abort the multipart upload of %s: %s", common["Key"], e)
            raise

    # -- removal ------------------------------------------------------------------------

    async def delete(self, names: Iterable[str]) -> int:
        """Remove these objects (absent ones count as removed); returns how many."""
        keys = [object_key(self.prefix, name) for name in names]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start : start + DELETE_BATCH]]
            with _store_errors("DeleteObjects"):
                response = await self._s3.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise S3Error(
                    f"DeleteObjects: {len(errors)} not removed, first {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message')}"
                )
        return len(keys)

    async def delete_folder(self, folder: str) -> int:
        """Remove every object under ``folder``; returns how many there were."""
        names = [info.name async for info in self.objects(folder)]
        return await self.delete(names)


def _read_part(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _describe(error: ClientError) -> str:
    """The store's code and message (never the request, which carries the signature)."""
    info = error.response.get("Error", {})
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
    return f"{status} {info.get('Code', '?')}: {info.get('Message', '')}".rstrip(": ")


@contextlib.contextmanager
def _store_errors(what: str, *, os_errors: bool = True) -> Iterator[None]:
    """The store's refusals and the way to it failing, as S3Error naming ``what``;
    ``os_errors=False`` lets an OSError through (a local file's, the caller's to raise)."""
    transport = (*_TRANSPORT_ERRORS, OSError) if os_errors else _TRANSPORT_ERRORS
    try:
        yield
    except ClientError as e:
        raise S3Error(f"{what}: {_describe(e)}") from e
    except transport as e:
        raise S3Error(f"{what}: {e}") from e

"""The media sections of the configuration: the cache, its optional shared tier, thumbnails."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PlainValidator, ValidationInfo, field_validator

from relay.config.section import Section
from relay.config.values import (
    Flag,
    Size,
    Text,
    _size,
    base_dir,
    fail,
    http_url,
    integer,
    number,
    string,
)

# S3 bucket names (AWS's rules, which MinIO, Garage and R2 follow): 3-63 characters.
_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")


def _bucket(value: object) -> str:
    name = string(value, required=True)
    if not 3 <= len(name) <= 63 or not set(name) <= _BUCKET_CHARS or name[0] in ".-":
        fail(f"expected an S3 bucket name (3-63 of a-z, 0-9, '.', '-'), got {name!r}")
    return name


def _prefix(value: object) -> str:
    prefix = string(value)
    if prefix.startswith("/") or ".." in prefix.split("/"):
        fail(f"expected a key prefix without a leading '/' or '..', got {prefix!r}")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _cap(value: object) -> int:
    """A size, or 0 for no cap (``Size`` alone refuses the 0 the example config shows)."""
    zero = isinstance(value, int) and not isinstance(value, bool) and value == 0
    return 0 if zero else _size(value)


class ObjectStoreConfig(Section):
    """``media.store``: an S3-protocol bucket shared by relays on several machines."""

    shape = "a mapping with kind: s3 and bucket"
    kind: Literal["s3"]
    bucket: Annotated[str, PlainValidator(_bucket)]
    # Empty: AWS itself. MinIO, Garage, R2: their endpoint URL.
    endpoint: Annotated[str, PlainValidator(lambda v: http_url(v) if v else "")] = ""
    region: Text = "us-east-1"
    prefix: Annotated[str, PlainValidator(_prefix)] = "matrix-media-relay/"
    # Empty: botocore's own chain (AWS_ACCESS_KEY_ID and friends, a profile, a role).
    access_key_id: Text = ""
    secret_access_key: Annotated[str, PlainValidator(string), Field(repr=False)] = ""
    # "path" suits MinIO and Garage; "virtual" is AWS's default addressing.
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    # Objects past this total are evicted, least recently stored first (0: no cap).
    max_size: Annotated[int, PlainValidator(_cap)] = 0


class MediaConfig(Section):
    cache_dir: Path = Field(default=Path("media-cache"), validate_default=True)
    max_size: Size = 100 * 1024**2
    cache_max_size: Size = 10 * 1024**3
    strip_metadata: Flag = True
    not_found_ttl: Annotated[float, number(0, 86400)] = 60.0
    connect_timeout: Annotated[float, number(0.1, 600)] = 10.0
    read_timeout: Annotated[float, number(0.1, 3600)] = 30.0
    download_timeout: Annotated[float, number(1, 86400)] = 600.0
    # Seconds a cached item is served before the homeserver is asked again whether it
    # still serves it (quarantined or deleted media must stop); fractions for tests.
    revalidate_after: Annotated[float, number(0.1, 86400)] = 300.0
    # A second tier shared by relays on several machines (None: local disk only).
    store: ObjectStoreConfig | None = None

    @field_validator("cache_dir", mode="plain")
    @classmethod
    def _cache_dir(cls, value: object, info: ValidationInfo) -> Path:
        return base_dir(info) / (value if isinstance(value, Path) else string(value))

    @field_validator("cache_max_size")
    @classmethod
    def _holds_largest_file(cls, value: int, info: ValidationInfo) -> int:
        max_size = info.data.get("max_size")
        if max_size is not None and value < max_size:
            # A file larger than the whole cache would be evicted as soon as it was written.
            fail(f"must be at least media.max_size ({max_size} bytes)")
        return value


class ThumbnailConfig(Section):
    max_side: Annotated[int, integer(1, 8192)] = 2048
    max_pixels: Annotated[int, integer(1, 1_000_000_000)] = 32_000_000

"""``media.store``: the S3 tier's section, as the loader reads it (file and environment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from relay.config.errors import ConfigError
from relay.config.loading import load, validate
from tests.harness.config_documents import minimal

BUCKET = {"kind": "s3", "bucket": "media-relay"}


def _store(tmp_path: Path, **values: Any) -> Any:
    return validate(minimal(media={"store": {**BUCKET, **values}}), base_dir=tmp_path).media.store


def test_defaults(tmp_path: Path) -> None:
    """Only kind and bucket are needed; the rest is AWS-shaped, no cap, no secret in repr."""
    store = _store(tmp_path, secret_access_key="hush-hush")
    assert store is not None
    assert (store.endpoint, store.region, store.prefix) == ("", "us-east-1", "matrix-media-relay/")
    assert (store.addressing_style, store.max_size) == ("path", 0)
    assert "hush-hush" not in repr(store)
    assert validate(minimal(), base_dir=tmp_path).media.store is None


@pytest.mark.parametrize(("value", "expected"), [(0, 0), ("500G", 500 * 1024**3), (10, 10)])
def test_max_size_takes_zero_for_no_cap(tmp_path: Path, value: object, expected: int) -> None:
    """0 (what the example shows) is no cap; sizes as everywhere else."""
    assert _store(tmp_path, max_size=value).max_size == expected


def test_zero_from_a_yaml_file(tmp_path: Path) -> None:
    """The loader's own integers (ruamel's, not int itself) take 0 as well."""
    path = tmp_path / "config.yaml"
    yaml = YAML(typ="safe", pure=True)
    with path.open("w", encoding="utf-8") as f:
        yaml.dump(minimal(media={"store": {**BUCKET, "max_size": 0}}), f)
    config = load(path, environ={})
    assert config.media.store is not None and config.media.store.max_size == 0


def test_store_from_the_environment(tmp_path: Path) -> None:
    """RELAY_MEDIA_STORE sets the whole section as a YAML flow mapping."""
    path = tmp_path / "config.yaml"
    yaml = YAML(typ="safe", pure=True)
    with path.open("w", encoding="utf-8") as f:
        yaml.dump(minimal(), f)
    environ = {"RELAY_MEDIA_STORE": "{kind: s3, bucket: from-env, prefix: relay}"}
    store = load(path, environ=environ).media.store
    assert store is not None and (store.bucket, store.prefix) == ("from-env", "relay/")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_size": -1}, "media.store.max_size: expected a positive size"),
        ({"max_size": False}, "media.store.max_size: expected a size"),
        ({"bucket": "Media_Relay"}, "media.store.bucket: expected an S3 bucket name"),
        ({"prefix": "../other"}, "media.store.prefix: expected a key prefix"),
        ({"prefix": "/abs"}, "media.store.prefix: expected a key prefix"),
        ({"addressing_style": "dns"}, "media.store.addressing_style"),
        ({"kind": "gcs"}, "media.store.kind"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    """Each mistake is one line naming the key."""
    with pytest.raises(ConfigError) as e:
        _store(tmp_path, **values)
    assert str(e.value).startswith(message), str(e.value)

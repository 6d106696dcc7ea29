"""The compat: section: entries per bridge, their keys checked, every mistake named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay.config.errors import ConfigError
from relay.config.loading import load, validate
from tests.harness.config_documents import minimal
from tests.harness.relay import write_config

JWK = {"kty": "oct", "k": "kMfFsge8ORxo0ssDwZhA2rDLhzrOmL2oLFFjIAFHYWjB1kKja2Ld0iMvWUaUwLSo"}
KEY = "k" * 32


def problems(doc: dict[str, object], tmp_path: Path) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as e:
        validate(doc, base_dir=tmp_path)
    return e.value.problems


def test_defaults_are_off(tmp_path: Path) -> None:
    """Without a compat section nothing but native links is served."""
    config = validate(minimal(), base_dir=tmp_path)
    assert config.compat.legacy_media is False
    assert (config.compat.mediaproxy, config.compat.heisenbridge) == ((), ())
    assert config.compat.mautrix_publicmedia == ()


def test_every_kind_loads(tmp_path: Path) -> None:
    """Two entries of one kind, a relative JWK path, mautrix defaults and a prefix."""
    (tmp_path / "irc.jwk").write_text(json.dumps(JWK))
    compat = {
        "mediaproxy": [
            {"name": "irc-a", "url": "https://a.example/media/", "signing_key_path": "irc.jwk"},
            {"name": "irc-b", "url": "https://b.example", "signing_key_path": "irc.jwk"},
        ],
        "heisenbridge": [{"name": "hb", "url": "https://hb.example/", "media_key": KEY}],
        "mautrix_publicmedia": [{"name": "wa", "url": "https://wa.example", "signing_key": KEY}],
        "legacy_media": True,
    }
    config = validate(minimal(compat=compat), base_dir=tmp_path)
    a, b = config.compat.mediaproxy
    assert a.url_prefix == "/media" and b.url_prefix == ""
    assert a.signing_key_path == tmp_path / "irc.jwk"
    assert len(a.signing_key()) == 48
    wa = config.compat.mautrix_publicmedia[0]
    assert (wa.hash_length, wa.expiry, wa.path_prefix) == (32, 0, "/_mautrix/publicmedia")
    assert config.compat.legacy_media is True
    assert KEY not in repr(config)


def test_mistakes_are_named(tmp_path: Path) -> None:
    """A missing JWK file, hash_length 0, a bad prefix, a short key, a duplicate name."""
    (tmp_path / "bad.jwk").write_text('{"kty": "RSA"}')
    compat = {
        "mediaproxy": [
            {"name": "irc", "url": "https://a.example", "signing_key_path": "missing.jwk"},
            {"name": "irc2", "url": "https://a.example", "signing_key_path": "bad.jwk"},
        ],
        "heisenbridge": [{"name": "hb", "url": "ftp://x", "media_key": "short"}],
        "mautrix_publicmedia": [
            {"name": "wa", "url": "https://wa.example", "signing_key": KEY, "hash_length": 0},
            {"name": "wa", "url": "https://wa.example", "signing_key": KEY, "path_prefix": "/a b"},
        ],
        "legacy_media": "yes",
    }
    found = problems(minimal(compat=compat), tmp_path)
    text = "\n".join(found)
    assert "compat.mediaproxy[0].signing_key_path: cannot read the bridge's JWK file" in text
    assert "compat.mediaproxy[1].signing_key_path:" in text and "kty" in text
    assert "compat.heisenbridge[0].url: expected an http(s) URL" in text
    assert "compat.heisenbridge[0].media_key: expected the bridge's key" in text
    assert "compat.mautrix_publicmedia[0].hash_length: expected an integer 1-32, got 0" in text
    assert "compat.mautrix_publicmedia[1].path_prefix: expected a path" in text
    assert "compat.legacy_media: expected true or false, got 'yes'" in text


def test_duplicate_names_refused(tmp_path: Path) -> None:
    """Entry names label metrics, so two entries may not share one, across kinds too."""
    compat = {
        "heisenbridge": [{"name": "x", "url": "https://a.example", "media_key": KEY}],
        "mautrix_publicmedia": [{"name": "x", "url": "https://b.example", "signing_key": KEY}],
    }
    assert any("own name" in p for p in problems(minimal(compat=compat), tmp_path))


def test_unknown_key_near_miss(tmp_path: Path) -> None:
    """A misspelt key in an entry is named with the real one."""
    compat = {"heisenbridge": [{"name": "x", "url": "https://a.example", "media_keys": KEY}]}
    found = problems(minimal(compat=compat), tmp_path)
    assert "compat.heisenbridge[0].media_keys: unknown key (did you mean 'media_key'?)" in found


def test_legacy_media_from_the_environment(tmp_path: Path) -> None:
    """RELAY_COMPAT_LEGACY_MEDIA switches the legacy paths on; a near miss is named."""
    path = write_config(tmp_path / "config.yaml", minimal())
    assert load(path, environ={"RELAY_COMPAT_LEGACY_MEDIA": "true"}).compat.legacy_media
    with pytest.raises(ConfigError, match="did you mean RELAY_COMPAT_LEGACY_MEDIA"):
        load(path, environ={"RELAY_COMPAT_LEGACY_MEDA": "true"})

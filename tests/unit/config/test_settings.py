"""The schema: defaults, and validation messages that name the key and the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.config.errors import ConfigError
from relay.config.loading import validate
from relay.config.values import parse_size
from tests.harness.config_documents import SECRET, minimal


def test_minimal_config_gets_working_defaults(tmp_path: Path) -> None:
    """Only homeserver.*, public.url and secrets are needed; the rest defaults sensibly."""
    config = validate(minimal(), base_dir=tmp_path)
    assert config.database == f"sqlite:{tmp_path / 'relay.db'}"
    assert config.media.cache_dir == tmp_path / "media-cache"
    assert config.media.max_size == 100 * 1024**2
    assert config.media.strip_metadata is True
    assert config.signing.require_seen is True
    assert config.appservice.allowed_inviters == ("example.org",)
    assert config.bot_user_id == "@mediarelay:example.org"
    assert config.public.path_prefix == "/relay"


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"appservice": {"port": "abc"}},
            "appservice.port: expected an integer 1-65535, got 'abc'",
        ),
        (
            {"appservice": {"port": 70000}},
            "appservice.port: expected an integer 1-65535, got 70000",
        ),
        ({"appservice": {"port": True}}, "appservice.port: expected an integer 1-65535, got True"),
        ({"homeserver": {"address": None}}, "homeserver.address: required but missing"),
        ({"homeserver": {"address": "ftp://x"}}, "homeserver.address: expected an http(s) URL"),
        ({"homeserver": {"domain": "bad domain"}}, "homeserver.domain: expected a Matrix server"),
        ({"public": {"url": ""}}, "public.url: required but missing"),
        ({"public": {"url": "https://x/?a=b"}}, "public.url: must not have a query or fragment"),
        ({"appservice": {"as_token": "generate"}}, "appservice.as_token: still 'generate'"),
        ({"appservice": {"hs_token": "short"}}, "appservice.hs_token: must be at least 32"),
        ({"media": {"max_size": "lots"}}, "media.max_size: expected a size such as 100M"),
        ({"media": {"strip_metadata": "yes"}}, "media.strip_metadata: expected true or false"),
        ({"database": "mysql://x"}, "database: expected 'sqlite:<path>' or 'postgresql://…'"),
        ({"signing": {"keys": []}}, "signing.keys: no signing key"),
        ({"signing": {"keys": [{"id": "a b", "secret": SECRET}]}}, "signing.keys[0].id: expected"),
        (
            {"signing": {"keys": [{"id": "a", "secret": SECRET}, {"id": "a", "secret": SECRET}]}},
            "signing.keys: key ids must be unique",
        ),
        ({"bridges": [{"name": "irc"}]}, "bridges[0].token: required but missing"),
        (
            {"bridges": [{"name": "a", "token": SECRET}, {"name": "b", "token": SECRET}]},
            "bridges: every bridge needs its own token",
        ),
        ({"appservice": {"room_namespace": ["("]}}, "appservice.room_namespace: invalid regex"),
        ({"logging": {"level": "LOUD"}}, "logging.level: expected DEBUG, INFO, WARNING or ERROR"),
        ({"homeserver": "http://hs"}, "homeserver: expected a mapping"),
    ],
)
def test_validation_names_key_and_problem(
    tmp_path: Path, sections: dict[str, Any], message: str
) -> None:
    """Each validation error is one line that names the key and what is wrong."""
    with pytest.raises(ConfigError) as e:
        validate(minimal(**sections), base_dir=tmp_path)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        ("512", 512),
        ("512K", 512 * 1024),
        ("100M", 100 * 1024**2),
        ("10G", 10 * 1024**3),
        ("1.5g", int(1.5 * 1024**3)),
        ("2MiB", 2 * 1024**2),
        ("3 MB", 3 * 1024**2),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    """Sizes are byte counts or numbers with binary K/M/G/T suffixes."""
    assert parse_size(value, "k") == expected


@pytest.mark.parametrize("value", [0, -1, "0", "", "10X", "M", True, None, 1.5, [1]])
def test_parse_size_rejects(value: object) -> None:
    """Zero, negative, unit-less garbage and non-numbers are refused with the key's name."""
    with pytest.raises(ConfigError, match=r"^media\.max_size: "):
        parse_size(value, "media.max_size")


@pytest.mark.parametrize(("value", "expected"), [("json", "json"), ("TEXT", "text")])
def test_logging_format(tmp_path: Path, value: str, expected: str) -> None:
    """logging.format is text (the default) or json, in any case."""
    assert validate(minimal(), base_dir=tmp_path).logging.format == "text"
    config = validate(minimal(logging={"format": value}), base_dir=tmp_path)
    assert config.logging.format == expected


def test_logging_format_refuses_others(tmp_path: Path) -> None:
    """Anything else names the key and the choices."""
    with pytest.raises(ConfigError) as e:
        validate(minimal(logging={"format": "xml"}), base_dir=tmp_path)
    assert "logging.format: expected text or json, got 'xml'" in str(e.value)

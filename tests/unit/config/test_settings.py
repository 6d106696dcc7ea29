"""Configuration loading, validation messages, environment overrides and secret generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from relay.config.settings import (
    ConfigError,
    apply_env_overrides,
    fill_generated_secrets,
    load,
    parse_size,
    read_document,
    validate,
    write_document,
)

EXAMPLE = Path(__file__).parents[3] / "relay" / "config.example.yaml"
SECRET = "x" * 40


def minimal(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "homeserver": {"address": "http://hs:8008", "domain": "example.org"},
        "appservice": {"as_token": SECRET, "hs_token": "y" * 40},
        "public": {"url": "https://media.example.org/relay/"},
        "signing": {"keys": [{"id": "k1", "secret": "z" * 40}]},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(doc.get(name), dict):
            doc[name] = {**doc[name], **values}
        else:
            doc[name] = values
    return doc


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


def test_environment_overrides(tmp_path: Path) -> None:
    """RELAY_<SECTION>_<KEY> overrides a key; values are YAML-typed; lists work for bridges."""
    environ = {
        "RELAY_PUBLIC_URL": "https://other.example/",
        "RELAY_APPSERVICE_PORT": "8080",
        "RELAY_DATABASE": "postgresql://u@db/relay",
        "RELAY_BRIDGES": f"[{{name: irc, token: {SECRET}, ttl: 60}}]",
        "RELAY_SIGNING_REQUIRE_SEEN": "false",
        "UNRELATED": "1",
    }
    config = validate(apply_env_overrides(minimal(), environ), base_dir=tmp_path)
    assert config.public.url == "https://other.example/"
    assert config.appservice.port == 8080
    assert config.database == "postgresql://u@db/relay"
    assert [(b.name, b.ttl) for b in config.bridges] == [("irc", 60)]
    assert config.signing.require_seen is False


def test_environment_override_is_validated(tmp_path: Path) -> None:
    """A bad override gets the same one-line error as a bad file value."""
    merged = apply_env_overrides(minimal(), {"RELAY_APPSERVICE_PORT": "abc"})
    with pytest.raises(
        ConfigError, match=r"^appservice.port: expected an integer 1-65535, got 'abc'"
    ):
        validate(merged, base_dir=tmp_path)


def test_example_config_generates_and_keeps_comments(tmp_path: Path) -> None:
    """Filling the example's secrets keeps every comment and produces a valid config."""
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE.read_text())
    doc = read_document(path)
    assert fill_generated_secrets(doc)
    write_document(path, doc)
    text = path.read_text()
    original_comments = [
        line.strip() for line in EXAMPLE.read_text().splitlines() if line.strip().startswith("#")
    ]
    assert original_comments
    assert all(comment in text for comment in original_comments)
    assert "generate" not in [v for line in text.splitlines() for v in line.split()[-1:]]
    config = load(path, environ={})
    assert len(config.appservice.as_token) >= 32
    assert config.appservice.as_token != config.appservice.hs_token
    assert fill_generated_secrets(read_document(path)) is False


def test_signing_key_added_when_missing_tokens_untouched(tmp_path: Path) -> None:
    """With tokens=False only a missing signing key is generated; tokens stay 'generate'."""
    path = tmp_path / "c.yaml"
    YAML().dump({"appservice": {"as_token": "generate"}}, path)
    doc = read_document(path)
    assert fill_generated_secrets(doc, tokens=False)
    assert doc["appservice"]["as_token"] == "generate"
    assert len(doc["signing"]["keys"][0]["secret"]) >= 32


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("homeserver: [\n", "malformed YAML at line"),
        ("", "config file is empty"),
        ("- a\n- b\n", "expected a mapping at the top level"),
        (b"\xff\xfe\x00", "cannot read config file"),
    ],
)
def test_unreadable_documents(tmp_path: Path, content: str | bytes, message: str) -> None:
    """Malformed, empty, non-mapping and undecodable files give one clear line."""
    path = tmp_path / "c.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_document(path)


def test_missing_file(tmp_path: Path) -> None:
    """A missing file names the path."""
    with pytest.raises(ConfigError, match="config file not found"):
        read_document(tmp_path / "nope.yaml")


def test_write_keeps_permissions(tmp_path: Path) -> None:
    """Rewriting the config keeps its mode (secrets stay private) and leaves no temp file."""
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\n")
    path.chmod(0o600)
    write_document(path, read_document(path))
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]

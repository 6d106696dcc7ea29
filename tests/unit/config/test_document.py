"""The config file as a document: reading, filling secrets with comments kept, writing 0600."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from relay.config.document import fill_generated_secrets, read_document, write_document
from relay.config.errors import ConfigError
from relay.config.loading import load
from tests.harness.config_documents import EXAMPLE


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

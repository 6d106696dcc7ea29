"""The registration the relay generates, and the example file that documents it."""

from __future__ import annotations

import re
from pathlib import Path

from ruamel.yaml import YAML

from relay.config.loading import validate
from relay.config.registration import build_registration, write_registration
from relay.config.settings import Config

ROOT = Path(__file__).parents[3]
SECRET = "s" * 40


def config_for(tmp_path: Path, **appservice: object) -> Config:
    return validate(
        {
            "homeserver": {"address": "http://hs:8008", "domain": "example.org"},
            "appservice": {"as_token": "a" * 40, "hs_token": "h" * 40, **appservice},
            "public": {"url": "https://media.example.org/"},
            "signing": {"keys": [{"id": "k1", "secret": SECRET}]},
        },
        base_dir=tmp_path,
    )


def test_registration_fields(tmp_path: Path) -> None:
    """Every field Synapse needs, taken from the config; the bot's namespace is exclusive."""
    config = config_for(tmp_path, room_namespace=["!bridged-.*:example.org"])
    reg = build_registration(config)
    assert reg["id"] == "media-relay"
    assert reg["url"] == "http://localhost:29340"
    assert (reg["as_token"], reg["hs_token"]) == ("a" * 40, "h" * 40)
    assert reg["sender_localpart"] == "mediarelay"
    assert reg["rate_limited"] is False
    users = reg["namespaces"]["users"]
    assert users == [{"exclusive": True, "regex": r"^@mediarelay:example\.org$"}]
    assert re.match(users[0]["regex"], "@mediarelay:example.org")
    assert not re.match(users[0]["regex"], "@mediarelay:example.org.evil")
    assert not re.match(users[0]["regex"], "@mediarelayx:example.org")
    assert reg["namespaces"]["rooms"] == [{"exclusive": False, "regex": "!bridged-.*:example.org"}]


def test_written_file_is_private_yaml(tmp_path: Path) -> None:
    """The written registration parses back to the same mapping and is mode 0600."""
    config = config_for(tmp_path)
    path = tmp_path / "registration.yaml"
    write_registration(config, path)
    assert YAML(typ="safe").load(path.read_text()) == build_registration(config)
    assert path.stat().st_mode & 0o777 == 0o600


def test_example_file_matches_generator(tmp_path: Path) -> None:
    """registration.yaml.example has exactly the generator's keys and values (tokens aside)."""
    example = YAML(typ="safe").load((ROOT / "registration.yaml.example").read_text())
    generated = build_registration(config_for(tmp_path))
    assert example.keys() == generated.keys()
    for key in ("as_token", "hs_token"):
        example.pop(key)
        generated.pop(key)
    assert example == generated

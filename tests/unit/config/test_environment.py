"""RELAY_<SECTION>_<KEY> overrides: typed values, and variables that set nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config.environment import apply_env_overrides
from relay.config.errors import ConfigError
from relay.config.loading import validate
from tests.harness.config_documents import SECRET, minimal


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


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "RELAY_SIGNING_TLL",
            "RELAY_SIGNING_TLL: unknown key signing.tll (did you mean RELAY_SIGNING_TTL?)",
        ),
        (
            "RELAY_PUBLC_URL",
            "RELAY_PUBLC_URL: unknown variable (did you mean RELAY_PUBLIC_URL?)",
        ),
        (
            "RELAY_DATABSE",
            "RELAY_DATABSE: unknown variable (did you mean RELAY_DATABASE?)",
        ),
        ("RELAY_MEDIA_COLOUR", "RELAY_MEDIA_COLOUR: unknown key media.colour"),
    ],
)
def test_unknown_setting_variable_is_named_with_near_miss(name: str, message: str) -> None:
    """A RELAY_ variable that looks like a setting but sets nothing is an error, not ignored."""
    with pytest.raises(ConfigError) as e:
        apply_env_overrides(minimal(), {name: "60"})
    assert e.value.problems == (message,)


def test_tooling_variables_are_not_settings(tmp_path: Path) -> None:
    """The harness's, CI's and benches' RELAY_ variables, and unrelated ones, are left alone."""
    environ = {
        "RELAY_TEST_POSTGRES_URL": "postgresql://x",
        "RELAY_BENCH_POSTGRES_URL": "postgresql://x",
        "RELAY_VENV": "/opt/venv",
        "RELAY_HOST_OF_SOMETHING_ELSE": "x",
        "RELAYED": "1",
    }
    assert apply_env_overrides(minimal(), environ) == apply_env_overrides(minimal(), {})


def test_every_bad_variable_is_reported_at_once() -> None:
    """Several bad variables give one problem each, in a stable order."""
    environ = {"RELAY_SIGNING_TLL": "1", "RELAY_APPSERVICE_PORTT": "1", "RELAY_BRIDGES": "[a"}
    with pytest.raises(ConfigError) as e:
        apply_env_overrides(minimal(), environ)
    assert [p.split(":")[0] for p in e.value.problems] == [
        "RELAY_APPSERVICE_PORTT",
        "RELAY_BRIDGES",
        "RELAY_SIGNING_TLL",
    ]
    assert e.value.problems[1] == "RELAY_BRIDGES: cannot parse the value as YAML"


def test_override_into_an_empty_section(tmp_path: Path) -> None:
    """A section left empty in the file (``media:``) still takes an override."""
    merged = apply_env_overrides(minimal(media=None), {"RELAY_MEDIA_MAX_SIZE": "1M"})
    assert validate(merged, base_dir=tmp_path).media.max_size == 1024**2

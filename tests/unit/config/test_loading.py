"""Loading reports every problem at once, each naming its key; placeholders hide nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError
from ruamel.yaml import YAML

from relay.config.errors import ConfigError
from relay.config.loading import dotted, load, load_filling_secrets, validate
from tests.harness.config_documents import EXAMPLE, SECRET, minimal


def problems(doc: dict[str, object], tmp_path: Path) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as e:
        validate(doc, base_dir=tmp_path)
    return e.value.problems


def test_three_independent_mistakes_are_all_named(tmp_path: Path) -> None:
    """Three mistakes in three sections give three lines, in document order."""
    doc = minimal(
        appservice={"port": "abc"},
        media={"strip_metadata": "yes"},
        logging={"level": "LOUD"},
    )
    assert problems(doc, tmp_path) == (
        "appservice.port: expected an integer 1-65535, got 'abc'",
        "media.strip_metadata: expected true or false, got 'yes'",
        "logging.level: expected DEBUG, INFO, WARNING or ERROR, got 'LOUD'",
    )


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"signing": {"tll": 60}}, "signing.tll: unknown key (did you mean 'ttl'?)"),
        (
            {"media": {"cache_size": "1G"}},
            "media.cache_size: unknown key (did you mean 'cache_max_size'?)",
        ),
        ({"appservice": {"colour": "red"}}, "appservice.colour: unknown key"),
        ({"bridgez": []}, "bridgez: unknown key (did you mean 'bridges'?)"),
        (
            {"bridges": [{"name": "irc", "token": SECRET, "tll": 5}]},
            "bridges[0].tll: unknown key (did you mean 'ttl'?)",
        ),
        (
            {"signing": {"keys": [{"id": "k1", "secret": SECRET, "secrte": "x"}]}},
            "signing.keys[0].secrte: unknown key (did you mean 'secret'?)",
        ),
    ],
)
def test_unknown_key_is_named_with_near_miss(
    tmp_path: Path, sections: dict[str, object], message: str
) -> None:
    """A key the schema does not know is an error naming it, with the closest real key."""
    assert problems(minimal(**sections), tmp_path) == (message,)


def test_placeholder_does_not_hide_broken_bridges(tmp_path: Path) -> None:
    """A 'generate' token never hides a broken bridges list: the mistake is what is shown."""
    doc = minimal(appservice={"as_token": "generate"}, bridges={"name": "irc"})
    assert problems(doc, tmp_path) == ("bridges: expected a list, got {'name': 'irc'}",)


def test_placeholders_alone_are_each_reported(tmp_path: Path) -> None:
    """When placeholders are all that is wrong, each is named with the command that fills it."""
    doc = minimal(
        appservice={"as_token": "generate"},
        signing={"keys": []},
        bridges=[{"name": "irc", "token": "generate"}],
    )
    assert problems(doc, tmp_path) == (
        "appservice.as_token: still 'generate'; run media-relay generate-registration first",
        "signing.keys: no signing key; run media-relay generate-registration to create one",
        "bridges[0].token: still 'generate'; run media-relay generate-registration first",
    )


def test_cross_checks_run_beside_other_problems(tmp_path: Path) -> None:
    """Checks over two keys still run when another section is broken."""
    doc = minimal(
        public={"hostname": "127.0.0.1", "port": 29340},
        media={"max_size": "2G", "cache_max_size": "1G"},
        bridges=[{"name": "a b", "token": SECRET}],
    )
    assert problems(doc, tmp_path) == (
        "public.port: must differ from appservice.port on the same hostname",
        f"media.cache_max_size: must be at least media.max_size ({2 * 1024**3} bytes)",
        "bridges[0].name: expected 1-64 letters, digits, '.', '_' or '-', got 'a b'",
    )


def test_environment_and_file_problems_together(tmp_path: Path) -> None:
    """load() reports a bad variable and a bad file value in one go."""
    path = tmp_path / "c.yaml"
    YAML().dump(minimal(appservice={"port": "abc"}), path)
    with pytest.raises(ConfigError) as e:
        load(path, environ={"RELAY_SIGNING_TLL": "5"})
    assert e.value.problems == (
        "RELAY_SIGNING_TLL: unknown key signing.tll (did you mean RELAY_SIGNING_TTL?)",
        "appservice.port: expected an integer 1-65535, got 'abc'",
    )


def test_secrets_stay_out_of_repr(tmp_path: Path) -> None:
    """Tokens and signing secrets never appear in a Config's repr or str."""
    secrets = ["a" * 40, "b" * 40, "c" * 40, "d" * 40]
    doc = minimal(
        appservice={"as_token": secrets[0], "hs_token": secrets[1]},
        signing={"keys": [{"id": "k1", "secret": secrets[2]}]},
        bridges=[{"name": "irc", "token": secrets[3]}],
    )
    config = validate(doc, base_dir=tmp_path)
    shown = repr(config) + str(config) + repr(config.bridges) + repr(config.signing.keys)
    assert "irc" in shown and "k1" in shown
    assert not any(secret in shown for secret in secrets)
    assert config.appservice.as_token == secrets[0]


def test_config_is_frozen(tmp_path: Path) -> None:
    """Validated once, never changed: assignment is refused."""
    config = validate(minimal(), base_dir=tmp_path)
    with pytest.raises(ValidationError):
        config.signing.ttl = 1


def test_types_the_rest_of_the_relay_relies_on(tmp_path: Path) -> None:
    """Tuples for lists, a Path for the cache, plain str values (not ruamel's subclasses)."""
    path = tmp_path / "c.yaml"
    path.write_text(
        EXAMPLE.read_text().replace(
            "url: https://media.example.org/", 'url: "https://media.example.org/"'
        )
    )
    config, _ = load_filling_secrets(path, environ={}, tokens=True)
    assert type(config.public.url) is str
    assert isinstance(config.bridges, tuple) and isinstance(config.signing.keys, tuple)
    assert isinstance(config.media.cache_dir, Path)
    assert (config.bridges[0].name, config.bridges[0].ttl) == ("example-bridge", 86400)


@pytest.mark.parametrize(
    ("loc", "key"),
    [
        (("signing", "ttl"), "signing.ttl"),
        (("bridges", 0, "token"), "bridges[0].token"),
        (("database",), "database"),
    ],
)
def test_dotted(loc: tuple[str | int, ...], key: str) -> None:
    """Error locations read as the operator writes keys."""
    assert dotted(loc) == key


def test_filling_writes_private_file_and_says_when_it_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Filled secrets are written 0600; a file others could read is tightened, with one log line."""
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE.read_text())
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="relay.config"):
        _, written = load_filling_secrets(path, environ={}, tokens=True)
    assert written
    assert path.stat().st_mode & 0o777 == 0o600
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} holds secrets: its mode was 644, it is now 600"
    ]
    caplog.clear()
    assert load_filling_secrets(path, environ={}, tokens=True)[1] is False
    assert caplog.records == []


def test_filling_never_writes_an_invalid_config(tmp_path: Path) -> None:
    """With secrets to fill but a broken bridges list, the file is left byte for byte."""
    path = tmp_path / "config.yaml"
    text = EXAMPLE.read_text().replace("bridges:\n", "bridges: {}\nunused:\n")
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_filling_secrets(path, environ={}, tokens=True)
    assert "unused: unknown key" in e.value.problems
    assert path.read_text() == text

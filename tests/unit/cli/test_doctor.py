"""The doctor's report and verdicts, without a network: what each answer means to the operator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.cli.doctor import Finding, exit_code, probe_verdict, render
from relay.config.loading import load
from relay.config.settings import Config
from relay.core.exit_codes import EXIT_CONFIG, EXIT_DATABASE, EXIT_ERROR, EXIT_OK


@pytest.fixture
def config(tmp_path: Path) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(
        "homeserver: {address: 'http://synapse:8008', domain: example.org}\n"
        "public: {url: 'https://media.example.org/relay/', port: 8010}\n"
        "appservice: {as_token: " + "a" * 40 + ", hs_token: " + "h" * 40 + "}\n"
        "signing: {keys: [{id: k1, secret: " + "s" * 40 + "}]}\n"
    )
    return load(path, environ={})


def test_render_all_passed() -> None:
    """Every check on one line, and a summary that says all passed."""
    out = render([Finding("config", True, "valid"), Finding("database", True, "answers")])
    assert out.splitlines() == [
        "ok    config: valid",
        "ok    database: answers",
        "all 2 checks passed",
    ]


def test_render_failure_shows_fix_under_it() -> None:
    """A failure prints FAIL, then its fix indented on the next line."""
    out = render([Finding("homeserver", False, "unreachable", "check homeserver.address")])
    assert out.splitlines() == [
        "FAIL  homeserver: unreachable",
        "      fix: check homeserver.address",
        "1 of 1 checks failed",
    ]


@pytest.mark.parametrize(
    ("oks", "codes", "expected"),
    [
        ([True, True], [EXIT_CONFIG, EXIT_DATABASE], EXIT_OK),
        ([True, False], [EXIT_CONFIG, EXIT_DATABASE], EXIT_DATABASE),
        ([False, False], [EXIT_CONFIG, EXIT_DATABASE], EXIT_CONFIG),
        ([], [], EXIT_OK),
    ],
)
def test_exit_code_is_the_first_failures(oks: list[bool], codes: list[int], expected: int) -> None:
    """0 only when every check passed; otherwise the exit code of the first failure."""
    findings = [Finding("x", ok, "", exit_code=c) for ok, c in zip(oks, codes, strict=True)]
    assert exit_code(findings) == expected


@pytest.mark.parametrize(
    ("status", "body", "ok", "words"),
    [
        (404, {"errcode": "M_NOT_FOUND"}, True, "reaches this relay (404 M_NOT_FOUND)"),
        (410, {"errcode": "M_NOT_FOUND"}, True, "reaches this relay"),
        (403, {"errcode": "M_FORBIDDEN"}, False, "signing key"),
        (404, {"errcode": "M_UNRECOGNIZED"}, False, "did not reach the relay's link handler"),
        (404, None, False, "something other than the relay answered 404"),
        (502, None, False, "something other than the relay answered 502"),
    ],
)
def test_probe_verdict(
    config: Config, status: int, body: dict[str, Any] | None, ok: bool, words: str
) -> None:
    """Only a Matrix error past the signature check proves public.url reaches this relay."""
    found = probe_verdict(config, status, body, "")
    assert found.ok is ok
    assert words in found.detail
    assert found.ok or found.fix
    assert found.exit_code == EXIT_ERROR


def test_probe_verdict_names_the_public_listener(config: Config) -> None:
    """A proxy that answers itself is told where the relay's public listener is."""
    found = probe_verdict(config, 404, None, "")
    assert "0.0.0.0:8010" in found.fix
    assert "https://media.example.org/relay/" in found.fix

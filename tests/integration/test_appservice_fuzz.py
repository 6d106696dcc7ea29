"""Schemathesis over the Application Service API, from the Matrix spec's own OpenAPI files.

Every operation of ``shared/spec/data/api/application-service`` gets generated
requests (valid and invalid bodies, odd path parameters) against a running relay on
SQLite: none may answer 5xx, and every error is Matrix JSON with an errcode.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from relay.app import Relay
from tests.harness.relay import MakeConfig
from tests.harness.threaded import ThreadedRelay

pytestmark = pytest.mark.synapse

# CI clones the repository into a folder with shared/ beside it (tests/integration → repo → ..).
SPEC = (
    Path(__file__).resolve().parents[3] / "shared" / "spec" / "data" / "api" / "application-service"
)
if not SPEC.is_dir():
    if os.environ.get("CI"):
        raise RuntimeError(f"the Matrix spec is required in CI, expected at {SPEC}")
    pytest.skip(f"the Matrix spec's OpenAPI files are not at {SPEC}", allow_module_level=True)


@pytest.fixture
def fuzzed(make_config: MakeConfig) -> Iterator[ThreadedRelay]:
    config = make_config(appservice={"room_namespace": [r"!.*"]})
    with ThreadedRelay(Relay(config)) as running:
        yield running


def check_operation(case: schemathesis.Case, fuzzed: ThreadedRelay) -> None:
    relay = fuzzed.relay
    headers = {"Authorization": f"Bearer {relay.config.appservice.hs_token}"}
    response = case.call(base_url=relay.internal_url + "/_matrix/app/v1", headers=headers)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
    if response.status_code >= 400:
        assert response.json()["errcode"].startswith("M_"), response.text


def _fuzz_test(path: Path) -> Callable[..., Any]:
    schema = schemathesis.openapi.from_path(str(path))

    def test(case: schemathesis.Case, fuzzed: ThreadedRelay) -> None:
        check_operation(case, fuzzed)

    test = settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )(test)
    test.__doc__ = f"Generated requests for {path.name}: no 5xx, errors are Matrix JSON."
    return schema.parametrize()(test)


for _path in sorted(SPEC.glob("*.yaml")):
    globals()[f"test_{_path.stem}_never_answers_5xx"] = _fuzz_test(_path)

"""Capability detection from /versions and the media config (pure parts)."""

from __future__ import annotations

from typing import Any

import pytest

from relay.upstream.capabilities import (
    Capabilities,
    parse_max_upload_size,
    parse_spec_version,
    supports_authenticated_media,
)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"versions": ["v1.11"]}, True),
        ({"versions": ["v1.12"]}, True),
        ({"versions": ["v2.0"]}, True),
        ({"versions": ["r0.6.1", "v1.1", "v1.10", "v1.11"]}, True),
        # Numeric, not lexical: "v1.9" > "v1.11" as strings.
        ({"versions": ["v1.9"]}, False),
        ({"versions": ["v1.10"]}, False),
        ({"versions": ["r0.6.1"]}, False),
        ({"versions": ["r1.11"]}, False),
        ({"versions": ["v1.11.0"]}, False),
        ({"versions": ["V1.11"]}, False),
        ({"versions": ["v1"]}, False),
        ({"versions": [11, None, {"v": "v1.11"}]}, False),
        ({"versions": "v1.11"}, False),
        ({"versions": []}, False),
        ({}, False),
        ({"versions": ["v1.5"], "unstable_features": {"org.matrix.msc3916.stable": True}}, True),
        ({"versions": ["v1.5"], "unstable_features": {"org.matrix.msc3916.stable": False}}, False),
        ({"versions": ["v1.5"], "unstable_features": {"org.matrix.msc3916.stable": "true"}}, False),
        ({"versions": ["v1.5"], "unstable_features": {"org.matrix.msc3916": True}}, False),
        ({"versions": ["v1.5"], "unstable_features": ["org.matrix.msc3916.stable"]}, False),
    ],
)
def test_supports_authenticated_media(body: dict[str, Any], expected: bool) -> None:
    """Authenticated media means a vX.Y ≥ v1.11 or the stable MSC3916 flag; else legacy."""
    assert supports_authenticated_media(body) is expected


@pytest.mark.parametrize("body", [None, [], "v1.11", 3, ["v1.11"]])
def test_supports_authenticated_media_malformed_body(body: Any) -> None:
    """A body that is not a JSON object never claims support."""
    assert supports_authenticated_media(body) is False


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("v1.11", (1, 11)),
        ("v2.0", (2, 0)),
        ("v10.100", (10, 100)),
        ("r0.6.1", None),
        ("v1.", None),
        ("v.1", None),
        ("v1.1 ", None),
        (" v1.1", None),
        (None, None),
        (1.11, None),
    ],
)
def test_parse_spec_version(version: object, expected: tuple[int, int] | None) -> None:
    """Only the strict vX.Y grammar parses, into integers."""
    assert parse_spec_version(version) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"m.upload.size": 50_000_000}, 50_000_000),
        ({"m.upload.size": 0}, 0),
        ({}, None),
        ({"m.upload.size": -1}, None),
        ({"m.upload.size": "50"}, None),
        ({"m.upload.size": True}, None),
        ({"m.upload.size": 1.5}, None),
        (None, None),
        ([], None),
    ],
)
def test_parse_max_upload_size(body: object, expected: int | None) -> None:
    """m.upload.size is read only when it is a non-negative integer."""
    assert parse_max_upload_size(body) == expected


def test_identity_marks() -> None:
    """401/403 marks the identity broken with a reason; a success restores it."""
    caps = Capabilities("http://hs.invalid", "token")
    assert caps.identity_ok is True
    caps.mark_identity_broken("media download answered 401 M_UNKNOWN_TOKEN")
    assert caps.identity_ok is False
    assert caps.last_error == "media download answered 401 M_UNKNOWN_TOKEN"
    caps.mark_identity_ok()
    assert caps.identity_ok is True
    assert caps.last_error is None


def test_mark_unsupported() -> None:
    """An M_UNRECOGNIZED answer switches to the legacy paths."""
    caps = Capabilities("http://hs.invalid", "token")
    assert caps.authenticated_media is True
    caps.mark_unsupported()
    assert caps.authenticated_media is False

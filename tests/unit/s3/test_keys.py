"""Object names under the prefix: the allow-list, and listed keys mapped back."""

from __future__ import annotations

import pytest

from relay.s3.keys import MAX_KEY_BYTES, check_name, key_prefix, object_key, relative_name

PREFIX = "relay/"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/abs",
        "../other-app/secret",
        "a/../../b",
        "a/./b",
        "..",
        "a//b",
        "a/",
        "a\\b",
        "a b",
        "caf\u00e9",
        "a\nb",
        "a?b",
        "a%2f..",
        "x" * 129,
    ],
)
def test_unsafe_names_are_refused(name: str) -> None:
    """Anything that could address a key outside the prefix (or a surprising one) is refused."""
    with pytest.raises(ValueError, match="unsafe object name"):
        object_key(PREFIX, name)
    with pytest.raises(ValueError):
        key_prefix(PREFIX, name)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("ab12", "relay/ab12"),
        ("ab12/cd34", "relay/ab12/cd34"),
        ("a.b_c-d", "relay/a.b_c-d"),
    ],
)
def test_safe_names_join_the_prefix(name: str, key: str) -> None:
    """A safe name becomes prefix + name, and maps back from a listing."""
    check_name(name)
    assert object_key(PREFIX, name) == key
    assert relative_name(PREFIX, key) == name


def test_folder_prefix_ends_with_a_slash() -> None:
    """A folder's listing prefix cannot match a sibling whose name merely starts the same."""
    assert key_prefix(PREFIX, "ab") == "relay/ab/"


def test_keys_outside_the_prefix_are_not_ours() -> None:
    """A listed key of another prefix has no name here."""
    assert relative_name(PREFIX, "other/ab") is None
    assert relative_name(PREFIX, "relayx/ab") is None


def test_overlong_keys_are_refused() -> None:
    """S3 refuses keys over 1024 bytes; the relay says so before asking."""
    name = "/".join(["x" * 128] * 8)
    with pytest.raises(ValueError, match="longer than"):
        object_key("p" * (MAX_KEY_BYTES - len(name) + 1), name)

"""The one JSON body reader: object required, bounded nesting, Matrix errcodes; salvage."""

from __future__ import annotations

import json

import pytest

from relay.core.errors import MatrixError
from relay.web.json_body import MAX_DEPTH, nesting_depth, parse_json_object, salvage_items


def nested(depth: int) -> str:
    """A JSON value ``depth`` levels deep (arrays)."""
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("raw", "errcode"),
    [
        (b"{not json", "M_NOT_JSON"),
        (b"\xff\xfe", "M_NOT_JSON"),
        (b"", "M_NOT_JSON"),
        (b'{"a": NaN}', "M_NOT_JSON"),
        (b'{"a": ' + b"1" * 5000 + b"}", "M_NOT_JSON"),
        (b"[]", "M_BAD_JSON"),
        (b'"text"', "M_BAD_JSON"),
        (('{"a": ' + nested(MAX_DEPTH) + "}").encode(), "M_BAD_JSON"),
        (('{"a": ' + nested(990) + "}").encode(), "M_BAD_JSON"),
        (('{"a": ' + nested(100_000) + "}").encode(), "M_BAD_JSON"),
    ],
)
def test_refused_bodies(raw: bytes, errcode: str) -> None:
    """Not JSON → 400 M_NOT_JSON; not an object or nested too deep → 400 M_BAD_JSON."""
    with pytest.raises(MatrixError) as e:
        parse_json_object(raw)
    assert (e.value.status, e.value.errcode) == (400, errcode)


def test_accepted_bodies() -> None:
    """An object within the depth bound is returned; an optional empty body reads as {}."""
    deepest = ('{"a": ' + nested(MAX_DEPTH - 1) + "}").encode()
    assert nesting_depth(parse_json_object(deepest)) == MAX_DEPTH
    assert parse_json_object(b"  ", optional=True) == {}
    assert parse_json_object(b'{"transaction_id": "t"}', optional=True) == {"transaction_id": "t"}


def test_nesting_depth_without_recursion() -> None:
    """Depth is counted iteratively, so even 100 000 levels do not raise RecursionError."""
    value: list[object] = []
    for _ in range(100_000):
        value = [value]
    assert nesting_depth(value) == 100_001
    assert nesting_depth({"a": [1, {"b": 2}], "c": 3}) == 3
    assert nesting_depth("x") == 0


def test_salvage_keeps_the_events_that_parse() -> None:
    """A too-deep event, a too-long integer and a broken item are dropped; the rest kept."""
    good = [{"event_id": "$a", "content": {"body": 'x,]}"\\"'}}, {"event_id": "$b"}, 7]
    pieces = [
        json.dumps(good[0]),
        '{"content": ' + nested(990) + "}",
        json.dumps(good[1]),
        '{"n": ' + "1" * 5000 + "}",
        "7",
        '{"broken": }',
    ]
    raw = ('{"ephemeral": [[1, 2]], "events" : [' + ", ".join(pieces) + '], "x": {}}').encode()
    assert salvage_items(raw, "events") == (good, 3)


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"\xff", b"[1, 2]", b'{"other": []}', b'{"events": [1, 2}', b'{"events": {}}'],
)
def test_salvage_gives_up_on_what_is_no_transaction(raw: bytes) -> None:
    """Without a top-level object holding the list there is nothing to salvage."""
    assert salvage_items(raw, "events") is None

"""Log formats: one JSON object a line, an access line's fields as keys of their own."""

from __future__ import annotations

import json
import logging

from relay.support.logs import JsonFormatter


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("relay.access", logging.INFO, __file__, 1, "GET %s", ("x",), None)
    rec.__dict__.update(extra)
    return rec


def test_json_line_carries_the_access_fields() -> None:
    """The message is formatted; access fields become top-level keys."""
    line = json.loads(JsonFormatter().format(record(access={"status": 200, "kind": "native"})))
    assert (line["message"], line["level"], line["logger"]) == ("GET x", "INFO", "relay.access")
    assert (line["status"], line["kind"]) == (200, "native")


def test_json_line_is_one_line_with_a_traceback() -> None:
    """A traceback stays inside the one JSON line, as a string."""
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        rec = logging.LogRecord("relay", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = JsonFormatter().format(rec)
    assert "\n" not in out
    assert "ValueError" in json.loads(out)["exception"]

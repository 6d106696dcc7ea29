"""Config documents the config unit tests start from: the example, and a minimal valid one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).parents[2] / "relay" / "config.example.yaml"
SECRET = "x" * 40


def minimal(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "homeserver": {"address": "http://hs:8008", "domain": "example.org"},
        "appservice": {"as_token": SECRET, "hs_token": "y" * 40},
        "public": {"url": "https://media.example.org/relay/"},
        "signing": {"keys": [{"id": "k1", "secret": "z" * 40}]},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(doc.get(name), dict):
            doc[name] = {**doc[name], **values}
        else:
            doc[name] = values
    return doc

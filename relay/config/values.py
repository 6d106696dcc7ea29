"""Config values: each check turns one YAML value into a typed one, or says what is wrong.

Every check is a pydantic validator of ours (plain, so pydantic never coerces
``port: "80"`` into 80), and every message is the operator's one line without the
key; :mod:`relay.config.loading` puts the key in front.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

from pydantic import Field, PlainValidator, ValidationInfo
from pydantic_core import PydanticCustomError

from relay.config.errors import ConfigError
from relay.core.hosts import parse_host_entry
from relay.support.logs import FORMATS

GENERATE = "generate"
MIN_SECRET_LENGTH = 32
ERROR_TYPE = "relay"  # the pydantic error type of every message written here
# ... and of the problems generate-registration solves (a "generate" placeholder, no key)
PENDING_TYPE = "relay_pending"

_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_YEAR = 365 * 86400


def fail(message: str, *, key: str | None = None, pending: bool = False) -> NoReturn:
    """Report a problem from a validator; ``key`` names it when the location would not.

    ``pending``: a step not taken yet rather than a mistake (see :mod:`loading`).
    """
    kind = PENDING_TYPE if pending else ERROR_TYPE
    raise PydanticCustomError(kind, message, {"key": key} if key else None)


def string(value: object, *, required: bool = False) -> str:
    if required and (value is None or value == ""):
        fail("required but missing")
    if not isinstance(value, str):
        fail(f"expected a string, got {value!r}")
    return str(value)  # a plain str, not ruamel's quoted-scalar subclass


def text(ok: Callable[[str], object], expected: str, *, required: bool = False) -> Any:
    """A string that passes ``ok``; otherwise "expected <expected>, got <value>"."""

    def check(value: object) -> str:
        given = string(value, required=required)
        if not ok(given):
            fail(f"expected {expected}, got {given!r}")
        return given

    return PlainValidator(check)


def integer(low: int, high: int) -> Any:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            fail(f"expected an integer {low}-{high}, got {value!r}")
        return int(value)

    return PlainValidator(check)


def number(low: float, high: float) -> Any:
    def check(value: object) -> float:
        problem = f"expected a number {low:g}-{high:g}, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail(problem)
        if not low <= value <= high:
            fail(problem)
        return float(value)

    return PlainValidator(check)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        fail(f"expected true or false, got {value!r}")
    return value


def _size(value: object) -> int:
    """A byte count: an integer, or a string such as ``100M``, ``10G``, ``512K`` (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            fail(f"expected a positive size, got {value}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m and (size := int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])) > 0:
            return size
    fail(f"expected a size such as 100M or 10G, got {value!r}")


def parse_size(value: object, key: str) -> int:
    """:func:`_size` for callers outside validation: raises ConfigError naming ``key``."""
    try:
        return _size(value)
    except PydanticCustomError as e:
        raise ConfigError(f"{key}: {e.message()}") from None


def _secret(value: object) -> str:
    given = string(value, required=True)
    if given == GENERATE:
        fail(f"still '{GENERATE}'; run media-relay generate-registration first", pending=True)
    if len(given) < MIN_SECRET_LENGTH:
        fail(f"must be at least {MIN_SECRET_LENGTH} characters")
    return given


def http_url(value: object, *, keep_slash: bool = False) -> str:
    given = string(value, required=True)
    parts = urlsplit(given)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        fail(f"expected an http(s) URL, got {given!r}")
    if parts.query or parts.fragment:
        fail(f"must not have a query or fragment, got {given!r}")
    return given if keep_slash else given.rstrip("/")


def strings(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        fail(f"expected a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def host_entries(value: object) -> tuple[str, ...]:
    """Host names (lowercased), IP addresses or networks, as :mod:`relay.core.hosts` reads them."""
    entries = strings(value)
    for entry in entries:
        try:
            parse_host_entry(entry)
        except ValueError as e:
            fail(str(e))
    return tuple(entry.strip().lower() for entry in entries)


def regexes(value: object) -> tuple[str, ...]:
    patterns = strings(value)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            fail(f"invalid regex {pattern!r} ({e})")
    return patterns


def log_level(value: object) -> str:
    level = string(value).upper()
    if level not in _LOG_LEVELS:
        fail(f"expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return level


def log_format(value: object) -> str:
    text = string(value).lower()
    if text not in FORMATS:
        fail(f"expected text or json, got {text!r}")
    return text


def bridge_list(value: object) -> object:
    """Before validator: a YAML list (pydantic alone would also take a string or a set)."""
    if value is None:
        return []
    if not isinstance(value, list):
        fail(f"expected a list, got {value!r}")
    return value


def signing_key_list(value: object) -> object:
    if not isinstance(value, list) or not value:
        fail("no signing key; run media-relay generate-registration to create one", pending=True)
    return value


def base_dir(info: ValidationInfo) -> Path:
    """Relative paths are relative to the directory :func:`loading.validate` was given."""
    context = info.context
    if not isinstance(context, Mapping) or not isinstance(context.get("base_dir"), Path):
        raise TypeError("validate the config through relay.config.loading.validate")
    directory: Path = context["base_dir"]
    return directory


Port = Annotated[int, integer(1, 65535)]
Seconds = Annotated[int, integer(1, _YEAR)]
Size = Annotated[int, PlainValidator(_size)]
Flag = Annotated[bool, PlainValidator(_boolean)]
Text = Annotated[str, PlainValidator(string)]
Secret = Annotated[str, PlainValidator(_secret), Field(repr=False)]

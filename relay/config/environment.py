"""Environment overrides: ``RELAY_<SECTION>_<KEY>`` and ``RELAY_<TOP-LEVEL KEY>``.

Which variables are config: a name whose first word after ``RELAY_`` is a section
(``RELAY_PUBLIC_URL``, ``RELAY_SIGNING_TTL``) or a top-level key (``RELAY_DATABASE``,
``RELAY_BRIDGES``). Such a variable must name a real key, or it is an error that
suggests the near miss (``RELAY_SIGNING_TLL``). Any other ``RELAY_*`` name is also an
error when it is a near miss of a real one (``RELAY_PUBLC_URL``); the rest is left
alone, since other tools share the prefix: ``RELAY_TEST_*`` (the test harness and
CI), ``RELAY_BENCH_*`` (the benches) and ``RELAY_VENV`` are reserved for them.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from relay.config.errors import ConfigError
from relay.config.settings import keys_at, section_names

PREFIX = "RELAY_"
RESERVED = ("RELAY_TEST_", "RELAY_BENCH_", "RELAY_VENV")


def setting_variables() -> dict[str, tuple[str, ...]]:
    """Every variable that overrides a setting, mapped to the key path it sets."""
    sections = section_names()
    names: dict[str, tuple[str, ...]] = {}
    for top in keys_at(()):
        if top in sections:
            for key in keys_at((top,)):
                names[f"{PREFIX}{top}_{key}".upper()] = (top, key)
        else:
            names[f"{PREFIX}{top}".upper()] = (top,)
    return names


def merge_environment(
    doc: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """A plain copy of ``doc`` with the overrides applied, and every problem found.

    Values are parsed as YAML scalars/flow collections, so ``RELAY_APPSERVICE_PORT=8080``
    is an integer and ``RELAY_BRIDGES='[{name: irc, token: x}]'`` a list.
    """
    merged: dict[str, Any] = {str(k): _plain(v) for k, v in doc.items()}
    known = setting_variables()
    problems: list[str] = []
    yaml = YAML(typ="safe", pure=True)
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name.startswith(RESERVED):
            continue
        path = known.get(name.upper())
        if path is None:
            if problem := _unknown(name, known):
                problems.append(problem)
            continue
        raw = environ[name]
        try:
            value = yaml.load(raw) if raw.strip() else ""
        except YAMLError:
            problems.append(f"{name}: cannot parse the value as YAML")
            continue
        if len(path) == 1:
            merged[path[0]] = value
            continue
        section, key = path
        if merged.get(section) is None:
            merged[section] = {}
        if not isinstance(merged[section], dict):
            problems.append(f"{name}: {section} is not a mapping in the config file")
            continue
        merged[section][key] = value
    return merged, problems


def apply_env_overrides(doc: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """:func:`merge_environment`, raising ConfigError if a variable is wrong."""
    merged, problems = merge_environment(doc, environ)
    if problems:
        raise ConfigError(*problems)
    return merged


def _unknown(name: str, known: Mapping[str, tuple[str, ...]]) -> str | None:
    """The problem with a ``RELAY_*`` name that sets nothing, or None if it is not ours."""
    rest = name[len(PREFIX) :].lower()
    section = next((s for s in section_names() if rest.startswith(f"{s}_")), None)
    if section is not None:
        key = rest[len(section) + 1 :]
        near = difflib.get_close_matches(key, keys_at((section,)), n=1)
        hint = f" (did you mean {PREFIX}{section.upper()}_{near[0].upper()}?)" if near else ""
        return f"{name}: unknown key {section}.{key}{hint}"
    # Not under a section: ours only if it is a near miss of a real name.
    near = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.8)
    return f"{name}: unknown variable (did you mean {near[0]}?)" if near else None


def _plain(value: Any) -> Any:
    """ruamel's comment-carrying containers as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value

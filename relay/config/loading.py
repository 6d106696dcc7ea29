"""Loading the config: file, environment and schema in, a frozen Config or every problem out.

Every problem is collected before anything is reported: the environment's and the
schema's together, one line each, each naming its key, in document order.

A ``generate`` placeholder (or a missing signing key) is not a mistake but a step
not taken yet: ``generate-registration`` fills it. So it never hides a mistake: when
there are mistakes, only they are reported (a fresh copy of the example with one
typo shows that typo, not four placeholders besides); when the placeholders are all
that is left, each is reported with "run media-relay generate-registration".
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from relay.config.document import fill_generated_secrets, read_document, write_document
from relay.config.environment import merge_environment
from relay.config.errors import ConfigError
from relay.config.settings import Config, keys_at
from relay.config.values import ERROR_TYPE, PENDING_TYPE


def validate(doc: Mapping[str, Any], base_dir: Path) -> Config:
    """Build a Config from a mapping (overrides already applied), or raise ConfigError.

    Relative paths (the SQLite file, the cache directory) are taken relative to
    ``base_dir``.
    """
    return _validated(doc, base_dir, [])


def load(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, apply environment overrides and validate. Never writes the file."""
    return _loaded(path, environ, fill=False, tokens=False)[0]


def load_filling_secrets(
    path: Path, environ: Mapping[str, str] | None = None, *, tokens: bool
) -> tuple[Config, bool]:
    """:func:`load`, filling ``generate`` secrets (only signing keys unless ``tokens``).

    The file is written back only when something was filled *and* the filled config
    validates, so a bad config is never overwritten. Returns whether it was written.
    """
    return _loaded(path, environ, fill=True, tokens=tokens)


def _loaded(
    path: Path, environ: Mapping[str, str] | None, *, fill: bool, tokens: bool
) -> tuple[Config, bool]:
    doc = read_document(path)
    changed = fill and fill_generated_secrets(doc, tokens=tokens)
    merged, problems = merge_environment(doc, os.environ if environ is None else environ)
    config = _validated(merged, Path.cwd(), problems)
    if changed:
        write_document(path, doc)
    return config, changed


def _validated(doc: Mapping[str, Any], base_dir: Path, problems: list[str]) -> Config:
    pending: list[str] = []
    try:
        config = Config.model_validate(doc, context={"base_dir": base_dir})
    except ValidationError as e:
        for error in e.errors():
            (pending if error["type"] == PENDING_TYPE else problems).append(describe(error))
        raise ConfigError(*(problems or pending)) from None
    if problems:
        raise ConfigError(*problems)
    return config


def describe(error: ErrorDetails) -> str:
    """One pydantic error as the operator's line: ``signing.tll: unknown key (did you …)``."""
    loc = error["loc"]
    ctx = error.get("ctx") or {}
    key = ctx.get("key") or dotted(loc)
    if error["type"] in (ERROR_TYPE, PENDING_TYPE):
        return f"{key}: {error['msg']}"
    if error["type"] == "missing":
        return f"{key}: required but missing"
    if error["type"] == "extra_forbidden":
        near = difflib.get_close_matches(str(loc[-1]), keys_at(loc[:-1]), n=1)
        return f"{key}: unknown key" + (f" (did you mean {near[0]!r}?)" if near else "")
    return f"{key}: {error['msg']}"  # not expected: every check above words its own


def dotted(loc: Sequence[str | int]) -> str:
    """``("bridges", 0, "token")`` as ``bridges[0].token``."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else part
    return key

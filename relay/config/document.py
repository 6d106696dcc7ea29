"""The config file as a YAML document: read it, fill ``generate`` secrets, write it back.

ruamel.yaml's round-trip mode keeps the operator's comments, key order and quoting,
so filling a secret changes that one value and nothing else in the file. The file
holds secrets, so it is written 0600 through the package's one atomic write.
"""

from __future__ import annotations

import io
import logging
import secrets
from collections.abc import MutableMapping
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from relay.config.errors import ConfigError
from relay.config.values import GENERATE
from relay.support.atomic import write_atomic

log = logging.getLogger(__name__)

PRIVATE = 0o600


def _yaml() -> YAML:
    yaml = YAML()  # round-trip mode: keeps comments and key order
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.preserve_quotes = True
    return yaml


def read_document(path: Path) -> CommentedMap:
    """Read the YAML file as a comment-preserving mapping, or raise ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    try:
        doc = _yaml().load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if doc is None:
        raise ConfigError(f"{path}: config file is empty")
    if not isinstance(doc, CommentedMap):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return doc


def write_document(path: Path, doc: CommentedMap) -> None:
    """Replace the file atomically with ``doc``, mode 0600 (it holds secrets).

    A file that others could read is tightened, and the operator is told once.
    """
    try:
        old_mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        old_mode = PRIVATE
    text = io.StringIO()
    _yaml().dump(doc, text)
    write_atomic(path, text.getvalue().encode("utf-8"), mode=PRIVATE)
    if old_mode & ~PRIVATE:
        log.warning("%s holds secrets: its mode was %o, it is now 600", path, old_mode)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def fill_generated_secrets(doc: CommentedMap, *, tokens: bool = True) -> bool:
    """Replace every ``generate`` secret (and a missing signing key) in place.

    With ``tokens=False`` only signing keys are filled: the appservice tokens must
    match the registration the homeserver already has. Returns whether anything
    changed, so callers write the file only when needed. Parts of the document that
    have the wrong shape are left for validation to report.
    """
    changed = False
    appservice = doc.get("appservice")
    if tokens and isinstance(appservice, MutableMapping):
        for key in ("as_token", "hs_token"):
            if appservice.get(key, GENERATE) == GENERATE:
                appservice[key] = new_secret()
                changed = True
    signing = doc.get("signing")
    if signing is None:
        signing = doc["signing"] = CommentedMap()
    if isinstance(signing, MutableMapping):
        keys = signing.get("keys")
        if not keys:
            # A config without keys gets one, so links survive restarts.
            signing["keys"] = keys = CommentedSeq()
            keys.append(CommentedMap(id="k1", secret=GENERATE))
            changed = True
        if isinstance(keys, list):
            for key in keys:
                if isinstance(key, MutableMapping) and key.get("secret") == GENERATE:
                    key["secret"] = new_secret()
                    changed = True
    bridges = doc.get("bridges")
    if tokens and isinstance(bridges, list):
        for bridge in bridges:
            if isinstance(bridge, MutableMapping) and bridge.get("token") == GENERATE:
                bridge["token"] = new_secret()
                changed = True
    return changed

"""Configuration: YAML in, frozen dataclasses out, with one-line errors naming the key.

The file is read with ruamel.yaml's round-trip loader so that, when the relay
fills ``generate`` secrets, the operator's comments and ordering survive. Values
are validated once here; the rest of the relay only sees typed, checked values.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from relay.core.mxc import is_valid_server_name

GENERATE = "generate"
ENV_PREFIX = "RELAY_"
SECTIONS = ("homeserver", "appservice", "public", "media", "thumbnails", "signing", "logging")
TOP_LEVEL_KEYS = ("database", "bridges")

_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_LOCALPART = re.compile(r"[a-z0-9._=/+-]+")
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_BRIDGE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_SECRET_LENGTH = 32

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, worded for the operator in one line."""


@dataclass(frozen=True, slots=True)
class HomeserverConfig:
    address: str
    domain: str


@dataclass(frozen=True, slots=True)
class AppserviceConfig:
    id: str
    bot_localpart: str
    as_token: str
    hs_token: str
    hostname: str
    port: int
    address: str
    room_namespace: tuple[str, ...]
    allowed_inviters: tuple[str, ...]
    max_transaction_size: int

    def bot_user_id(self, domain: str) -> str:
        return f"@{self.bot_localpart}:{domain}"


@dataclass(frozen=True, slots=True)
class PublicConfig:
    url: str
    hostname: str
    port: int

    @property
    def path_prefix(self) -> str:
        """The path part of ``public.url`` without a trailing slash ("" for none)."""
        return urlsplit(self.url).path.rstrip("/")


@dataclass(frozen=True, slots=True)
class MediaConfig:
    cache_dir: Path
    max_size: int
    cache_max_size: int
    strip_metadata: bool
    not_found_ttl: float
    connect_timeout: float
    read_timeout: float
    download_timeout: float


@dataclass(frozen=True, slots=True)
class ThumbnailConfig:
    max_side: int
    max_pixels: int


@dataclass(frozen=True, slots=True)
class SigningKeyConfig:
    id: str
    secret: str

    def __repr__(self) -> str:
        return f"SigningKeyConfig(id={self.id!r}, secret=<hidden>)"


@dataclass(frozen=True, slots=True)
class SigningConfig:
    ttl: int
    require_seen: bool
    keys: tuple[SigningKeyConfig, ...]


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    name: str
    token: str
    ttl: int

    def __repr__(self) -> str:
        return f"BridgeConfig(name={self.name!r}, token=<hidden>, ttl={self.ttl})"


@dataclass(frozen=True, slots=True)
class Config:
    homeserver: HomeserverConfig
    appservice: AppserviceConfig
    public: PublicConfig
    database: str
    media: MediaConfig
    thumbnails: ThumbnailConfig
    signing: SigningConfig
    bridges: tuple[BridgeConfig, ...]
    log_level: str

    @property
    def bot_user_id(self) -> str:
        return self.appservice.bot_user_id(self.homeserver.domain)


# ---------------------------------------------------------------- reading and writing


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
    """Write atomically (temporary file, then rename), keeping the file's permissions."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            _yaml().dump(doc, f)
        try:
            os.chmod(tmp, path.stat().st_mode & 0o777)
        except FileNotFoundError:
            os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def fill_generated_secrets(doc: CommentedMap, *, tokens: bool = True) -> bool:
    """Replace every ``generate`` secret (and a missing signing key) in place.

    With ``tokens=False`` only signing keys are filled: the appservice tokens must
    match the registration the homeserver already has. Returns whether anything
    changed, so callers write the file only when needed.
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


def apply_env_overrides(doc: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return a plain copy of ``doc`` with ``RELAY_<SECTION>_<KEY>`` values applied.

    Values are parsed as YAML scalars/flow collections, so ``RELAY_APPSERVICE_PORT=8080``
    is an integer and ``RELAY_BRIDGES='[{name: irc, token: x}]'`` a list.
    """
    merged: dict[str, Any] = {k: _plain(v) for k, v in doc.items()}
    yaml = YAML(typ="safe", pure=True)
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        try:
            value = yaml.load(raw) if raw.strip() else ""
        except YAMLError:
            raise ConfigError(f"{name}: cannot parse the value as YAML") from None
        if rest in TOP_LEVEL_KEYS:
            merged[rest] = value
            continue
        for section in SECTIONS:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                target = merged.setdefault(section, {})
                if not isinstance(target, dict):
                    raise ConfigError(f"{section}: expected a mapping")
                target[key] = value
                break
    return merged


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- validation


def parse_size(value: object, key: str) -> int:
    """A byte count: an integer, or a string such as ``100M``, ``10G``, ``512K`` (binary units)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as 100M, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive size, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m:
            size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
            if size > 0:
                return size
    raise ConfigError(f"{key}: expected a size such as 100M or 10G, got {value!r}")


class _Section:
    """Typed accessors over one mapping, each error naming the full key."""

    def __init__(self, data: Mapping[str, Any], name: str) -> None:
        self.data = data
        self.name = name

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def get(self, key: str, default: object = None, *, required: bool = False) -> Any:
        value = self.data.get(key, default)
        if required and (value is None or value == ""):
            raise ConfigError(f"{self.key(key)}: required but missing")
        return value

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.get(key, default, required=required)
        if not isinstance(value, str):
            raise ConfigError(f"{self.key(key)}: expected a string, got {value!r}")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{self.key(key)}: expected an integer {low}-{high}, got {value!r}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise ConfigError(f"{self.key(key)}: expected a number {low:g}-{high:g}, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(key)}: expected true or false, got {value!r}")
        return value

    def size(self, key: str, default: str) -> int:
        return parse_size(self.get(key, default), self.key(key))

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.get(key, [])
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(key)}: expected a list of strings, got {value!r}")
        return tuple(value)

    def secret(self, key: str) -> str:
        value = self.string(key, required=True)
        if value == GENERATE:
            raise ConfigError(
                f"{self.key(key)}: still 'generate'; run media-relay generate-registration first"
            )
        if len(value) < MIN_SECRET_LENGTH:
            raise ConfigError(f"{self.key(key)}: must be at least {MIN_SECRET_LENGTH} characters")
        return value


def _section(doc: Mapping[str, Any], name: str) -> _Section:
    value = doc.get(name) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {value!r}")
    return _Section(value, name)


def _http_url(s: _Section, key: str, default: str | None = None, *, required: bool = False) -> str:
    value = s.string(key, default, required=required)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{s.key(key)}: expected an http(s) URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{s.key(key)}: must not have a query or fragment, got {value!r}")
    return value.rstrip("/") if key != "url" else value


def _checked(s: _Section, key: str, value: T, ok: Callable[[T], bool], expected: str) -> T:
    if not ok(value):
        raise ConfigError(f"{s.key(key)}: expected {expected}, got {value!r}")
    return value


def validate(doc: Mapping[str, Any], base_dir: Path) -> Config:
    """Build a Config from a mapping (env overrides already applied), or raise ConfigError."""
    hs = _section(doc, "homeserver")
    homeserver = HomeserverConfig(
        address=_http_url(hs, "address", required=True),
        domain=_checked(
            hs,
            "domain",
            hs.string("domain", required=True),
            is_valid_server_name,
            "a Matrix server name such as example.org",
        ),
    )

    a = _section(doc, "appservice")
    bot = a.string("bot_localpart", "mediarelay")
    _checked(
        a,
        "bot_localpart",
        bot,
        lambda v: bool(_LOCALPART.fullmatch(v)),
        "a lowercase Matrix localpart",
    )
    port = a.integer("port", 29340, 1, 65535)
    room_namespace = a.strings("room_namespace")
    for pattern in room_namespace:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(
                f"appservice.room_namespace: invalid regex {pattern!r} ({e})"
            ) from None
    inviters = a.strings("allowed_inviters") or (homeserver.domain,)
    appservice = AppserviceConfig(
        id=_checked(
            a,
            "id",
            a.string("id", "media-relay"),
            lambda v: bool(re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v)),
            "letters, digits, '.', '_' or '-'",
        ),
        bot_localpart=bot,
        as_token=a.secret("as_token"),
        hs_token=a.secret("hs_token"),
        hostname=a.string("hostname", "127.0.0.1"),
        port=port,
        address=_http_url(a, "address", f"http://localhost:{port}"),
        room_namespace=room_namespace,
        allowed_inviters=inviters,
        max_transaction_size=a.size("max_transaction_size", "64M"),
    )

    p = _section(doc, "public")
    public = PublicConfig(
        url=_http_url(p, "url", required=True),
        hostname=p.string("hostname", "0.0.0.0"),  # noqa: S104 - the public listener is meant to be reachable
        port=p.integer("port", 29341, 1, 65535),
    )
    if public.port == appservice.port and public.hostname == appservice.hostname:
        raise ConfigError("public.port: must differ from appservice.port on the same hostname")

    database = doc.get("database", "sqlite:relay.db")
    if not isinstance(database, str) or not database.startswith(
        ("sqlite:", "postgres://", "postgresql://")
    ):
        raise ConfigError(
            f"database: expected 'sqlite:<path>' or 'postgresql://…', got {database!r}"
        )
    database = _resolve_sqlite(database, base_dir)

    m = _section(doc, "media")
    media = MediaConfig(
        cache_dir=(base_dir / m.string("cache_dir", "media-cache")),
        max_size=m.size("max_size", "100M"),
        cache_max_size=m.size("cache_max_size", "10G"),
        strip_metadata=m.boolean("strip_metadata", True),
        not_found_ttl=m.number("not_found_ttl", 60, 0, 86400),
        connect_timeout=m.number("connect_timeout", 10, 0.1, 600),
        read_timeout=m.number("read_timeout", 30, 0.1, 3600),
        download_timeout=m.number("download_timeout", 600, 1, 86400),
    )

    if media.cache_max_size < media.max_size:
        # A file larger than the whole cache would be evicted as soon as it was written.
        raise ConfigError(
            f"media.cache_max_size: must be at least media.max_size ({media.max_size} bytes)"
        )

    t = _section(doc, "thumbnails")
    thumbnails = ThumbnailConfig(
        max_side=t.integer("max_side", 2048, 1, 8192),
        max_pixels=t.integer("max_pixels", 32_000_000, 1, 1_000_000_000),
    )

    s = _section(doc, "signing")
    signing = SigningConfig(
        ttl=s.integer("ttl", 86400, 1, 365 * 86400),
        require_seen=s.boolean("require_seen", True),
        keys=_signing_keys(s),
    )

    bridges = _bridges(doc.get("bridges") or [])
    log = _section(doc, "logging")
    level = log.string("level", "INFO").upper()
    _checked(
        log,
        "level",
        level,
        lambda v: v in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "DEBUG, INFO, WARNING or ERROR",
    )

    return Config(
        homeserver, appservice, public, database, media, thumbnails, signing, bridges, level
    )


def _resolve_sqlite(url: str, base_dir: Path) -> str:
    if not url.startswith("sqlite:"):
        return url
    path = url[len("sqlite:") :].removeprefix("//")
    if not path:
        raise ConfigError("database: sqlite URL has no path")
    return f"sqlite:{(base_dir / path) if not Path(path).is_absolute() else Path(path)}"


def _signing_keys(s: _Section) -> tuple[SigningKeyConfig, ...]:
    raw = s.get("keys") or []
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            "signing.keys: no signing key; run media-relay generate-registration to create one"
        )
    keys: list[SigningKeyConfig] = []
    for i, item in enumerate(raw):
        entry = _Section(item if isinstance(item, Mapping) else {}, f"signing.keys[{i}]")
        if not isinstance(item, Mapping):
            raise ConfigError(f"signing.keys[{i}]: expected a mapping with id and secret")
        key_id = entry.string("id", required=True)
        _checked(
            entry,
            "id",
            key_id,
            lambda v: bool(_KEY_ID.fullmatch(v)),
            "1-16 letters, digits, '_' or '-'",
        )
        keys.append(SigningKeyConfig(key_id, entry.secret("secret")))
    ids = [k.id for k in keys]
    if len(set(ids)) != len(ids):
        raise ConfigError("signing.keys: key ids must be unique")
    return tuple(keys)


def _bridges(raw: object) -> tuple[BridgeConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"bridges: expected a list, got {raw!r}")
    bridges: list[BridgeConfig] = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ConfigError(f"bridges[{i}]: expected a mapping with name, token and ttl")
        b = _Section(item, f"bridges[{i}]")
        name = b.string("name", required=True)
        _checked(
            b,
            "name",
            name,
            lambda v: bool(_BRIDGE_NAME.fullmatch(v)),
            "1-64 letters, digits, '.', '_' or '-'",
        )
        bridges.append(
            BridgeConfig(name, b.secret("token"), b.integer("ttl", 86400, 1, 365 * 86400))
        )
    tokens = [b.token for b in bridges]
    if len(set(tokens)) != len(tokens):
        raise ConfigError("bridges: every bridge needs its own token")
    return tuple(bridges)


def load(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, apply environment overrides and validate. Never writes the file."""
    doc = read_document(path)
    merged = apply_env_overrides(doc, os.environ if environ is None else environ)
    return validate(merged, base_dir=Path.cwd())

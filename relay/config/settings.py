"""The configuration schema: frozen pydantic models, one per section.

pydantic walks the whole document and collects *every* problem with its location,
refuses unknown keys (``extra="forbid"``) and builds immutable objects; the value
checks and their wording are ours (:mod:`relay.config.values`). Reading YAML,
environment overrides and turning errors into lines live beside this module
(``document``, ``environment``, ``loading``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)

# ConfigError is re-exported: importers of the schema catch it (relay.cli.doctor).
from relay.config.errors import ConfigError as ConfigError
from relay.config.media_settings import MediaConfig, ObjectStoreConfig, ThumbnailConfig
from relay.config.section import Section
from relay.config.values import (
    Flag,
    Port,
    Seconds,
    Secret,
    Size,
    Text,
    base_dir,
    bridge_list,
    fail,
    host_entries,
    http_url,
    integer,
    log_format,
    log_level,
    number,
    regexes,
    signing_key_list,
    string,
    strings,
    text,
)
from relay.core.compat import mautrix, mediaproxy
from relay.core.mxc import is_valid_server_name

_LOCALPART = re.compile(r"[a-z0-9._=/+-]+")
_APPSERVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_BRIDGE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


# ---------------------------------------------------------------- sections

__all__ = ["ConfigError", "MediaConfig", "ObjectStoreConfig", "Section", "ThumbnailConfig"]


class HomeserverConfig(Section):
    address: Annotated[str, PlainValidator(http_url)]
    domain: Annotated[
        str, text(is_valid_server_name, "a Matrix server name such as example.org", required=True)
    ]
    # Hosts, IP addresses or networks an upstream redirect may leave the homeserver for
    # (object storage behind a media repository); see relay.upstream.redirects.
    redirect_hosts: Annotated[tuple[str, ...], PlainValidator(host_entries)] = ()


class AppserviceConfig(Section):
    id: Annotated[str, text(_APPSERVICE_ID.fullmatch, "letters, digits, '.', '_' or '-'")] = (
        "media-relay"
    )
    bot_localpart: Annotated[str, text(_LOCALPART.fullmatch, "a lowercase Matrix localpart")] = (
        "mediarelay"
    )
    as_token: Secret
    hs_token: Secret
    hostname: Text = "127.0.0.1"
    port: Port = 29340
    # Empty or missing: http://localhost:{port}.
    address: str = Field(default="", validate_default=True)
    room_namespace: Annotated[tuple[str, ...], PlainValidator(regexes)] = ()
    # Empty or missing: users of homeserver.domain (filled in by Config).
    allowed_inviters: Annotated[tuple[str, ...], PlainValidator(strings)] = ()
    max_transaction_size: Size = 64 * 1024**2

    @field_validator("address", mode="plain")
    @classmethod
    def _address(cls, value: object, info: ValidationInfo) -> str:
        if value == "":
            return f"http://localhost:{info.data.get('port', '')}"
        return http_url(value)

    def bot_user_id(self, domain: str) -> str:
        return f"@{self.bot_localpart}:{domain}"


class PublicConfig(Section):
    url: Annotated[str, PlainValidator(lambda v: http_url(v, keep_slash=True))]
    hostname: Text = "0.0.0.0"  # noqa: S104 - the public listener is meant to be reachable
    port: Port = 29341
    # Connection limits of the public listener (relay.web.listener): seconds for a
    # request head to arrive (also the idle keep-alive time), seconds a client may read
    # nothing of a response, connections open at once (more get 503 and are closed).
    header_timeout: Annotated[float, number(0.1, 3600)] = 30.0
    send_timeout: Annotated[float, number(0.1, 3600)] = 60.0
    max_connections: Annotated[int, integer(1, 1_000_000)] = 1024
    # Processes serving this listener, sharing its port (SO_REUSEPORT), the database and
    # media.cache_dir (relay.app.workers); max_connections counts per process.
    workers: Annotated[int, integer(1, 64)] = 1

    @property
    def path_prefix(self) -> str:
        """The path part of ``public.url`` without a trailing slash ("" for none)."""
        return urlsplit(self.url).path.rstrip("/")


class SigningKeyConfig(Section):
    shape: ClassVar[str] = "a mapping with id and secret"
    id: Annotated[str, text(_KEY_ID.fullmatch, "1-16 letters, digits, '_' or '-'", required=True)]
    secret: Secret


def _unique_ids(keys: tuple[SigningKeyConfig, ...]) -> tuple[SigningKeyConfig, ...]:
    if len({k.id for k in keys}) != len(keys):
        fail("key ids must be unique")
    return keys


class SigningConfig(Section):
    ttl: Seconds = 86400
    require_seen: Flag = True
    # Seconds the audit trail keeps a row for each signed link (30 days).
    audit_retention: Seconds = 30 * 86400
    # A config without keys gets one from generate-registration or at start-up.
    keys: Annotated[
        tuple[SigningKeyConfig, ...],
        BeforeValidator(signing_key_list),
        AfterValidator(_unique_ids),
    ] = Field(default=(), validate_default=True)


class BridgeConfig(Section):
    shape: ClassVar[str] = "a mapping with name, token and ttl"
    name: Annotated[
        str, text(_BRIDGE_NAME.fullmatch, "1-64 letters, digits, '.', '_' or '-'", required=True)
    ]
    token: Secret
    ttl: Seconds = 86400


def _unique_tokens(bridges: tuple[BridgeConfig, ...]) -> tuple[BridgeConfig, ...]:
    if len({b.token for b in bridges}) != len(bridges):
        fail("every bridge needs its own token")
    return bridges


# ---------------------------------------------------------------- compat: bridges' own links
# The keys are the bridge's own (the relay cannot choose them): checked for sanity only.
_PATH_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+")
BridgeKey = Annotated[str, text(lambda v: len(v) >= 16, "the bridge's key (16+ characters)")]


class CompatEntry(Section):
    shape: ClassVar[str] = "a mapping with name and url"
    name: Annotated[
        str, text(_BRIDGE_NAME.fullmatch, "1-64 letters, digits, '.', '_' or '-'", required=True)
    ]
    # The public base the bridge was configured with; its path is optional in links.
    url: Annotated[str, PlainValidator(lambda v: http_url(v, keep_slash=True))]

    @property
    def url_prefix(self) -> str:
        """The path part of ``url`` without a trailing slash ("" for none)."""
        return urlsplit(self.url).path.rstrip("/")


class MediaProxyEntry(CompatEntry):
    """matrix-appservice-bridge MediaProxy: its JWK file (HMAC-SHA512), read at load time."""

    shape: ClassVar[str] = "a mapping with name, url and signing_key_path"
    signing_key_path: Path

    @field_validator("signing_key_path", mode="plain")
    @classmethod
    def _jwk_file(cls, value: object, info: ValidationInfo) -> Path:
        path = base_dir(info) / string(value, required=True)
        try:
            mediaproxy.load_jwk(path.read_text(encoding="utf-8"))
        except OSError as e:
            fail(f"cannot read the bridge's JWK file {str(path)!r}: {e.strerror or e}")
        except mediaproxy.InvalidJwk as e:
            fail(f"{str(path)!r} is not an HMAC-SHA512 JWK: {e}")
        return path

    def signing_key(self) -> bytes:
        return mediaproxy.load_jwk(self.signing_key_path.read_text(encoding="utf-8"))


class HeisenbridgeEntry(CompatEntry):
    shape: ClassVar[str] = "a mapping with name, url and media_key"
    media_key: BridgeKey = Field(repr=False)


class MautrixEntry(CompatEntry):
    shape: ClassVar[str] = "a mapping with name, url and signing_key"
    signing_key: BridgeKey = Field(repr=False)
    # 0 would be no signature at all (mautrix-go accepts it; the relay does not).
    hash_length: Annotated[int, integer(1, mautrix.MAX_HASH_LENGTH)] = 32
    # The bridge's public_media.expiry (seconds); 0: its links carry no expiry.
    expiry: Annotated[int, integer(0, 365 * 86400)] = 0
    path_prefix: str = mautrix.DEFAULT_PATH_PREFIX

    @field_validator("path_prefix", mode="plain")
    @classmethod
    def _prefix(cls, value: object) -> str:
        given = "/" + string(value).strip("/")
        if not _PATH_PREFIX.fullmatch(given):
            fail(f"expected a path such as /_mautrix/publicmedia, got {value!r}")
        return given


class CompatConfig(Section):
    mediaproxy: Annotated[tuple[MediaProxyEntry, ...], BeforeValidator(bridge_list)] = ()
    heisenbridge: Annotated[tuple[HeisenbridgeEntry, ...], BeforeValidator(bridge_list)] = ()
    mautrix_publicmedia: Annotated[tuple[MautrixEntry, ...], BeforeValidator(bridge_list)] = ()
    legacy_media: Flag = False

    @model_validator(mode="after")
    def _unique_names(self) -> CompatConfig:
        names = [e.name for e in (*self.mediaproxy, *self.heisenbridge, *self.mautrix_publicmedia)]
        if len(set(names)) != len(names):
            fail("every compat entry needs its own name (it labels the metrics)")
        return self


class LoggingConfig(Section):
    level: Annotated[str, PlainValidator(log_level)] = "INFO"
    format: Annotated[str, PlainValidator(log_format)] = "text"


class Config(Section):
    """The whole configuration. Field order matters: later checks see earlier fields."""

    homeserver: HomeserverConfig
    appservice: AppserviceConfig
    public: PublicConfig
    database: str = Field(default="sqlite:relay.db", validate_default=True)
    media: MediaConfig
    thumbnails: ThumbnailConfig
    signing: SigningConfig
    bridges: Annotated[
        tuple[BridgeConfig, ...],
        BeforeValidator(bridge_list),
        AfterValidator(_unique_tokens),
    ] = ()
    compat: CompatConfig
    logging: LoggingConfig

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: object) -> object:
        """A missing or empty (``media:``) section means every default in it."""
        if isinstance(data, Mapping):
            data = dict(data)
            for name in section_names():
                if data.get(name) is None:
                    data[name] = {}
        return data

    @field_validator("appservice")
    @classmethod
    def _inviters_default(cls, value: AppserviceConfig, info: ValidationInfo) -> AppserviceConfig:
        homeserver = info.data.get("homeserver")
        if value.allowed_inviters or homeserver is None:
            return value
        return value.model_copy(update={"allowed_inviters": (homeserver.domain,)})

    @field_validator("public")
    @classmethod
    def _ports_differ(cls, value: PublicConfig, info: ValidationInfo) -> PublicConfig:
        appservice = info.data.get("appservice")
        if appservice and (value.hostname, value.port) == (appservice.hostname, appservice.port):
            fail("must differ from appservice.port on the same hostname", key="public.port")
        return value

    @field_validator("database", mode="plain")
    @classmethod
    def _database(cls, value: object, info: ValidationInfo) -> str:
        if not isinstance(value, str) or not value.startswith(
            ("sqlite:", "postgres://", "postgresql://")
        ):
            fail(f"expected 'sqlite:<path>' or 'postgresql://…', got {value!r}")
        if not value.startswith("sqlite:"):
            return str(value)
        path = value[len("sqlite:") :].removeprefix("//")
        if not path:
            fail("sqlite URL has no path")
        return f"sqlite:{base_dir(info) / path}"  # an absolute path stays as it is

    @property
    def bot_user_id(self) -> str:
        return self.appservice.bot_user_id(self.homeserver.domain)

    @property
    def log_level(self) -> str:
        return self.logging.level


# ---------------------------------------------------------------- the shape, for others


def section_names() -> tuple[str, ...]:
    """Top-level keys that hold a mapping (``homeserver``, ``media``, …)."""
    return tuple(name for name, field in Config.model_fields.items() if _section(field.annotation))


def keys_at(path: Sequence[str | int]) -> tuple[str, ...]:
    """The keys a mapping at ``path`` may have (``()`` at the top level); ``()`` if none."""
    annotation: Any = Config
    for part in path:
        if isinstance(part, int):
            annotation = get_args(annotation)[0] if get_origin(annotation) is tuple else None
        else:
            model = _section(annotation)
            field = model.model_fields.get(part) if model else None
            annotation = field.annotation if field else None
    model = _section(annotation)
    return tuple(model.model_fields) if model else ()


def _section(annotation: object) -> type[Section] | None:
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    return None

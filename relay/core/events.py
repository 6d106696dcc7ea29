"""Matrix event JSON → media references (pure: no I/O, no logging).

The relay must remember every media reference it sees in room events (so it
signs only media that was really posted) and must give bridges an https URL
beside each reference (:mod:`relay.core.rewrite`, which walks content through
:func:`extract_from_content`). This module finds:

- ``url`` / ``file`` (Client-Server API, "m.room.message msgtypes" and "Sending
  encrypted attachments"), ``info.thumbnail_url`` / ``info.thumbnail_file`` with
  ``info.thumbnail_info`` ("ThumbnailInfo"), ``m.sticker``;
- ``avatar_url`` of ``m.room.member`` and ``url`` of ``m.room.avatar``;
- edits: ``m.new_content`` of an ``m.replace`` relation ("Event replacements");
- the event id named by an ``m.room.redaction``.

Event content is untrusted input from any room member. Every field is type
checked; a reference that fails validation is counted and dropped, never
returned, and an EncryptedFile's key never appears in a ``repr``. Whatever is
returned can be stored as it is: a metadata field that no database column could
hold (an integer beyond the column's range, text with NUL or a lone surrogate) is
dropped and counted (``Extraction.dropped``), and an envelope field that cannot be
stored makes the whole event malformed, so one event can never fail an insert.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from relay.core.attachment_keys import EncryptionInfo, parse_encrypted_file
from relay.core.limits import MAX_CONTENT_TYPE_LENGTH, MAX_FILENAME_LENGTH
from relay.core.mxc import InvalidMxc, MediaId, parse_mxc

# Matrix spec, appendices, "Canonical JSON": integers lie in [-(2**53)+1, 2**53-1]
# (and the database stores sizes and timestamps as BIGINT).
MAX_JSON_INT = 2**53 - 1
# Width and height are 32-bit INTEGER columns; a larger claim is no real image anyway.
MAX_DIMENSION = 2**31 - 1
# Envelope strings (ids): Appendices, "Identifier grammar" bounds user, room and event
# ids at 255 bytes.
_MAX_ID_LENGTH = 255
# Client-Server API "m.room.message msgtypes": for these, `body` is the file name
# unless a separate `filename` is given (then `body` is a caption).
_FILE_MSGTYPES = frozenset({"m.file", "m.image", "m.video", "m.audio"})
# Appendices, "Event IDs": at most 255 bytes including the `$` sigil. We accept
# printable ASCII only: every room version's event ids fit in it.
_EVENT_ID = re.compile(r"\$[\x21-\x7e]{1,254}")


class Role(StrEnum):
    """What a media reference is to the event that holds it."""

    CONTENT = "content"
    THUMBNAIL = "thumbnail"
    AVATAR = "avatar"


class MalformedEvent(ValueError):
    """The event (or content) is not a well-formed client-format room event."""


@dataclass(frozen=True, slots=True)
class MediaReference:
    """One media reference in event content.

    ``path`` is where the reference sits in the content: ``("url",)``,
    ``("info", "thumbnail_file")``, ``("m.new_content", "url")``… For an
    EncryptedFile it names the object (``("file",)``), not the ``url`` inside it.
    """

    media: MediaId
    role: Role
    path: tuple[str, ...]
    mimetype: str | None
    size: int | None
    width: int | None
    height: int | None
    filename: str | None
    encryption: EncryptionInfo | None


@dataclass(frozen=True, slots=True)
class Extraction:
    """The valid references of one event, in content order, and how many were refused."""

    references: tuple[MediaReference, ...]
    invalid: int
    dropped: int = 0  # metadata fields left out because no column could store them


@dataclass(frozen=True, slots=True)
class _Meta:
    mimetype: str | None = None
    size: int | None = None
    width: int | None = None
    height: int | None = None


@dataclass(slots=True)
class _Collector:
    """Accumulates one extraction (local to a call: the module keeps no state)."""

    references: list[MediaReference] = field(default_factory=list)
    seen: set[tuple[MediaId, Role, tuple[str, ...]]] = field(default_factory=set)
    invalid: int = 0
    dropped: int = 0

    def add(self, ref: MediaReference) -> None:
        key = (ref.media, ref.role, ref.path)
        if key not in self.seen:
            self.seen.add(key)
            self.references.append(ref)


# --- public API -------------------------------------------------------------------------


def extract_from_content(content: Mapping[str, Any], event_type: str | None = None) -> Extraction:
    """Every valid media reference in event ``content``.

    With ``event_type`` None (a bridge sending bare content) the roles follow the
    shape: ``avatar_url`` is an avatar, ``url``/``file`` content, ``info.thumbnail_*``
    thumbnails. Raises :class:`MalformedEvent` if ``content`` is not an object.
    """
    if not isinstance(content, Mapping):
        raise MalformedEvent("event content must be an object")
    out = _Collector()
    _collect(content, event_type, (), out)
    relates_to = content.get("m.relates_to")
    new_content = content.get("m.new_content")
    # Client-Server API, "Event replacements": the edit's new content is what clients
    # show, so its media is as much "seen in the room" as the fallback's.
    if (
        isinstance(relates_to, Mapping)
        and relates_to.get("rel_type") == "m.replace"
        and isinstance(new_content, Mapping)
    ):
        _collect(new_content, event_type, ("m.new_content",), out)
    return Extraction(references=tuple(out.references), invalid=out.invalid, dropped=out.dropped)


def extract_media(event: Mapping[str, Any]) -> Extraction:
    """Media references of a whole client-format room event (as in an AS transaction).

    Raises :class:`MalformedEvent` if the event lacks a string ``type``, ``event_id``,
    ``room_id`` or ``sender``, or an object ``content``.
    """
    if not isinstance(event, Mapping):
        raise MalformedEvent("event must be an object")
    for name in ("type", "event_id", "room_id", "sender"):
        value = event.get(name)
        if not isinstance(value, str):
            raise MalformedEvent(f"event field {name!r} must be a string")
        if name != "type" and not (0 < len(value) <= _MAX_ID_LENGTH and storable_text(value)):
            raise MalformedEvent(f"event field {name!r} is not a storable identifier")
    if not isinstance(event.get("content"), Mapping):
        raise MalformedEvent("event field 'content' must be an object")
    return extract_from_content(event["content"], event["type"])


def replaced_event_id(event: Mapping[str, Any]) -> str | None:
    """The event an edit replaces (``m.relates_to`` with ``rel_type: m.replace``), or None.

    Clients delete an edited message by redacting the *original* event, so media
    that only an edit brought in must be revoked with it (Client-Server API,
    "Event replacements" and "Redactions").
    """
    content = event.get("content")
    relates_to = content.get("m.relates_to") if isinstance(content, Mapping) else None
    if not isinstance(relates_to, Mapping) or relates_to.get("rel_type") != "m.replace":
        return None
    target = relates_to.get("event_id")
    return target if isinstance(target, str) and _EVENT_ID.fullmatch(target) else None


def redacted_event_id(event: Mapping[str, Any]) -> str | None:
    """The event id an ``m.room.redaction`` redacts, or None.

    Room versions 1-10 carry ``redacts`` at the top level; v11 moved it into
    ``content`` (Room Version 11, "Redactions"). Without the room version we prefer
    the top level: in old rooms only it is checked by the auth rules (a sender could
    put any id in content), and homeservers copy v11's content value there for
    backwards compatibility, so the two agree whenever both are legitimate.
    """
    if not isinstance(event, Mapping) or event.get("type") != "m.room.redaction":
        return None
    content = event.get("content")
    candidates = [event.get("redacts")]
    if isinstance(content, Mapping):
        candidates.append(content.get("redacts"))
    for candidate in candidates:
        if isinstance(candidate, str) and _EVENT_ID.fullmatch(candidate):
            return candidate
    return None


# --- walking content --------------------------------------------------------------------


def _collect(
    content: Mapping[str, Any], event_type: str | None, prefix: tuple[str, ...], out: _Collector
) -> None:
    # m.room.avatar's `url` is the room's avatar; everywhere else `url` is the
    # attachment itself (messages, stickers, and unknown types by shape).
    is_room_avatar = event_type == "m.room.avatar"
    main_role = Role.AVATAR if is_room_avatar else Role.CONTENT
    info = content.get("info")
    info = info if isinstance(info, Mapping) else None
    meta = _meta(info, out)
    filename = None if is_room_avatar else _filename(content, event_type, out)

    if "url" in content:
        site = _Site(main_role, (*prefix, "url"), meta, filename)
        _plain(out, content["url"], site, removable=is_room_avatar)
    if "file" in content:
        _encrypted(out, content["file"], _Site(main_role, (*prefix, "file"), meta, filename))
    if "avatar_url" in content:
        # m.room.member: "" (or null) removes the avatar; it refers to nothing.
        site = _Site(Role.AVATAR, (*prefix, "avatar_url"), _Meta(), None)
        _plain(out, content["avatar_url"], site, removable=True)
    if info is not None:
        thumb_info = info.get("thumbnail_info")
        thumb_meta = _meta(thumb_info if isinstance(thumb_info, Mapping) else None, out)
        if "thumbnail_url" in info:
            site = _Site(Role.THUMBNAIL, (*prefix, "info", "thumbnail_url"), thumb_meta, None)
            _plain(out, info["thumbnail_url"], site, removable=False)
        if "thumbnail_file" in info:
            site = _Site(Role.THUMBNAIL, (*prefix, "info", "thumbnail_file"), thumb_meta, None)
            _encrypted(out, info["thumbnail_file"], site)


@dataclass(frozen=True, slots=True)
class _Site:
    """Where a reference sits and what the content says about it."""

    role: Role
    path: tuple[str, ...]
    meta: _Meta
    filename: str | None

    def reference(self, media: MediaId, encryption: EncryptionInfo | None) -> MediaReference:
        return MediaReference(
            media=media,
            role=self.role,
            path=self.path,
            mimetype=self.meta.mimetype,
            size=self.meta.size,
            width=self.meta.width,
            height=self.meta.height,
            filename=self.filename,
            encryption=encryption,
        )


def _plain(out: _Collector, value: object, site: _Site, *, removable: bool) -> None:
    if removable and value in ("", None):
        return
    try:
        media = parse_mxc(value)
    except InvalidMxc:
        out.invalid += 1
        return
    out.add(site.reference(media, None))


def _encrypted(out: _Collector, value: object, site: _Site) -> None:
    parsed = parse_encrypted_file(value)
    if parsed is None:
        out.invalid += 1
        return
    out.add(site.reference(*parsed))


def storable_text(value: str) -> bool:
    """Whether a database text column can hold ``value``.

    PostgreSQL refuses NUL in text, and neither database driver can encode a lone
    surrogate (which JSON's ``\\ud800`` escapes produce) as UTF-8.
    """
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _meta(info: Mapping[str, Any] | None, out: _Collector) -> _Meta:
    if info is None:
        return _Meta()
    return _Meta(
        mimetype=_text(info.get("mimetype"), MAX_CONTENT_TYPE_LENGTH, out),
        size=_count(info.get("size"), MAX_JSON_INT, out),
        width=_count(info.get("w"), MAX_DIMENSION, out),
        height=_count(info.get("h"), MAX_DIMENSION, out),
    )


def _count(value: object, maximum: int, out: _Collector) -> int | None:
    # bool is a subclass of int in Python but not a JSON integer.
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if 0 <= value <= maximum:
        return value
    out.dropped += 1
    return None


def _filename(content: Mapping[str, Any], event_type: str | None, out: _Collector) -> str | None:
    # Client-Server API, "m.room.message msgtypes" (v1.10+): when `filename` is
    # present, `body` is a caption, so we never fall back to it.
    if "filename" in content:
        return _text(content["filename"], MAX_FILENAME_LENGTH, out)
    msgtype = content.get("msgtype")
    if (
        event_type in (None, "m.room.message")
        and isinstance(msgtype, str)
        and msgtype in _FILE_MSGTYPES
    ):
        return _text(content.get("body"), MAX_FILENAME_LENGTH, out)
    return None


def _text(value: object, max_length: int, out: _Collector) -> str | None:
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        return None
    if storable_text(value):
        return value
    out.dropped += 1
    return None

"""Event content with an https link beside every media reference (pure: no I/O).

The bridge API's ``/rewrite`` hands bridges a copy of event content in which every
reference that :func:`relay.core.events.extract_from_content` finds gets a
``<key>_https`` sibling, plus a list of what was linked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from relay.core.events import MediaReference, extract_from_content

# Where references can sit, relative to a content object (or m.new_content).
_REFERENCE_KEYS: tuple[tuple[str, ...], ...] = (
    ("url",),
    ("file",),
    ("avatar_url",),
    ("info", "thumbnail_url"),
    ("info", "thumbnail_file"),
)


def rewrite_content(
    content: Mapping[str, Any],
    url_for: Callable[[MediaReference], dict[str, Any] | None],
    event_type: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A copy of ``content`` with ``<key>_https`` beside every reference, and a media list.

    ``url_for(ref)`` returns a dict with at least ``"url"`` (its other keys, such as
    ``expires_at``, go into the media list entry), or None to leave that reference
    alone (unseen media). ``<key>_https`` values already present in the content are
    removed first: a sender must not be able to pass off its own link as the relay's.
    The input is never mutated. Raises :class:`MalformedEvent` like
    :func:`extract_from_content`.
    """
    extraction = extract_from_content(content, event_type)
    rewritten = _copy_json(content)
    _strip_spoofed_links(rewritten)
    media: list[dict[str, Any]] = []
    for ref in extraction.references:
        signed = url_for(ref)
        if signed is None:
            continue
        holder: dict[str, Any] = rewritten
        for part in ref.path[:-1]:
            holder = holder[part]
        holder[ref.path[-1] + "_https"] = signed["url"]
        media.append(
            {"mxc": str(ref.media), "role": ref.role.value, "path": list(ref.path), **signed}
        )
    return rewritten, media


def _copy_json(value: Any) -> Any:
    """Deep copy of JSON-shaped data as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(key): _copy_json(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_copy_json(item) for item in value]
    return value


def _strip_spoofed_links(content: dict[str, Any]) -> None:
    holders: list[dict[str, Any]] = [content]
    if isinstance(content.get("m.new_content"), dict):
        holders.append(content["m.new_content"])
    for holder in holders:
        for path in _REFERENCE_KEYS:
            parent: Any = holder
            for part in path[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if isinstance(parent, dict):
                parent.pop(path[-1] + "_https", None)

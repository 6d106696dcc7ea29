"""The one JSON request-body reader of the web layer (Application Service API, bridge API).

A body is read whole (bounded by the application's ``client_max_size``: 413
``M_TOO_LARGE``), must be JSON (400 ``M_NOT_JSON``), must be an object and nest no
deeper than :data:`MAX_DEPTH` levels (400 ``M_BAD_JSON``). The depth bound keeps every
later walk over the value (rewriting, serialising the answer) far from Python's
recursion limit: a body nested ~990 levels deep would otherwise raise RecursionError
somewhere downstream and surface as a 500.

The Application Service API must not refuse what the homeserver sends (it would resend
the same transaction forever), so :func:`salvage_items` recovers the parsable items of
one list from a body that failed as a whole; see ``AppserviceAPI.put_transaction``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from relay.core.errors import Codes, MatrixError

# Deeper than any Matrix event or bridge request we know of (event content rarely
# nests beyond ~10 levels), and far below Python's default recursion limit of 1000.
MAX_DEPTH = 100


class NestedTooDeeply(MatrixError):
    def __init__(self, max_depth: int) -> None:
        super().__init__(400, Codes.BAD_JSON, f"JSON nested deeper than {max_depth} levels")


async def read_json_object(
    request: web.Request, *, optional: bool = False, max_depth: int = MAX_DEPTH
) -> dict[str, Any]:
    """The request body as a JSON object; with ``optional`` an empty body reads as ``{}``."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise MatrixError(413, Codes.TOO_LARGE, "Request body too large") from None
    return parse_json_object(raw, optional=optional, max_depth=max_depth)


def parse_json_object(
    raw: bytes, *, optional: bool = False, max_depth: int = MAX_DEPTH
) -> dict[str, Any]:
    """:func:`read_json_object` without the reading (pure)."""
    if optional and not raw.strip():
        return {}
    body = _loads(raw, max_depth)
    if not isinstance(body, dict):
        raise MatrixError(400, Codes.BAD_JSON, "Body must be a JSON object")
    return body


def nesting_depth(value: object) -> int:
    """Levels of arrays and objects in ``value`` (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children: list[Any] | None = None
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        if children is None:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


def _reject_constant(name: str) -> None:
    # NaN and Infinity are accepted by Python's json but are not JSON (RFC 8259 section 6).
    raise ValueError(f"{name} is not JSON")


def _loads(raw: bytes | str, max_depth: int) -> Any:
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise NestedTooDeeply(max_depth) from None
    except (ValueError, UnicodeDecodeError):
        # ValueError also covers integers longer than Python's int parsing limit.
        raise MatrixError(400, Codes.NOT_JSON, "Body is not valid JSON") from None
    if nesting_depth(value) > max_depth:
        raise NestedTooDeeply(max_depth)
    return value


# A JSON string (escapes included) or a structural character; everything else (numbers,
# literals, colons, white space) is skipped. Enough to find item boundaries.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)
_COLON = re.compile(r"\s*:")


def salvage_items(
    raw: bytes, key: str, *, max_depth: int = MAX_DEPTH
) -> tuple[list[Any], int] | None:
    """The items of the top-level ``key`` list that parse on their own, and how many did not.

    For a body that failed to parse as a whole (an item too deep, an integer too long,
    one broken item): each item of ``body[key]`` is cut out at its commas and parsed
    alone, keeping the depth bound (two levels are the body and the list). None when the
    body is not an object holding such a list at all.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    stripped = text.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    key_token = json.dumps(key)
    pieces: list[str] = []
    depth, found, in_list, after_key, item_from = 0, False, False, False, 0
    for match in _TOKEN.finditer(text):
        lexeme = match.group()
        if lexeme in ("{", "["):
            if depth == 1 and after_key and lexeme == "[" and not found:
                in_list, found, item_from = True, True, match.end()
            after_key = False
            depth += 1
        elif lexeme in ("}", "]"):
            depth -= 1
            if depth < 0:
                return None
            if depth == 1 and in_list:
                in_list = False
                pieces.append(text[item_from : match.start()])
        elif lexeme == ",":
            if depth == 2 and in_list:
                pieces.append(text[item_from : match.start()])
                item_from = match.end()
        else:
            after_key = (
                depth == 1 and lexeme == key_token and _COLON.match(text, match.end()) is not None
            )
    if depth != 0 or not found:
        return None
    items: list[Any] = []
    dropped = 0
    for piece in pieces:
        if not piece.strip():
            continue
        try:
            items.append(_loads(piece, max_depth - 2))
        except MatrixError:
            dropped += 1
    return items, dropped

"""Response header policy for served media: what type, inline or attachment, which guards.

Nothing here trusts upstream headers: the content type is re-parsed and reduced to
``type/subtype[; charset=…]``, inline display is granted only to the Matrix spec's
allowlist, and every filename is cleaned before it reaches ``Content-Disposition``.
Every function returns data; the serving code only copies it into the response.

The functions the serving path calls on every request are memoised with a bounded
``functools.lru_cache``: they are pure functions of their arguments (no configuration
or other state goes in), so the memo can never answer differently from a fresh call.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from urllib.parse import quote, unquote

from relay.core.limits import MAX_CONTENT_TYPE_LENGTH, MAX_FILENAME_LENGTH

OCTET_STREAM = "application/octet-stream"
# An extension longer than this is not kept whole when a long filename is cut.
_MAX_KEPT_EXTENSION = 16

# Client-Server API, Content repository, "Serving inline content": the types a server
# SHOULD restrict itself to when serving with ``Content-Disposition: inline``.
INLINE_CONTENT_TYPES = frozenset(
    {
        "text/css",
        "text/plain",
        "text/csv",
        "application/json",
        "application/ld+json",
        "image/jpeg",
        "image/gif",
        "image/png",
        "image/apng",
        "image/webp",
        "image/avif",
        "video/mp4",
        "video/webm",
        "video/ogg",
        "video/quicktime",
        "audio/mp4",
        "audio/webm",
        "audio/aac",
        "audio/mpeg",
        "audio/ogg",
        "audio/wave",
        "audio/wav",
        "audio/x-wav",
        "audio/x-pn-wav",
        "audio/flac",
        "audio/x-flac",
    }
)

# The CSP Synapse sends with media downloads (synapse/rest/client/media.py), plus headers
# that keep links out of search engines and out of Referer headers (they are capabilities).
_SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "Content-Security-Policy",
        "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; "
        "style-src 'unsafe-inline'; media-src 'self'; object-src 'self';",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "cross-origin"),
    ("Access-Control-Allow-Origin", "*"),
    ("X-Robots-Tag", "noindex, nofollow, noarchive, noimageindex"),
)

# RFC 9110 section 5.6.2: token = 1*tchar. "*" is a tchar but only means "any" in Accept.
_TOKEN = re.compile(r"[!#$%&'+\-.^_`|~0-9A-Za-z]+")
_TCHARS = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
_OWS = r"[ \t]*"
# RFC 9110 section 5.6.6: parameters = *( OWS ";" OWS [ parameter ] ),
# parameter-value = token / quoted-string.
_PARAMETER = re.compile(
    _OWS + r";" + _OWS + r"(?:([" + _TCHARS + r"]+)=([" + _TCHARS + r"]+|\"(?:[^\"\\\x00-\x08"
    r"\x0a-\x1f\x7f]|\\[\t\x20-\x7e\x80-\xff])*\"))?"
)
# RFC 2978 section 2.3: mime-charset = 1*mime-charset-chars (registered names are <= 40).
_CHARSET = re.compile(r"[A-Za-z0-9!#$%&'+\-^_`{}~]{1,40}")
# RFC 2616 section 2.2 token (what RFC 6266 allows for a bare filename value), less "%":
# RFC 6266 appendix D warns that some user agents percent-decode a plain filename.
_FILENAME_TOKEN = re.compile(r"[!#$&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 5987 section 3.2.1 attr-char, less the alphanumerics and "_.-~" that quote() keeps.
_ATTR_CHAR_SAFE = "!#$&+^`|"
# Memo sizes: the distinct content types and filenames being served at once are few.
# Longer filenames are cleaned afresh each time, so the memo's memory stays small.
_MEMO_ENTRIES = 1024
_MAX_MEMO_FILENAME = 512
# Bidirectional controls let "cod.exe\u202egnp" display as "codgnp.exe"; line and
# paragraph separators break header parsers that treat them as newlines.
_UNSAFE_FORMAT_CHARS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
)


def normalise_content_type(raw: str | None) -> str:
    """Reduce a ``Content-Type`` value to lowercase ``type/subtype`` plus a valid charset.

    Missing or unparsable values become ``application/octet-stream``. Other parameters
    are dropped, and so are all of them when they do not parse (RFC 9110 section 8.3.1
    grammar), so a charset hidden inside another parameter's quoted value never counts.
    """
    if not isinstance(raw, str) or len(raw) > MAX_CONTENT_TYPE_LENGTH or not raw.isascii():
        return OCTET_STREAM
    return _normalise_content_type(raw)


@functools.lru_cache(maxsize=_MEMO_ENTRIES)
def _normalise_content_type(raw: str) -> str:
    value = raw.strip(" \t")
    essence = value.partition(";")[0]
    type_, slash, subtype = essence.strip(" \t").partition("/")
    if not slash or not _TOKEN.fullmatch(type_) or not _TOKEN.fullmatch(subtype):
        return OCTET_STREAM
    media_type = f"{type_.lower()}/{subtype.lower()}"
    charset = _charset(value[len(essence) :])
    return f"{media_type}; charset={charset}" if charset else media_type


def _charset(parameters: str) -> str | None:
    """The one valid ``charset`` among well-formed parameters, else ``None``."""
    found: list[str] = []
    position = 0
    while position < len(parameters):
        match = _PARAMETER.match(parameters, position)
        if match is None or match.end() == position:
            return None
        name, value = match.group(1), match.group(2)
        if name is not None and name.lower() == "charset":
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            found.append(value)
        position = match.end()
    # Two charsets are ambiguous: drop both rather than guess which one a browser picks.
    if len(found) != 1 or not _CHARSET.fullmatch(found[0]):
        return None
    return found[0].lower()


def media_type(raw: str | None) -> str:
    """The lowercase ``type/subtype`` of a Content-Type value (octet-stream if unusable)."""
    return normalise_content_type(raw).partition(";")[0]


def is_inline_safe(content_type: str) -> bool:
    """Whether media of this type may be shown inline (the spec's allowlist, nothing else)."""
    return media_type(content_type) in INLINE_CONTENT_TYPES


def safe_filename(filename: str | None) -> str | None:
    """A filename that is safe to offer a browser: last path component, no control
    characters, no leading dots (hidden files), at most 255 characters; ``None`` if
    nothing is left."""
    if not isinstance(filename, str):
        return None
    # Both separators, whatever the uploader's OS: "C:\\evil\\x.exe" must not become a path.
    name = re.split(r"[/\\]", filename)[-1]
    name = "".join(char for char in name if _is_safe_char(char))
    name = name.strip().lstrip(".").strip()
    if not name:
        return None
    if len(name) > MAX_FILENAME_LENGTH:
        stem, dot, extension = name.rpartition(".")
        if dot and stem and len(extension) <= _MAX_KEPT_EXTENSION:
            keep = MAX_FILENAME_LENGTH - len(extension) - 1
            name = f"{stem[:keep].rstrip()}.{extension}"
        else:
            name = name[:MAX_FILENAME_LENGTH].rstrip()
    return name


def _is_safe_char(char: str) -> bool:
    # Cc: C0/C1 controls and DEL (CR/LF header injection); Cs: lone surrogates, which
    # cannot be encoded as UTF-8 and so cannot travel in a header or URL.
    category = unicodedata.category(char)
    return category not in ("Cc", "Cs") and char not in _UNSAFE_FORMAT_CHARS


def content_disposition(content_type: str, filename: str | None) -> str:
    """``inline`` for allowlisted types, ``attachment`` otherwise, with the cleaned filename.

    A filename that is an RFC 2616 token is sent as ``filename=NAME``; anything else as
    ``filename*=utf-8''…`` (RFC 6266 section 4.3, RFC 5987 encoding), which every current
    browser reads and which cannot carry quotes, semicolons or line breaks.
    """
    if len(content_type) > MAX_CONTENT_TYPE_LENGTH or (
        isinstance(filename, str) and len(filename) > _MAX_MEMO_FILENAME
    ):
        return _content_disposition(content_type, filename)
    return _memoised_content_disposition(content_type, filename)


def _content_disposition(content_type: str, filename: str | None) -> str:
    disposition = "inline" if is_inline_safe(content_type) else "attachment"
    name = safe_filename(filename)
    if name is None:
        return disposition
    if _FILENAME_TOKEN.fullmatch(name):
        return f"{disposition}; filename={name}"
    return f"{disposition}; filename*=utf-8''{quote(name, safe=_ATTR_CHAR_SAFE)}"


_memoised_content_disposition = functools.lru_cache(maxsize=_MEMO_ENTRIES)(_content_disposition)


def security_headers() -> dict[str, str]:
    """Headers sent with every media response: a sandboxing CSP, nosniff and friends."""
    return dict(_SECURITY_HEADERS)


def cache_control(seconds_left: float) -> str:
    """``private, max-age=N``: caches may keep the bytes no longer than the link lives.

    ``private`` because the URL is a capability: shared caches should not hold it.
    """
    seconds = math.floor(seconds_left) if math.isfinite(seconds_left) else 0
    return f"private, max-age={max(0, seconds)}"


def etag(sha256_hex: str) -> str:
    """A strong entity tag (RFC 9110 section 8.8.3) from the content's SHA-256."""
    if not isinstance(sha256_hex, str):
        raise ValueError("etag needs a 64-character hex SHA-256 digest")
    return _etag(sha256_hex)


@functools.lru_cache(maxsize=_MEMO_ENTRIES)
def _etag(sha256_hex: str) -> str:
    # Raising is not memoised, so only valid (66-character) answers are kept.
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", sha256_hex):
        raise ValueError("etag needs a 64-character hex SHA-256 digest")
    return f'"{sha256_hex.lower()}"'


# ---------------------------------------------------------------- upstream headers

_FILENAME_STAR = re.compile(r"([^']*)'[^']*'(.*)", re.DOTALL)


def filename_from_content_disposition(header: str | None) -> str | None:
    """The file name in an upstream Content-Disposition, made safe, or None.

    Understands ``filename*=UTF-8''…`` (RFC 6266 §4.3, RFC 8187) before ``filename=``.
    The result has no directory part, no control characters, at most 255 characters;
    it is a hint for the serving side's own header policy, never sent back verbatim.
    """
    if not header:
        return None
    params: dict[str, str] = {}
    for part in _split_params(header)[1:]:
        name, sep, value = part.partition("=")
        if not sep:
            continue
        name = name.strip().lower()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params.setdefault(name, value)
    raw: str | None = None
    if "filename*" in params:
        m = _FILENAME_STAR.fullmatch(params["filename*"])
        if m is not None:
            # RFC 8187 §3.2.1: UTF-8 and ISO-8859-1 are the charsets recipients must know.
            charset = m.group(1).lower()
            if charset in ("utf-8", "iso-8859-1"):
                try:
                    raw = unquote(m.group(2), encoding=charset, errors="strict")
                except UnicodeDecodeError:
                    raw = None
    if raw is None:
        raw = params.get("filename")
    return safe_filename(raw)


def _split_params(header: str) -> list[str]:
    """Split on ``;`` outside quoted strings."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in header:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts

"""Response header policy: content types, inline allowlist, filenames, security headers."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from relay.http.headers import (
    INLINE_CONTENT_TYPES,
    cache_control,
    content_disposition,
    etag,
    is_inline_safe,
    media_type,
    normalise_content_type,
    safe_filename,
    security_headers,
)

# Client-Server API, content repository, "Serving inline content" (Matrix spec v1.11+).
SPEC_INLINE_LIST = [
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
]
SPEC_FILE = (
    Path(__file__).resolve().parents[4]
    / "shared/spec/content/client-server-api/modules/content_repo.md"
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("image/png", "image/png"),
        ("Image/PNG", "image/png"),
        ("  image/png  ", "image/png"),
        ("image/png ; ", "image/png"),
        ("image/png;", "image/png"),
        ("text/plain; charset=utf-8", "text/plain; charset=utf-8"),
        ("text/plain;charset=UTF-8", "text/plain; charset=utf-8"),
        ('text/plain; CHARSET="iso-8859-1"', "text/plain; charset=iso-8859-1"),
        ("text/plain; format=flowed; charset=utf-8", "text/plain; charset=utf-8"),
        ("text/plain; charset=utf-8; format=flowed", "text/plain; charset=utf-8"),
        ('text/plain; name="a;b"; charset=utf-8', "text/plain; charset=utf-8"),
        # A charset hidden inside another parameter's quoted value is not a charset.
        ('text/plain; foo="x; charset=utf-7"', "text/plain"),
        ("text/plain; charset=utf-8; charset=utf-7", "text/plain"),
        ("text/plain; charset=", "text/plain"),
        ('text/plain; charset=""', "text/plain"),
        ('text/plain; charset="utf 8"', "text/plain"),
        ("text/plain; charset=" + "a" * 41, "text/plain"),
        ("text/plain; charset=utf-8 garbage", "text/plain"),
        ('text/plain; charset="unterminated', "text/plain"),
        ("text/html; charset=utf-8", "text/html; charset=utf-8"),
        ("image/svg+xml", "image/svg+xml"),
        (
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ),
        (None, "application/octet-stream"),
        ("", "application/octet-stream"),
        ("   ", "application/octet-stream"),
        ("garbage", "application/octet-stream"),
        ("image/", "application/octet-stream"),
        ("/png", "application/octet-stream"),
        ("image/png/extra", "application/octet-stream"),
        ("image /png", "application/octet-stream"),
        ("image/p ng", "application/octet-stream"),
        ("*/*", "application/octet-stream"),
        ("image/*", "application/octet-stream"),
        ("text/html\r\nSet-Cookie: a=b", "application/octet-stream"),
        ("text/plain\x00", "application/octet-stream"),
        ("tëxt/plain", "application/octet-stream"),
        ("text/plain; charset=ütf-8", "application/octet-stream"),
        ("image/" + "x" * 300, "application/octet-stream"),
    ],
)
def test_normalise_content_type(raw: str | None, expected: str) -> None:
    """Content types are lowercased, stripped to a valid charset, and garbage is octet-stream."""
    assert normalise_content_type(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("image/JPEG; charset=x", "image/jpeg"),
        (" text/plain ", "text/plain"),
        ("text/html;charset=utf-8", "text/html"),
        (None, "application/octet-stream"),
        ("", "application/octet-stream"),
        ("not a type", "application/octet-stream"),
    ],
)
def test_media_type(raw: str | None, expected: str) -> None:
    """The one content-type parser: lower-case type/subtype without parameters."""
    assert media_type(raw) == expected


def test_inline_list_is_exactly_the_specs() -> None:
    """The allowlist is the spec's "Serving inline content" list, nothing more or less."""
    assert set(SPEC_INLINE_LIST) == INLINE_CONTENT_TYPES
    assert len(SPEC_INLINE_LIST) == len(INLINE_CONTENT_TYPES)


def test_inline_list_matches_the_spec_file() -> None:
    """The literal list above is still the one in the spec checkout beside the repository."""
    if not SPEC_FILE.is_file():
        pytest.skip("the Matrix spec is not checked out beside the repository")
    section = SPEC_FILE.read_text(encoding="utf-8").split("##### Serving inline content")[1]
    section = section.split("These types are unlikely")[0]
    assert re.findall(r"^\* `([^`]+)`$", section, re.MULTILINE) == SPEC_INLINE_LIST


@pytest.mark.parametrize(
    ("content_type", "inline"),
    [
        *[(t, True) for t in SPEC_INLINE_LIST],
        ("IMAGE/PNG", True),
        ("text/plain; charset=utf-8", True),
        ("  video/mp4 ;codecs=avc1", True),
        ("image/svg+xml", False),
        ("image/svg", False),
        ("text/html", False),
        ("text/html; charset=utf-8", False),
        ("application/xhtml+xml", False),
        ("text/xml", False),
        ("application/xml", False),
        ("text/javascript", False),
        ("application/javascript", False),
        ("application/ecmascript", False),
        ("application/pdf", False),
        ("application/octet-stream", False),
        ("image/bmp", False),
        ("image/x-icon", False),
        ("text/vtt", False),
        ("multipart/x-mixed-replace", False),
        ("image/png, text/html", False),
        ("", False),
        ("garbage", False),
    ],
)
def test_is_inline_safe(content_type: str, inline: bool) -> None:
    """Only the spec's list is inline; SVG, HTML, XML, JS and PDF never are."""
    assert is_inline_safe(content_type) is inline


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ascii.txt", "ascii.txt"),
        ("name with spaces.png", "name with spaces.png"),
        ("name;with;semicolons.txt", "name;with;semicolons.txt"),
        ("🐱.png", "🐱.png"),
        ("../../etc/passwd", "passwd"),
        ("C:\\evil\\x.exe", "x.exe"),
        ("dir/", None),
        ("/", None),
        ("..", None),
        ("...", None),
        (".bashrc", "bashrc"),
        ("  .hidden  ", "hidden"),
        ("a\r\nSet-Cookie: x=y", "aSet-Cookie: x=y"),
        ("tab\tname", "tabname"),
        ("nul\x00byte", "nulbyte"),
        ("del\x7fc1\x85", "delc1"),
        ("cod\u202egnp.exe", "codgnp.exe"),
        ("line\u2028sep", "linesep"),
        ("lone\udcffsurrogate", "lonesurrogate"),
        ('say "hi".txt', 'say "hi".txt'),
        ("", None),
        ("   ", None),
        ("\r\n", None),
        (None, None),
    ],
)
def test_safe_filename(raw: str | None, expected: str | None) -> None:
    """Filenames lose path components, control characters and leading dots; empty → None."""
    assert safe_filename(raw) == expected


def test_safe_filename_caps_length_keeping_extension() -> None:
    """Long names are cut to 255 characters, keeping a short extension."""
    name = safe_filename("x" * 400 + ".jpeg")
    assert name is not None
    assert len(name) == 255
    assert name.endswith("x.jpeg")
    no_extension = safe_filename("y" * 300)
    assert no_extension == "y" * 255
    long_extension = safe_filename("a." + "z" * 300)
    assert long_extension is not None
    assert len(long_extension) == 255


@pytest.mark.parametrize(
    ("content_type", "filename", "expected"),
    [
        ("image/png", None, "inline"),
        ("image/svg+xml", None, "attachment"),
        ("text/html", "page.html", "attachment; filename=page.html"),
        ("image/png", "ascii.txt", "inline; filename=ascii.txt"),
        ("text/plain", "name with spaces.png", "inline; filename*=utf-8''name%20with%20spaces.png"),
        (
            "application/zip",
            "name;with;semicolons.txt",
            "attachment; filename*=utf-8''name%3Bwith%3Bsemicolons.txt",
        ),
        ("image/png", "🐱.png", "inline; filename*=utf-8''%F0%9F%90%B1.png"),
        ("image/png", "../../etc/passwd", "inline; filename=passwd"),
        ("application/x-msdownload", "C:\\evil\\x.exe", "attachment; filename=x.exe"),
        ("image/png", 'a"b.png', "inline; filename*=utf-8''a%22b.png"),
        ("image/png", "a'b.png", "inline; filename=a'b.png"),
        ("image/png", "a,b=c.png", "inline; filename*=utf-8''a%2Cb%3Dc.png"),
        ("image/png", "100%.png", "inline; filename*=utf-8''100%25.png"),
        ("image/png", "a%41.png", "inline; filename*=utf-8''a%2541.png"),
        ("image/png", "", "inline"),
        ("image/png", "..", "inline"),
        ("image/png", "x\r\n\r\n<script>.png", "inline; filename*=utf-8''x%3Cscript%3E.png"),
    ],
)
def test_content_disposition(content_type: str, filename: str | None, expected: str) -> None:
    """Disposition follows the allowlist; the filename is a token or RFC 5987 encoded."""
    assert content_disposition(content_type, filename) == expected


INJECTION_NAMES = [
    "a\r\nSet-Cookie: x=y",
    "a\rb",
    "a\nb",
    "\r\n\r\nHTTP/1.1 200 OK",
    "x\x00y",
    'quote"; filename="evil.html',
    "a\u2028b\u2029c\u0085d",
    "%0d%0a.txt",
    "\udcff",
]


@pytest.mark.parametrize("filename", INJECTION_NAMES)
@pytest.mark.parametrize("content_type", ["image/png", "text/html"])
def test_content_disposition_never_breaks_the_header(content_type: str, filename: str) -> None:
    """No filename can put CR, LF, NUL, a quote or a second parameter into the header."""
    value = content_disposition(content_type, filename)
    assert value.isascii()
    assert not re.search(r"[\x00-\x1f\x7f\"]", value)
    assert value.count(";") <= 1
    assert value.startswith(("inline", "attachment"))
    if "filename*=utf-8''" in value:
        decoded = unquote(value.split("''", 1)[1], errors="strict")
        assert decoded == safe_filename(filename)


def test_security_headers_exact() -> None:
    """Every media response gets exactly this sandboxing CSP and these guard headers."""
    assert security_headers() == {
        "Content-Security-Policy": (
            "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; "
            "style-src 'unsafe-inline'; media-src 'self'; object-src 'self';"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Resource-Policy": "cross-origin",
        "Access-Control-Allow-Origin": "*",
        "X-Robots-Tag": "noindex, nofollow, noarchive, noimageindex",
    }


def test_security_headers_are_a_fresh_copy() -> None:
    """Changing the returned dict does not change what the next response gets."""
    first = security_headers()
    first["X-Content-Type-Options"] = "changed"
    del first["Content-Security-Policy"]
    assert security_headers()["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" in security_headers()


@pytest.mark.parametrize(
    ("seconds_left", "expected"),
    [
        (3600, "private, max-age=3600"),
        (3599.999, "private, max-age=3599"),
        (0.5, "private, max-age=0"),
        (0, "private, max-age=0"),
        (-10, "private, max-age=0"),
        (-0.5, "private, max-age=0"),
        (float("nan"), "private, max-age=0"),
        (float("inf"), "private, max-age=0"),
        (float("-inf"), "private, max-age=0"),
    ],
)
def test_cache_control(seconds_left: float, expected: str) -> None:
    """Caches never keep media longer than the link lives (floor, never negative)."""
    assert cache_control(seconds_left) == expected


def test_etag_is_strong_and_quoted() -> None:
    """The ETag is the SHA-256 hex in double quotes, lowercase, without W/."""
    digest = "AB" * 32
    assert etag(digest) == '"' + "ab" * 32 + '"'


@pytest.mark.parametrize("bad", ["", "ab" * 31, "ab" * 33, "g" * 64, 'a"' * 32, "ab" * 31 + "\r\n"])
def test_etag_refuses_non_digests(bad: str) -> None:
    """Anything but a 64-character hex digest is a programming error (ValueError)."""
    with pytest.raises(ValueError, match="SHA-256"):
        etag(bad)


@pytest.mark.parametrize("bad", [None, 12, ["ab" * 32]])
def test_etag_refuses_non_strings(bad: object) -> None:
    """A non-string (even an unhashable one, which the memo could not key) is a ValueError."""
    with pytest.raises(ValueError, match="SHA-256"):
        etag(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("length", [500, 513, 5000])
def test_long_filenames_are_cleaned_like_short_ones(length: int) -> None:
    """Filenames beyond the memo's size limit get the same policy (255 max, extension kept)."""
    filename = "a" * length + ".pdf"
    expected = f"attachment; filename={'a' * 251}.pdf"
    for _ in range(2):  # a second call may come from the memo: same answer
        assert content_disposition("application/pdf", filename) == expected

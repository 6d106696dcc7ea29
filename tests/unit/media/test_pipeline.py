"""What a link serves as: the content type and filename choice of the media pipeline."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.core.attachment_keys import EncryptionInfo
from relay.core.mxc import MediaId
from relay.core.records import MediaRecord
from relay.core.signing import LinkClaims
from relay.media.pipeline import choose_content_type, choose_filename

DATA = b"0123456789"
SHA = hashlib.sha256(DATA).hexdigest()
MEDIA = MediaId("example.org", "abc")
KEY = EncryptionInfo(key=b"k" * 32, iv=b"i" * 16, sha256=b"h" * 32)


@dataclass
class Body:
    content_type: str = "image/png"
    length: int | None = len(DATA)
    sha256: str | None = SHA
    filename: str | None = "upstream.png"
    path: Path | None = Path("/cache/ab/abc")

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield DATA


STREAMING = Body(sha256=None, path=None)


def record(
    mimetype: str | None = "image/png",
    filename: str | None = "event.png",
    encryption: EncryptionInfo | None = None,
) -> MediaRecord:
    return MediaRecord(MEDIA, "!r:example.org", "$e", mimetype, 10, filename, encryption)


@pytest.mark.parametrize(
    ("content_type", "rec", "expected"),
    [
        ("image/png", None, "image/png"),
        ("IMAGE/PNG", record(mimetype="text/html"), "image/png"),
        ("", None, "application/octet-stream"),
        ("application/octet-stream", record(mimetype="text/plain", encryption=KEY), "text/plain"),
        (
            "application/octet-stream",
            record(mimetype=None, encryption=KEY),
            "application/octet-stream",
        ),
        (
            "application/octet-stream",
            record(mimetype="not a type", encryption=KEY),
            "application/octet-stream",
        ),
    ],
)
def test_content_type_choice(content_type: str, rec: MediaRecord | None, expected: str) -> None:
    """The homeserver's type, except for decrypted media, where the event's type counts."""
    assert choose_content_type(Body(content_type=content_type), rec) == expected


@pytest.mark.parametrize(
    ("signed", "rec", "upstream", "expected"),
    [
        ("signed.png", record(), "upstream.png", "signed.png"),
        (None, record(), "upstream.png", "event.png"),
        (None, record(filename=None), "upstream.png", "upstream.png"),
        (None, None, None, None),
    ],
)
def test_filename_choice(
    signed: str | None, rec: MediaRecord | None, upstream: str | None, expected: str | None
) -> None:
    """The signed filename wins, then the event's, then the homeserver's."""
    claims = LinkClaims(MEDIA, None, signed, 100)
    assert choose_filename(claims, rec, Body(filename=upstream)) == expected

"""What the relay remembers of a media item it saw in a served room."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from relay.core.attachment_keys import EncryptionInfo
from relay.core.mxc import MediaId


@dataclass(frozen=True, slots=True)
class MediaRecord:
    """One live reference to a media item in a room the relay serves."""

    media: MediaId
    room_id: str
    event_id: str
    mimetype: str | None
    size: int | None
    filename: str | None
    encryption: EncryptionInfo | None

    @property
    def tag(self) -> str:
        """The reference's tag, which links bound to it carry (:func:`reference_tag`)."""
        return reference_tag(self.event_id)


def reference_tag(event_id: str) -> str:
    """A short, fixed-length name for the reference in ``event_id``: 96 bits of its SHA-256.

    Links carry it to say which reference they serve; it is covered by the link's MAC,
    so it names a reference, it does not authorise anything.
    """
    digest = hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).digest()[:12]
    return base64.urlsafe_b64encode(digest).decode("ascii")


def choose_reference(records: list[MediaRecord], tag: str | None) -> MediaRecord | None:
    """The reference a link serves: the one its tag names, else (no tag) the newest.

    ``records`` are the live references, newest first. A tag that names none of them
    (its event was redacted, or left a served room) gives None: the link is dead.
    """
    if tag is None:
        return records[0] if records else None
    return next((r for r in records if r.tag == tag), None)

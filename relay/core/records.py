"""What the relay remembers of a media item it saw in a served room."""

from __future__ import annotations

from dataclasses import dataclass

from relay.core.attachment_keys import EncryptionInfo
from relay.core.mxc import MediaId


@dataclass(frozen=True, slots=True)
class MediaRecord:
    """The newest reference to a media item in a room the relay serves."""

    media: MediaId
    room_id: str
    event_id: str
    mimetype: str | None
    size: int | None
    filename: str | None
    encryption: EncryptionInfo | None

"""The media pipeline: from a verified link to the body it serves, in one place.

The web layer calls two things, in order: :meth:`MediaPipeline.admit` (revoked → 410)
and :meth:`MediaPipeline.open`, which decides everything about the body:

1. the media record (what the relay saw in the room: the decryption key of an
   encrypted attachment, the sender's filename and type), remembered briefly;
2. a thumbnail link gets its rendition (:class:`~relay.media.renditions.Renditions`:
   rendered once from the original, cached); an original comes from
   :class:`~relay.media.downloads.MediaSource` (the cache, or one shared download,
   decrypted when the event said so) and, when ``media.strip_metadata`` covers its
   type, goes out as its stripped rendition;
3. the served content type and filename (:func:`choose_content_type`,
   :func:`choose_filename`).

Upstream failures keep their meaning (404, or 502/503/504 with ``Retry-After``),
rendering failures become 400/422/503 and a database failure 503: every outcome
leaves as a :class:`~relay.core.errors.MatrixError`, never as a 500.

The record memory never decides access: revocation is checked on every request, and
:meth:`MediaPipeline.purge` drops everything remembered of revoked media.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from relay.core.errors import Codes, MatrixError
from relay.core.mxc import MediaId
from relay.core.records import MediaRecord, choose_reference
from relay.core.signing import LinkClaims
from relay.http.headers import normalise_content_type
from relay.media.downloads import FileBody, MediaBody, MediaSource
from relay.media.image_privacy import handled_type
from relay.media.renditions import RenditionFailed, Renditions, thumbnail_filename, to_matrix_error
from relay.media.revalidation import Revalidator
from relay.media.revocation import RevocationCheck
from relay.media.thumbnails import ThumbnailError
from relay.support.memo import TTLCache
from relay.upstream.errors import FetchError

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_RETRY_AFTER = 5
# Media records ("never seen" included) are trusted this long: they only supply the
# decryption key and filename/type fallbacks, never a decision about access. Sized for
# what is requested repeatedly within that time.
RECORD_TTL = 1.0
RECORD_MEMO_ENTRIES = 1_000


class MediaRecords(Protocol):
    """What the pipeline needs from the store (``relay.store.Store`` provides it)."""

    async def media_references(self, media: MediaId) -> list[MediaRecord]: ...


@dataclass(frozen=True, slots=True)
class Served:
    """A body and how it is to be served."""

    body: MediaBody
    content_type: str
    filename: str | None


def choose_content_type(body: MediaBody, record: MediaRecord | None) -> str:
    """The served type: the homeserver's, or for decrypted media the sender's, normalised.

    The ciphertext's type says nothing about the plaintext, so an encrypted
    attachment gets the ``info.mimetype`` of its event (Client-Server API, "Sending
    encrypted attachments"); anything unusable becomes ``application/octet-stream``.
    """
    if record is not None and record.encryption is not None:
        return normalise_content_type(record.mimetype)
    return normalise_content_type(body.content_type)


def choose_filename(claims: LinkClaims, record: MediaRecord | None, body: MediaBody) -> str | None:
    """The signed filename, else the one in the event, else the homeserver's."""
    if claims.filename is not None:
        return claims.filename
    if record is not None and record.filename is not None:
        return record.filename
    return body.filename


async def database(query: Awaitable[T]) -> T:
    """Await a database query; a failure is a 503 for the client (and a log line), not a 500."""
    try:
        return await query
    except Exception:
        log.exception("database query failed while serving a link")
        raise MatrixError(
            503, Codes.UNKNOWN, "Temporarily unavailable", {"Retry-After": str(DB_RETRY_AFTER)}
        ) from None


class MediaPipeline:
    """Turns a verified link into the body it serves (see the module docstring)."""

    def __init__(
        self,
        records: MediaRecords,
        revocations: RevocationCheck,
        source: MediaSource,
        renditions: Renditions,
        *,
        revalidator: Revalidator | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._records = records
        self.revocations = revocations
        self.source = source
        self.renditions = renditions
        self.revalidator = revalidator
        # The live references of a media item, newest first ("never seen": empty).
        self._record_memo: TTLCache[MediaId, tuple[MediaRecord, ...]] = TTLCache(
            RECORD_TTL, RECORD_MEMO_ENTRIES, clock=monotonic
        )

    async def admit(self, media: MediaId) -> None:
        """Refuse revoked media (410) before anything is fetched, rendered or remembered.

        Cached media not confirmed upstream for ``media.revalidate_after`` is checked
        first (gone: 404; unconfirmed past the grace: 503; relay.media.revalidation).
        """
        revoked = self.revocations.remembered(media)
        if revoked is None:
            revoked = await database(self.revocations.is_revoked(media))
        if revoked:
            # Redacted, taken down by the operator, or removed by the homeserver.
            raise MatrixError(410, Codes.NOT_FOUND, "The media was revoked")
        if self.revalidator is not None:
            cached_at = self.source.cache.oldest(media.server_name, media.media_id)
            await self.revalidator.ensure_served(media, cached_at)

    def admitted_now(self, media: MediaId) -> bool:
        """Whether :meth:`admit` would let ``media`` through at once, from what is
        remembered (no query, no check upstream); False when in doubt."""
        if self.revocations.remembered(media) is not False:
            return False
        revalidator = self.revalidator
        return revalidator is None or revalidator.served_now(
            media, self.source.cache.oldest(media.server_name, media.media_id)
        )

    async def open(self, claims: LinkClaims, *, need_file: bool = False) -> Served:
        """The body a link serves; with ``need_file`` a complete file (for Range).

        Raises MatrixError for every failure (see the module docstring).
        """
        media = claims.media
        record = choose_reference(await self._references(media), claims.reference)
        if record is None and claims.reference is not None:
            # Bound to a reference that is gone (redacted, or its room no longer served):
            # what it would serve is no longer anyone's to give (relay.core.records).
            raise MatrixError(410, Codes.NOT_FOUND, "The event this link was made for is gone")
        encryption = record.encryption if record is not None else None
        try:
            if claims.variant is not None:
                declared = record.mimetype if record is not None else None
                entry = await self.renditions.thumbnail(media, encryption, claims.variant, declared)
                thumb = FileBody(entry)
                content_type = normalise_content_type(thumb.content_type)
                name = thumbnail_filename(choose_filename(claims, record, thumb), content_type)
                return Served(thumb, content_type, name)
            renditions = self.renditions
            body = await self.source.open(
                media,
                encryption,
                whole_if=lambda upstream_type, head: (
                    need_file or renditions.strips(upstream_type, head)
                ),
            )
            content_type = choose_content_type(body, record)
            if isinstance(body, FileBody) and renditions.strip_metadata:
                # The bytes decide (relay.media.image_privacy), not the declared type, and a
                # stripped JPEG goes out as image/jpeg whatever it was labelled.
                head = await renditions.head(body.entry)
                if renditions.strips(content_type, head):
                    content_type = handled_type(head) or content_type
                    entry = await renditions.stripped(media, encryption, body.entry, content_type)
                    body = FileBody(entry)
        except (ThumbnailError, RenditionFailed) as e:
            raise to_matrix_error(e) from None
        except FetchError as e:
            raise e.to_matrix_error() from None
        except ValueError:
            # A stored key of the wrong shape: nothing a client can fix, and not a crash.
            log.warning("cannot decrypt %s: stored encryption info is unusable", media)
            raise MatrixError(502, Codes.UNKNOWN, "The media could not be decrypted") from None
        return Served(body, content_type, choose_filename(claims, record, body))

    async def purge(self, media: MediaId) -> None:
        """Forget everything of ``media``: its record, a remembered 404, its files."""
        self._record_memo.discard(media)
        self.source.fetcher.forget_missing(media)
        if self.revalidator is not None:
            self.revalidator.forget(media)
        self.renditions.forget(media)
        await self.source.purge(media)

    async def close(self) -> None:
        """Stop renders, downloads and revocation queries under way."""
        await self.renditions.close()
        await self.source.close()
        await self.revocations.close()
        if self.revalidator is not None:
            await self.revalidator.close()

    async def _references(self, media: MediaId) -> list[MediaRecord]:
        """The live references, remembered for RECORD_TTL seconds ("never seen" too)."""
        remembered = self._record_memo.get(media)
        if remembered is not None:
            return list(remembered)
        records = await database(self._records.media_references(media))
        self._record_memo.put(media, tuple(records))
        return records

"""``media-relay sign -c config.yaml mxc://server/id``: print a signed URL.

The URL alone goes to stdout (so ``$(media-relay sign …)`` works); notes go to stderr.
Like the bridge API, it signs only media the relay has seen in a room it serves and
that was not redacted, which needs the database; ``--force`` skips that check for the
operator who knows better. Every link is recorded in the audit trail (bridge ``cli``);
with ``--force`` and no usable database it is signed anyway, with a warning.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime

from relay.app import key_ring
from relay.cli.common import load_config
from relay.config.settings import Config
from relay.core.exit_codes import EXIT_DATABASE, EXIT_ERROR, EXIT_OK, EXIT_USAGE
from relay.core.minting import LinkMinter, SignedLink
from relay.core.mxc import InvalidMxc, MediaId, parse_mxc
from relay.core.signing import MAX_THUMBNAIL_SIDE
from relay.core.variant import Thumbnail
from relay.store import DatabaseUnusable, Store, open_database
from relay.store.audit import CLI, AuditRow, AuditTrail

MAX_TTL = 365 * 86400


class SignRefused(Exception):
    """Signing was refused for a reason worth one line; ``exit_code`` says which kind."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def cmd_sign(args: argparse.Namespace) -> int:
    """Entry point of ``media-relay sign`` (arguments defined in relay.cli)."""
    try:
        media, ttl, thumbnail = _arguments(args)
        config = load_config(args.config)
        if thumbnail is not None:
            _check_thumbnail_size(thumbnail, config)
        reference = None if args.force else asyncio.run(_check_signable(config, media))
        link = LinkMinter(key_ring(config), config.public.url).mint(
            media,
            ttl or config.signing.ttl,
            filename=args.filename,
            variant=thumbnail,
            reference=reference,
        )
        asyncio.run(
            _audit(config, AuditRow.now(CLI, media, thumbnail, link.expires_at, time.time()))
        )
    except SignRefused as e:
        print(f"media-relay: error: {e}", file=sys.stderr)
        return e.exit_code
    except ValueError as e:
        # What the signing module refuses (a filename of ".", say).
        print(f"media-relay: error: cannot sign: {e}", file=sys.stderr)
        return EXIT_USAGE
    _print(link)
    return EXIT_OK


def _arguments(args: argparse.Namespace) -> tuple[MediaId, int | None, Thumbnail | None]:
    try:
        media = parse_mxc(args.mxc)
    except InvalidMxc as e:
        raise SignRefused(EXIT_USAGE, f"{args.mxc!r}: {e}") from None
    ttl = args.ttl
    if ttl is not None and not 1 <= ttl <= MAX_TTL:
        raise SignRefused(EXIT_USAGE, f"--ttl must be 1-{MAX_TTL} seconds")
    sizes = (args.width, args.height)
    if sizes == (None, None):
        if args.method is not None or args.animated:
            raise SignRefused(EXIT_USAGE, "--method and --animated need --width and --height")
        return media, ttl, None
    if None in sizes:
        raise SignRefused(EXIT_USAGE, "a thumbnail needs both --width and --height")
    if not all(1 <= side <= MAX_THUMBNAIL_SIDE for side in sizes):
        raise SignRefused(EXIT_USAGE, f"--width and --height must be 1-{MAX_THUMBNAIL_SIDE}")
    return media, ttl, Thumbnail(args.width, args.height, args.method or "scale", args.animated)


def _check_thumbnail_size(thumbnail: Thumbnail, config: Config) -> None:
    """The relay renders thumbnails up to ``thumbnails.max_side``: refuse a dead link."""
    max_side = config.thumbnails.max_side
    if max(thumbnail.width, thumbnail.height) > max_side:
        raise SignRefused(
            EXIT_USAGE, f"--width and --height must be 1-{max_side} (thumbnails.max_side)"
        )


async def _check_signable(config: Config, media: MediaId) -> str:
    """The tag of the newest reference the link is bound to; refuses unseen or revoked."""
    try:
        db = await open_database(config.database)
    except DatabaseUnusable as e:
        raise SignRefused(EXIT_DATABASE, f"{e} (--force signs without the database)") from None
    try:
        store = Store(db)
        if await store.is_revoked(media):
            raise SignRefused(EXIT_ERROR, f"{media} was revoked; its links answer 410")
        record = await store.media_record(media)
        if record is None:
            raise SignRefused(
                EXIT_ERROR,
                f"the relay has not seen {media} in a room it serves; "
                "pass --force to sign it anyway",
            )
        return record.tag
    finally:
        await db.stop()


async def _audit(config: Config, row: AuditRow) -> None:
    """Record the link in the audit trail; with --force the database may be unusable."""
    try:
        db = await open_database(config.database)
    except DatabaseUnusable as e:
        print(f"media-relay: warning: not recorded in the audit trail: {e}", file=sys.stderr)
        return
    try:
        await AuditTrail(db).insert([row])
    finally:
        await db.stop()


def _print(link: SignedLink) -> None:
    expires = datetime.fromtimestamp(link.expires_at, UTC).isoformat(timespec="seconds")
    print(link.url)
    print(f"valid until {expires}", file=sys.stderr)

"""``media-relay audit -c config.yaml mxc://server/id``: every link signed for that media.

One JSON object a line, oldest first: ``signed_at``, ``bridge`` (a bridge name, or
``cli`` for ``media-relay sign``), ``mxc``, ``variant`` (``original`` or
``thumb-WxH-method``) and ``expires_at``, times in milliseconds since the epoch. Rows
older than ``signing.audit_retention`` are gone. Nothing signed prints nothing (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from relay.cli.common import load_config
from relay.config.settings import Config
from relay.core.exit_codes import EXIT_DATABASE, EXIT_OK, EXIT_USAGE
from relay.core.mxc import InvalidMxc, MediaId, parse_mxc
from relay.store import DatabaseUnusable, open_database
from relay.store.audit import AuditRow, AuditTrail


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mxc", help="the mxc://server/id whose signed links to list")


def cmd_audit(args: argparse.Namespace) -> int:
    """Entry point of ``media-relay audit``."""
    try:
        media = parse_mxc(args.mxc)
    except InvalidMxc as e:
        print(f"media-relay: error: {args.mxc!r}: {e}", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args.config)
    try:
        rows = asyncio.run(_rows(config, media))
    except DatabaseUnusable as e:
        print(f"media-relay: error: {e}", file=sys.stderr)
        return EXIT_DATABASE
    for row in rows:
        print(json.dumps(row.as_json(), separators=(",", ":")))
    return EXIT_OK


async def _rows(config: Config, media: MediaId) -> list[AuditRow]:
    db = await open_database(config.database)
    try:
        return await AuditTrail(db).for_media(media)
    finally:
        await db.stop()

"""``media-relay revoke -c config.yaml (mxc://server/id | --event ID | --room ID | --sender ID)``.

The operator's take-down lever: revokes the media named, or every media item the
relay saw referenced by an event (and its edits), in a room, or from a sender. It
writes ``revoked_media`` rows (source ``operator``) and nothing else: every relay
process on the database refuses the links (410) within a second and purges its cache
when it next sees a request (:mod:`relay.media.revocation`). One line per media item
on stdout; a malformed argument is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from dataclasses import dataclass

from relay.cli.common import load_config
from relay.config.settings import Config
from relay.core.exit_codes import EXIT_DATABASE, EXIT_ERROR, EXIT_OK, EXIT_USAGE
from relay.core.mxc import InvalidMxc, MediaId, is_valid_server_name, parse_mxc
from relay.store import DatabaseUnusable, open_database
from relay.store.takedown import Revoked, Selector, Takedowns

# Identifier grammars (Matrix spec, Appendices "Identifier Grammar"): a sigil and no
# whitespace; room ids of room version 12 carry no server name, so none is required.
_OPAQUE_ID = re.compile(r"[^\s:]+(:[^\s]+)?")
_USER_ID = re.compile(r"@([^\s:]+):([^\s]+)")
MAX_ID_LENGTH = 255  # spec: identifiers are at most 255 bytes
_EXPECTED = {
    Selector.EVENT: "an event id ($…)",
    Selector.ROOM: "a room id (!…)",
    Selector.SENDER: "a user id (@user:server)",
}


class Refused(Exception):
    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class Target:
    """What to revoke: one media item, or the media referenced by a selector's value."""

    media: MediaId | None
    selector: Selector | None
    value: str

    def describe(self) -> str:
        return f"{self.selector} {self.value}" if self.selector is not None else self.value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mxc", nargs="?", help="the mxc://server/id to revoke")
    parser.add_argument("--event", metavar="EVENT_ID", help="revoke the media of this event")
    parser.add_argument("--room", metavar="ROOM_ID", help="revoke every media item seen in a room")
    parser.add_argument("--sender", metavar="USER_ID", help="revoke every media item a user sent")


def parse_target(args: argparse.Namespace) -> Target:
    """Exactly one selector, well formed; raises Refused (exit 2) with one line otherwise."""
    given = [
        (name, value)
        for name, value in (
            ("mxc", args.mxc),
            ("event", args.event),
            ("room", args.room),
            ("sender", args.sender),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise Refused(EXIT_USAGE, "name exactly one of mxc://server/id, --event, --room, --sender")
    name, value = given[0]
    if name == "mxc":
        try:
            return Target(parse_mxc(value), None, value)
        except InvalidMxc as e:
            raise Refused(EXIT_USAGE, f"{value!r}: {e}") from None
    selector = Selector(name)
    if not _well_formed(selector, value):
        raise Refused(EXIT_USAGE, f"--{name} {value!r}: expected {_EXPECTED[selector]}")
    return Target(None, selector, value)


def _well_formed(selector: Selector, value: str) -> bool:
    if not 1 < len(value.encode()) <= MAX_ID_LENGTH:
        return False
    if selector is Selector.SENDER:
        match = _USER_ID.fullmatch(value)
        return match is not None and is_valid_server_name(match.group(2))
    sigil = "$" if selector is Selector.EVENT else "!"
    return value[0] == sigil and _OPAQUE_ID.fullmatch(value[1:]) is not None


def cmd_revoke(args: argparse.Namespace) -> int:
    """Entry point of ``media-relay revoke`` (arguments from :func:`add_arguments`)."""
    try:
        target = parse_target(args)
        config = load_config(args.config)
        revoked = asyncio.run(_revoke(config, target))
    except Refused as e:
        print(f"media-relay: error: {e}", file=sys.stderr)
        return e.exit_code
    for item in revoked:
        state = "revoked" if item.newly else "already revoked"
        print(f"{state} mxc://{item.media.server_name}/{item.media.media_id}")
    if not revoked:
        print(
            f"media-relay: error: the relay has seen no media of {target.describe()}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_OK


async def _revoke(config: Config, target: Target) -> list[Revoked]:
    try:
        db = await open_database(config.database)
    except DatabaseUnusable as e:
        raise Refused(EXIT_DATABASE, str(e)) from None
    try:
        takedowns = Takedowns(db)
        if target.media is not None:
            return [await takedowns.revoke(target.media)]
        assert target.selector is not None  # parse_target sets one of the two
        return await takedowns.revoke_referenced(target.selector, target.value)
    finally:
        await db.stop()

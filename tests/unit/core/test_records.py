"""Which stored reference a link serves: the one its tag names, else the newest."""

from __future__ import annotations

import pytest

from relay.core.mxc import MediaId
from relay.core.records import MediaRecord, choose_reference, reference_tag

MEDIA = MediaId("example.org", "abc")


def record(event_id: str, filename: str) -> MediaRecord:
    return MediaRecord(MEDIA, "!r:example.org", event_id, "image/png", 1, filename, None)


NEWEST, OLDER = record("$new", "new.png"), record("$old", "old.png")


@pytest.mark.parametrize(
    ("records", "tag", "expected"),
    [
        ([NEWEST, OLDER], None, NEWEST),
        ([NEWEST, OLDER], reference_tag("$old"), OLDER),
        ([NEWEST, OLDER], reference_tag("$new"), NEWEST),
        ([NEWEST], reference_tag("$old"), None),  # its event was redacted: the link is dead
        ([], None, None),
        ([], reference_tag("$old"), None),
    ],
)
def test_choose_reference(
    records: list[MediaRecord], tag: str | None, expected: MediaRecord | None
) -> None:
    """A tag picks its own reference and nothing else; no tag means the newest."""
    assert choose_reference(records, tag) == expected


def test_reference_tags_are_short_distinct_and_url_safe() -> None:
    """16 base64url characters, one per event id, stable across calls."""
    tags = {reference_tag(f"$event{i}:example.org") for i in range(1000)}
    assert len(tags) == 1000
    assert all(len(t) == 16 and t.replace("-", "").replace("_", "").isalnum() for t in tags)
    assert reference_tag("$x") == reference_tag("$x") == record("$x", "x.png").tag

"""Property: event extraction refuses only with MalformedEvent (issue 13, finding 14).

Whole events are generated, top-level fields included (the content-level property is
``test_events.test_arbitrary_content_never_crashes``): any JSON value in any field, and
event-shaped values built from media-like parts (mxc-ish strings, ``info``, ``file``,
thumbnails, edits) so the generator reaches deep into the extractor. Whatever comes
in, ``extract_media`` returns an Extraction or raises MalformedEvent, nothing else.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings

from relay.core.events import (
    Extraction,
    MalformedEvent,
    extract_media,
    redacted_event_id,
    replaced_event_id,
)
from tests.harness.json_strategies import EVENT, JSON


def _extract(event: Any) -> Extraction | None:
    try:
        return extract_media(event)
    except MalformedEvent:
        return None


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(event=EVENT | JSON)
def test_any_event_extracts_or_is_malformed(event: Any) -> None:
    """Any JSON, and any event-shaped JSON: an Extraction or MalformedEvent, never another error."""
    extraction = _extract(event)
    if extraction is not None:
        assert extraction.invalid >= 0
        for ref in extraction.references:
            assert ref.media.server_name and ref.media.media_id
    if isinstance(event, dict):
        # The redaction and edit lookups run on the same events; they must not raise either.
        for found in (redacted_event_id(event), replaced_event_id(event)):
            assert found is None or isinstance(found, str)

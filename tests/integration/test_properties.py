"""Properties of the two listeners under generated input (issue 13, finding 14).

- Any path under the public listener (raw request lines: odd bytes, percent escapes,
  token-shaped segments, real tokens for random media, tampered ones) is answered
  below 500, or 502/504 when a verified link's homeserver could not fetch the media.
- Any body PUT as an appservice transaction (arbitrary JSON, event-shaped JSON, bytes
  that are not JSON) is answered 200 or 4xx: only the relay's own database failing may
  answer 500, and it does not fail here.

A real relay (real Synapse; SQLite and PostgreSQL) runs on a thread of its own; Hypothesis drives it
with blocking requests.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.app import Relay, key_ring
from relay.core.minting import LinkMinter
from relay.core.mxc import MediaId
from relay.core.variant import Thumbnail
from tests.harness.json_strategies import EVENT, JSON
from tests.harness.relay import MakeConfig
from tests.harness.threaded import ThreadedRelay

pytestmark = pytest.mark.synapse

RUN = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def running(make_config: MakeConfig, database_url: str) -> Iterator[ThreadedRelay]:
    """A relay on SQLite, then on PostgreSQL (NUL and surrogates fail differently there)."""
    config = make_config(database=database_url, appservice={"room_namespace": [r"!.*"]})
    with ThreadedRelay(Relay(config)) as threaded:
        yield threaded


def raw_status(url: str, request_line: bytes) -> int:
    """Send one request line (as given) with minimal headers; the status the relay answers."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
        sock.sendall(request_line + b"\r\nHost: relay\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, f"closed without a status line after {request_line[:80]!r}"
            head += chunk
    return int(head.split(b" ", 2)[1])


# ---------------------------------------------------------------- public paths

SEGMENT_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n \x00#?")
SEGMENT = (
    st.text(SEGMENT_CHARS, max_size=30)
    | st.from_regex(r"[0-9]{1,3}\.[A-Za-z0-9_.\-]{0,80}", fullmatch=True)
    | st.sampled_from(["..", ".", "%2e%2e", "%00", "%ff", "%", "%2F", "_relay", "health"])
)
PATH = st.builds(
    lambda prefix, segments: prefix + "/" + "/".join(segments),
    st.sampled_from(["", "/media"]),
    st.lists(SEGMENT, min_size=1, max_size=4),
)
MEDIA = st.builds(
    MediaId,
    # Synapse's own media (404: unknown id) and a remote server it cannot reach (502).
    st.sampled_from(["localhost", "example.invalid"]),
    st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True),
)
VARIANT = st.none() | st.builds(
    Thumbnail,
    st.integers(1, 4000),
    st.integers(1, 4000),
    st.sampled_from(["crop", "scale"]),
)
FILENAME = st.none() | st.text(SEGMENT_CHARS, min_size=1, max_size=40)


@st.composite
def signed_paths(draw: st.DrawFn, minter: LinkMinter) -> str:
    """A real link for random media, variant and filename; sometimes tampered with."""
    try:
        link = minter.mint(
            draw(MEDIA), draw(st.integers(1, 10**6)), filename=draw(FILENAME), variant=draw(VARIANT)
        )
    except ValueError:  # claims the signer refuses (e.g. a filename it cannot carry)
        link = minter.mint(MediaId("localhost", "x"), 60)
    path = urlsplit(link.url).path
    cut = draw(st.sampled_from(["none", "truncate", "flip", "append"]))
    if cut == "truncate":
        path = path[: draw(st.integers(1, len(path)))]
    elif cut == "flip":
        at = draw(st.integers(7, len(path) - 1))
        path = path[:at] + ("A" if path[at] != "A" else "B") + path[at + 1 :]
    elif cut == "append":
        path += draw(st.sampled_from(["/", "/x", "%00", "/../x"]))
    return path


def test_public_paths_never_answer_5xx(running: ThreadedRelay) -> None:
    """Any GET or HEAD of any path on the public listener: no 500, no crash."""
    relay = running.relay
    minter = LinkMinter(key_ring(relay.config), relay.config.public.url)

    @RUN
    @given(
        method=st.sampled_from([b"GET", b"HEAD"]),
        path=PATH | signed_paths(minter),
        escape=st.booleans(),
    )
    def check(method: bytes, path: str, escape: bool) -> None:
        target = quote(path, safe="/%._-~") if escape else path
        status = raw_status(relay.public_url, method + b" " + target.encode() + b" HTTP/1.1")
        # 502/504 are the homeserver's answer for a verified link (remote media it
        # could not fetch), passed on with their meaning; 500 would be the relay's fault.
        assert status < 500 or status in (502, 504), (method, target, status)

    check()


# ---------------------------------------------------------------- transactions

BODY = (
    st.builds(lambda events: {"events": events}, st.lists(EVENT | JSON, max_size=5))
    | st.builds(
        lambda events, extra: {"events": events, **extra},
        JSON,
        st.dictionaries(
            st.sampled_from(["ephemeral", "to_device", "device_lists"]), JSON, max_size=2
        ),
    )
    | JSON
)


def put_transaction(relay: Relay, body: bytes, txn_id: str | None = None) -> int:
    """PUT ``body`` as a transaction (a new id by default); the status (errors: Matrix JSON)."""
    parts = urlsplit(relay.internal_url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.request(
            "PUT",
            f"/_matrix/app/v1/transactions/{txn_id or secrets.token_hex(8)}",
            body=body,
            headers={
                "Authorization": f"Bearer {relay.config.appservice.hs_token}",
                "Content-Type": "application/json",
            },
        )
        response = conn.getresponse()
        payload: Any = json.loads(response.read())
    finally:
        conn.close()
    if response.status != 200:
        assert str(payload["errcode"]).startswith("M_"), payload
    return response.status


def test_transaction_bodies_never_answer_5xx(running: ThreadedRelay) -> None:
    """Any body, JSON or not, event-shaped or not, is answered 200 or 4xx, never 500."""
    relay = running.relay

    @RUN
    @given(
        body=st.one_of(
            BODY.map(lambda value: json.dumps(value, allow_nan=True).encode()),
            st.binary(max_size=200),
        )
    )
    def check(body: bytes) -> None:
        status = put_transaction(relay, body)
        assert status == 200 or 400 <= status < 500, (body[:200], status)

    check()


def test_transaction_ids_never_answer_5xx(running: ThreadedRelay) -> None:
    """Any transaction id (percent-escaped bytes: NUL, invalid UTF-8, slashes) is not a 500."""
    relay = running.relay

    @RUN
    @given(raw=st.binary(min_size=1, max_size=40))
    def check(raw: bytes) -> None:
        txn_id = "".join(f"%{b:02X}" for b in raw)
        status = put_transaction(relay, b'{"events": []}', txn_id)
        assert status == 200 or 400 <= status < 500, (txn_id, status)

    check()

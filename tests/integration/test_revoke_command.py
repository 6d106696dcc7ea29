"""``media-relay revoke``: every selector, across two relay processes on one PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from relay.core.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from relay.core.mxc import MediaId, parse_mxc
from relay.devtools.local_synapse import LocalSynapse, free_ports
from relay.media.downloads import MediaSource
from tests.harness import make_png
from tests.harness.fixtures import RelayPorts, RelayRegistration
from tests.harness.links import errcode, fetch, fetch_each, post_and_sign, run_cli
from tests.harness.matrix_client import MatrixUser
from tests.harness.relay import (
    MakeConfig,
    RelayPair,
    StartRelay,
    on,
    relay_config_dict,
    write_config,
)
from tests.harness.waiting import eventually

pytestmark = pytest.mark.synapse


@pytest.mark.parametrize("selector", ["mxc", "--event", "--room", "--sender"])
async def test_revoke_reaches_every_process_within_a_second(
    relay_pair: RelayPair,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
    selector: str,
) -> None:
    """After the command returns, both relays answer 410 within 1 s and drop their copy."""
    first, second = await relay_pair()
    data = make_png(24, 24, (secrets.randbelow(256), secrets.randbelow(256), 7))
    room_id, mxc, event_id, url = await post_and_sign(
        http_session, first, alice, data, "image/png", "cat.png"
    )
    await fetch_each(http_session, [url, on(second, url, first)], data)

    value = {"mxc": mxc, "--event": event_id, "--room": room_id, "--sender": alice.user_id}
    args = [value[selector]] if selector == "mxc" else [selector, value[selector]]
    code, out, err = await run_cli(tmp_path / "config.yaml", "revoke", *args)
    revoked_at = time.monotonic()
    assert code == EXIT_OK, err
    assert out == f"revoked {mxc}\n"

    for relay in (first, second):
        link = on(relay, url, first)

        async def refused(link: str = link) -> bool:
            return (await fetch(http_session, link))[0] == 410

        await eventually(refused, within=1.0, interval=0.05)
        status, _, body = await fetch(http_session, link)
        assert (status, errcode(body)) == (410, "M_NOT_FOUND")
        assert data not in body
        assert relay.media_source is not None
        assert MediaSource.cache_key(parse_mxc(mxc)) not in relay.media_source.cache
        assert relay.metrics.value("relay_revocations_by_source", {"source": "operator"}) == 1
    assert time.monotonic() - revoked_at < 2.0

    code, out, _ = await run_cli(tmp_path / "config.yaml", "revoke", *args)
    assert (code, out) == (EXIT_OK, f"already revoked {mxc}\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of"),
        (["mxc://localhost/a", "--room", "!r:localhost"], "exactly one of"),
        (["mxc://localhost/../../v3/joined_rooms"], "invalid media id"),
        (["https://localhost/abc"], "must start with mxc://"),
        (["--event", "not-an-event"], "--event 'not-an-event': expected an event id"),
        (["--room", "#alias:localhost"], "expected a room id"),
        (["--room", "!"], "expected a room id"),
        (["--sender", "alice"], "expected a user id (@user:server)"),
        (["--sender", "@alice:bad server"], "expected a user id"),
    ],
)
async def test_malformed_input_is_one_line_and_exit_2(
    make_config: MakeConfig, tmp_path: Path, args: list[str], message: str
) -> None:
    """Bad input exits 2 with one line on stderr, nothing on stdout, and revokes nothing."""
    make_config()
    code, out, err = await run_cli(tmp_path / "config.yaml", "revoke", *args)
    assert (code, out) == (EXIT_USAGE, "")
    assert err.count("\n") == 1 and message in err, err


async def test_nothing_seen_is_an_error(make_config: MakeConfig, tmp_path: Path) -> None:
    """A well-formed selector that matches nothing says so and exits 1 (a typo is visible)."""
    make_config()
    code, out, err = await run_cli(tmp_path / "config.yaml", "revoke", "--event", "$nope")
    assert (code, out) == (EXIT_ERROR, "")
    assert "seen no media of event $nope" in err


async def test_revoke_cuts_downloads_under_way_in_other_processes(
    relay_pair: RelayPair,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A large response that began before the revocation stops short, and the other
    process purges its copy without waiting for another request."""
    first, second = await relay_pair()
    data = secrets.token_bytes(16 * 1024 * 1024)  # far more than the sockets' buffers
    posted = await post_and_sign(
        http_session, first, alice, data, "application/octet-stream", "big.bin"
    )
    mxc, url = posted.mxc, on(second, posted.url, first)
    status, _, body = await fetch(http_session, url)
    assert (status, len(body)) == (200, len(data))  # cached in the second process now

    # A slow client (small receive buffer, ~1 MB/s): the body would take ~16 s.
    target = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (target.hostname, target.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {target.path} HTTP/1.1\r\nHost: {target.netloc}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and f"{len(data)}".encode() in head

    async def read_slowly() -> int:
        received = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(64 * 1024):
                received += len(chunk)
                await asyncio.sleep(0.06)
        return received

    reading = asyncio.create_task(read_slowly())
    await asyncio.sleep(0.5)
    assert not reading.done()
    code, _, err = await run_cli(tmp_path / "config.yaml", "revoke", mxc)
    assert code == EXIT_OK, err
    revoked_at = time.monotonic()
    received = await asyncio.wait_for(reading, 5)
    writer.close()
    assert time.monotonic() - revoked_at < 1.5
    assert received < len(data) / 2, received
    assert second.media_source is not None
    key = MediaSource.cache_key(parse_mxc(mxc))

    async def purged() -> bool:
        assert second.media_source is not None
        return key not in second.media_source.cache

    await eventually(purged, within=1.0, interval=0.05)
    assert second.media_server is not None and len(second.media_server.in_flight) == 0


async def test_revoke_reaches_a_relay_running_as_its_own_process(
    synapse: LocalSynapse,
    relay_registration: RelayRegistration,
    postgres_url: str,
    make_config: MakeConfig,
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The same through a relay started as an operator would (``python -m relay run``)."""
    first = await start_relay(make_config(database=postgres_url))
    workdir = tmp_path / "process"
    workdir.mkdir()
    ports = RelayPorts(*free_ports(2))
    config = write_config(
        workdir / "config.yaml",
        relay_config_dict(synapse, relay_registration, ports, workdir, postgres_url),
    )
    data = make_png(24, 24, (secrets.randbelow(256), 11, secrets.randbelow(256)))
    _, mxc, _, url = await post_and_sign(http_session, first, alice, data, "image/png", "cat.png")
    url = url.replace(f"127.0.0.1:{first.config.public.port}", f"127.0.0.1:{ports.public}")
    with (workdir / "relay.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "run", "-c", str(config), stderr=log
        )
        try:

            async def serving() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    status, _, body = await fetch(http_session, url)
                    return (status, body) == (200, data)
                return False

            await eventually(serving, within=30, interval=0.2)
            code, out, err = await run_cli(tmp_path / "config.yaml", "revoke", mxc)
            assert (code, out) == (EXIT_OK, f"revoked {mxc}\n"), err

            async def refused() -> bool:
                return (await fetch(http_session, url))[0] == 410

            await eventually(refused, within=1.0, interval=0.05)
        finally:
            process.terminate()
            assert await asyncio.wait_for(process.wait(), 30) == EXIT_OK


async def test_a_redaction_ingested_by_one_relay_is_honoured_by_another_at_once(
    relay_pair: RelayPair, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """The relay that did not ingest it refuses the media < 1 s after the one that did."""
    first, second = await relay_pair()
    assert first.revocations is not None and second.revocations is not None
    for _ in range(3):
        data = make_png(16, 16, (secrets.randbelow(256), 3, secrets.randbelow(256)))
        room_id, mxc, event_id, url = await post_and_sign(
            http_session, first, alice, data, "image/png", "cat.png"
        )
        media = parse_mxc(mxc)
        link = on(second, url, first)
        assert (await fetch(http_session, link))[0] == 200  # "not revoked" remembered there
        await alice.redact(room_id, event_id)

        async def ingested_by_first(media: MediaId = media) -> bool:
            assert first.revocations is not None
            return first.revocations.remembered(media) is True

        await eventually(ingested_by_first, within=10, interval=0.001)
        ingested = time.monotonic()
        while second.revocations.remembered(media) is not True:
            assert time.monotonic() - ingested < 1.0
            await asyncio.sleep(0.001)
        assert (await fetch(http_session, link))[0] == 410

"""The public media server end to end: real Synapse, real relay, links from the bridge API."""

from __future__ import annotations

import hashlib
import os
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import pytest

from relay.app import Relay
from relay.core.mxc import MediaId, parse_mxc
from relay.http.headers import security_headers
from relay.media.downloads import MediaSource
from relay.web.public import SMALL_BODY
from tests.harness import make_png
from tests.harness.links import (
    errcode,
    fetch,
    fetch_each,
    post_and_sign,
    post_media,
    sign,
    wait_recorded,
)
from tests.harness.matrix_client import MatrixUser, image_content
from tests.harness.relay import (
    SIGNING_SECRET,
    MakeConfig,
    RelayPair,
    StartRelay,
    on,
)
from tests.harness.rooms import served_room
from tests.harness.waiting import eventually

pytestmark = pytest.mark.synapse

CSP = security_headers()["Content-Security-Policy"]
OTHER_SECRET = "other-signing-secret-" + "o" * 32


def without_prefix(url: str) -> str:
    parts = urlsplit(url)
    path = parts.path.removeprefix("/media")
    return f"{parts.scheme}://{parts.netloc}{path}"


@pytest.fixture
async def relay(start_relay: StartRelay) -> Relay:
    return await start_relay()


async def test_image_round_trip_with_headers(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """An image posted in a room and signed by a bridge is served byte-exact, policy headers set."""
    data = make_png(24, 24)
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    link = await sign(http_session, relay, mxc)
    for attempt in ("first (download)", "second (cache)"):
        status, headers, body = await fetch(http_session, link["url"])
        assert status == 200, attempt
        assert body == data
        assert headers["Content-Type"] == "image/png"
        assert headers["Content-Disposition"] == "inline; filename=cat.png"
        assert headers["Content-Security-Policy"] == CSP
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Accept-Ranges"] == "bytes"
        cache_control = headers["Cache-Control"]
        assert cache_control.startswith("private, max-age=")
        assert 0 < int(cache_control.rpartition("=")[2]) <= relay.config.signing.ttl
    assert headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert headers["Content-Length"] == str(len(data))
    server = relay.media_server
    assert server is not None

    async def sent_whole() -> bool:
        # A small cached file goes out with its headers in one write (a large one by the
        # kernel: test_large_file_is_sent_by_the_kernel), never copied chunk by chunk.
        return server.sender.files_sent_buffered >= 1

    await eventually(sent_whole)
    assert server.sender.files_sent_copied == 0


async def test_large_file_is_sent_by_the_kernel(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """A cached file over SMALL_BODY goes out with sendfile, whole and as a range."""
    data = os.urandom(SMALL_BODY + 4096)
    _, mxc, _ = await post_media(relay, alice, data, "application/pdf", "big.pdf", msgtype="m.file")
    url = (await sign(http_session, relay, mxc))["url"]
    assert (await fetch(http_session, url))[2] == data  # downloads and caches it
    server = relay.media_server
    assert server is not None
    sent_before = server.sender.files_sent_zero_copy
    for _ in range(2):  # the full path, then the remembered answer
        status, headers, body = await fetch(http_session, url)
        assert (status, body) == (200, data)
        assert headers["Content-Length"] == str(len(data))
    status, headers, body = await fetch(http_session, url, Range="bytes=10-")
    assert (status, body) == (206, data[10:])
    assert headers["Content-Range"] == f"bytes 10-{len(data) - 1}/{len(data)}"

    async def sent_by_kernel() -> bool:
        # Counted once the server's sendfile call has returned (after the client has the bytes).
        return server.sender.files_sent_zero_copy >= sent_before + 3

    await eventually(sent_by_kernel)
    assert server.sender.files_sent_copied == 0


async def test_link_works_without_the_prefix(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """The same link answers with and without public.url's path prefix."""
    data = make_png(24, 24)
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    link = await sign(http_session, relay, mxc, filename="cat.png")
    assert urlsplit(link["url"]).path.startswith("/media/")
    status, _, body = await fetch(http_session, without_prefix(link["url"]))
    assert (status, body) == (200, data)


async def test_head_has_headers_and_no_body(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """HEAD answers the GET's status and headers, including the length, without a body."""
    data = make_png(40, 40)
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    link = await sign(http_session, relay, mxc)
    await fetch(http_session, link["url"])  # cache it, so the ETag is known
    status, headers, body = await fetch(http_session, link["url"], "HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(len(data))
    assert headers["Content-Type"] == "image/png"
    assert headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert headers["Content-Security-Policy"] == CSP


async def test_ranges_and_416(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """One byte range → 206 with Content-Range (even before caching); past the end → 416."""
    data = make_png(64, 64)
    size = len(data)
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    url = (await sign(http_session, relay, mxc))["url"]
    cases = [("bytes=2-5", 2, 5), ("bytes=-3", size - 3, size - 1), ("bytes=10-", 10, size - 1)]
    for header, start, end in cases:
        status, headers, body = await fetch(http_session, url, Range=header)
        assert status == 206, header
        assert body == data[start : end + 1]
        assert headers["Content-Range"] == f"bytes {start}-{end}/{size}"
        assert headers["Content-Length"] == str(end - start + 1)
    status, headers, body = await fetch(http_session, url, Range=f"bytes={size}-")
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{size}"
    assert errcode(body) == "M_UNKNOWN"
    assert data not in body
    # Several ranges: the whole body (RFC 9110 allows ignoring Range).
    status, _, body = await fetch(http_session, url, Range="bytes=0-1,4-5")
    assert (status, body) == (200, data)


async def test_if_none_match_is_304(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """If-None-Match with the content-hash ETag (strong or weak) → 304 without a body."""
    data = make_png(24, 24)
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    url = (await sign(http_session, relay, mxc))["url"]
    await fetch(http_session, url)
    tag = f'"{hashlib.sha256(data).hexdigest()}"'
    for value in (tag, f"W/{tag}", f'"other", {tag}'):
        status, headers, body = await fetch(http_session, url, **{"If-None-Match": value})
        assert (status, body) == (304, b""), value
        assert headers["ETag"] == tag
        assert headers["Cache-Control"].startswith("private, max-age=")
    status, _, body = await fetch(http_session, url, **{"If-None-Match": '"other"'})
    assert (status, body) == (200, data)


async def test_tampered_and_unsigned_links_are_403(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """A changed MAC, media id, expiry or filename, or no token at all → 403 M_FORBIDDEN."""
    data = make_png(24, 24)
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    url = (await sign(http_session, relay, mxc, filename="cat.png"))["url"]
    base, token, filename = url.rsplit("/", 2)
    fields = token.split(".")
    flipped_mac = fields[-1][:-1] + ("A" if fields[-1][-1] != "A" else "B")
    tampered = [
        f"{base}/{'.'.join([*fields[:-1], flipped_mac])}/{filename}",
        f"{base}/{'.'.join([*fields[:2], str(int(fields[2]) + 3600), *fields[3:]])}/{filename}",
        f"{base}/{'.'.join([*fields[:5], fields[5] + 'x', fields[6]])}/{filename}",
        f"{base}/{token}/dog.png",
        f"{base}/{token}",
        f"{base}/not-a-token",
        f"{base}/{token[:-4]}/{filename}",
    ]
    for bad in tampered:
        for method in ("GET", "HEAD"):
            status, headers, body = await fetch(http_session, bad, method)
            assert status == 403, (bad, method)
            assert headers["Content-Type"] == "application/json"
            assert headers["Cache-Control"] == "no-store"
            if method == "GET":
                assert errcode(body) == "M_FORBIDDEN"
                assert data not in body
    status, _, body = await fetch(http_session, url)
    assert (status, body) == (200, data)


async def test_one_second_link_expires(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """A link with ttl 1 works, then answers 410 once its second is over."""
    data = make_png(24, 24)
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    link = await sign(http_session, relay, mxc, ttl=1)
    status, _, body = await fetch(http_session, link["url"])
    assert (status, body) == (200, data)

    async def expired() -> tuple[int, bytes] | None:
        status, _, body = await fetch(http_session, link["url"])
        return (status, body) if status != 200 else None

    status, body = await eventually(expired, within=10)
    assert status == 410
    assert errcode(body) == "M_NOT_FOUND"
    assert data not in body


async def test_redaction_is_410_and_purges_the_cache(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """Redacting the event makes every live link answer 410 and removes the cached file."""
    data = make_png(24, 24)
    room_id, mxc, event_id = await post_media(relay, alice, data, "image/png", "cat.png")
    urls = [
        (await sign(http_session, relay, mxc))["url"],
        (await sign(http_session, relay, mxc, filename="other.png"))["url"],
    ]
    for url in urls:
        assert (await fetch(http_session, url))[0] == 200
    assert relay.media_source is not None
    cache = relay.media_source.cache
    key = MediaSource.cache_key(parse_mxc(mxc))
    entry = cache.lookup(key)
    assert entry is not None and entry.path.exists()

    await alice.redact(room_id, event_id)

    async def revoked() -> bool:
        return (await fetch(http_session, urls[0]))[0] == 410

    await eventually(revoked)
    for url in urls:
        status, _, body = await fetch(http_session, url)
        assert status == 410
        assert errcode(body) == "M_NOT_FOUND"
        assert data not in body
    assert key not in cache
    assert not entry.path.exists()


async def test_key_rotation(
    make_config: MakeConfig,
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
) -> None:
    """A new first key signs while old links stay valid; removing the old key kills its links."""
    old_key = {"id": "k1", "secret": SIGNING_SECRET}
    new_key = {"id": "k2", "secret": OTHER_SECRET}
    relay = await start_relay(make_config(signing={"keys": [old_key]}))
    data = make_png(24, 24)
    _, mxc, _ = await post_media(relay, alice, data, "image/png", "cat.png")
    old_url = (await sign(http_session, relay, mxc))["url"]
    await relay.stop()

    relay = await start_relay(make_config(signing={"keys": [new_key, old_key]}))
    new_url = (await sign(http_session, relay, mxc))["url"]
    assert new_url.rsplit("/", 1)[1].split(".")[1] == "k2"
    for url in (old_url, new_url):
        status, _, body = await fetch(http_session, url)
        assert (status, body) == (200, data)
    await relay.stop()

    relay = await start_relay(make_config(signing={"keys": [new_key]}))
    status, _, body = await fetch(http_session, old_url)
    assert status == 403
    assert errcode(body) == "M_FORBIDDEN"
    status, _, body = await fetch(http_session, new_url)
    assert (status, body) == (200, data)


@pytest.mark.parametrize(
    ("content_type", "data", "filename"),
    [
        ("text/html", b"<html><script>alert(document.cookie)</script></html>", "page.html"),
        (
            "image/svg+xml",
            b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
            "drawing.svg",
        ),
    ],
)
async def test_active_content_is_an_attachment_with_csp(
    relay: Relay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    content_type: str,
    data: bytes,
    filename: str,
) -> None:
    """HTML and SVG uploads are served as attachments, sandboxed by the CSP, with nosniff."""
    _, mxc, _ = await post_media(relay, alice, data, content_type, filename, msgtype="m.file")
    url = (await sign(http_session, relay, mxc))["url"]
    status, headers, body = await fetch(http_session, url)
    assert (status, body) == (200, data)
    assert headers["Content-Disposition"] == f"attachment; filename={filename}"
    assert headers["Content-Security-Policy"] == CSP
    assert headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    ("filename", "disposition"),
    [
        ("ascii.bin", "attachment; filename=ascii.bin"),
        ("name with spaces.bin", "attachment; filename*=utf-8''name%20with%20spaces.bin"),
        ("name;with;semicolons.bin", "attachment; filename*=utf-8''name%3Bwith%3Bsemicolons.bin"),
        ("\N{GRINNING FACE}.bin", "attachment; filename*=utf-8''%F0%9F%98%80.bin"),
        ("../../etc/evil.bin", "attachment; filename=evil.bin"),
    ],
)
async def test_filenames_survive(
    relay: Relay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
    filename: str,
    disposition: str,
) -> None:
    """Filenames reach Content-Disposition intact (token or RFC 5987), path components removed."""
    data = b"\x00\x01binary\xff" * 10
    _, mxc, _ = await post_media(
        relay, alice, data, "application/octet-stream", filename, msgtype="m.file"
    )
    signed_name = await sign(http_session, relay, mxc, filename=filename)
    assert unquote(signed_name["url"].rsplit("/", 1)[1]) == filename
    assert signed_name["url"].endswith("/" + quote(filename, safe=""))
    from_event = await sign(http_session, relay, mxc)
    for url in (signed_name["url"], from_event["url"]):
        status, headers, body = await fetch(http_session, url)
        assert (status, body) == (200, data)
        assert headers["Content-Disposition"] == disposition


async def test_missing_media_is_404(
    relay: Relay, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """Media that the homeserver does not have → 404 M_NOT_FOUND."""
    room_id = await served_room(relay, alice)
    mxc = f"mxc://{alice.server_name}/NoSuchMediaAnywhere42"
    await alice.send_message(room_id, image_content(mxc))
    await wait_recorded(relay, mxc)
    url = (await sign(http_session, relay, mxc))["url"]
    for method in ("GET", "HEAD"):
        status, headers, _ = await fetch(http_session, url, method)
        assert status == 404
        assert headers["Cache-Control"] == "no-store"
    assert errcode((await fetch(http_session, url))[2]) == "M_NOT_FOUND"


async def test_media_not_yet_uploaded_is_504_with_retry_after(
    make_config: MakeConfig,
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
) -> None:
    """An upstream failure (media created but never uploaded) → 504 with Retry-After."""
    relay = await start_relay(make_config(media={"read_timeout": 1}))
    created = await alice.request("POST", "/_matrix/media/v1/create")
    mxc = str(created["content_uri"])
    room_id = await served_room(relay, alice)
    await alice.send_message(room_id, image_content(mxc))
    await wait_recorded(relay, mxc)
    url = (await sign(http_session, relay, mxc))["url"]
    status, headers, body = await fetch(http_session, url)
    assert status == 504
    assert int(headers["Retry-After"]) >= 1
    assert errcode(body) == "M_UNKNOWN"


async def test_too_large_media_is_502(
    make_config: MakeConfig,
    start_relay: StartRelay,
    alice: MatrixUser,
    http_session: aiohttp.ClientSession,
) -> None:
    """Media over media.max_size → 502 M_TOO_LARGE, and nothing is cached."""
    relay = await start_relay(make_config(media={"max_size": "1K"}))
    data = b"x" * 4096
    _, mxc, _ = await post_media(relay, alice, data, "application/octet-stream", "big.bin")
    url = (await sign(http_session, relay, mxc))["url"]
    status, _, body = await fetch(http_session, url)
    assert status == 502
    assert errcode(body) == "M_TOO_LARGE"
    assert relay.media_source is not None
    assert MediaSource.cache_key(parse_mxc(mxc)) not in relay.media_source.cache


@pytest.mark.parametrize(
    "path",
    [
        "/media/..",
        "/media/%00",
        "/media/1.k1.9.o.localhost.x.AAAA",
        "/media/" + "1." * 600,
        "/media/1.k1.99999999999.o.localhost.abc.AAAAAAAAAAAAAAAAAAAAAAAA/%FF%FE",
        "/media/1.k1.99999999999.o.localhost.abc.AAAAAAAAAAAAAAAAAAAAAAAA/.",
        "/media/1.k1.99999999999.c0x0.localhost.abc.AAAAAAAAAAAAAAAAAAAAAAAA",
        "/media/1.zz.1.o.localhost.abc.AAAAAAAAAAAAAAAAAAAAAAAA",
        "/1.k1.1.o._d_d.abc.AAAAAAAAAAAAAAAAAAAAAAAA",
        "/media/1.k1.1.o.a_lb_r.abc.AAAAAAAAAAAAAAAAAAAAAAAA?x=%00",
    ],
)
async def test_garbage_links_never_500(
    relay: Relay, http_session: aiohttp.ClientSession, path: str
) -> None:
    """Malformed links answer 403 (or 404 for non-links), never 500, with Matrix JSON."""
    status, headers, body = await fetch(http_session, relay.public_url + path)
    assert status in (403, 404), path
    assert headers["Content-Type"] == "application/json"
    assert errcode(body) in ("M_FORBIDDEN", "M_UNRECOGNIZED")


async def test_revocation_reaches_another_process_sharing_postgres(
    relay_pair: RelayPair, alice: MatrixUser, http_session: aiohttp.ClientSession
) -> None:
    """Two relays on one PostgreSQL: a redaction ingested by one stops the other within ~1 s."""
    first, second = await relay_pair()

    data = make_png(24, 24)
    room_id, mxc, event_id, url = await post_and_sign(
        http_session, first, alice, data, "image/png", "cat.png"
    )
    second_url = on(second, url, first)
    assert second_url != url
    await fetch_each(http_session, [url, second_url], data)

    await alice.redact(room_id, event_id)
    assert first.store is not None
    media = parse_mxc(mxc)

    async def committed() -> bool:
        assert first.store is not None
        return await first.store.is_revoked(media)

    await eventually(committed)

    async def second_refuses() -> bool:
        return (await fetch(http_session, second_url))[0] == 410

    await eventually(second_refuses, within=1.5, interval=0.05)
    assert second.media_source is not None
    assert MediaSource.cache_key(MediaId(media.server_name, media.media_id)) not in (
        second.media_source.cache
    )

"""Tests for relay.events: event JSON → media references, redactions, rewriting."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ruamel.yaml import YAML

from relay.core.attachment_keys import EncryptionInfo
from relay.core.events import (
    Extraction,
    MalformedEvent,
    MediaReference,
    Role,
    extract_from_content,
    extract_media,
    redacted_event_id,
)
from relay.core.mxc import MediaId
from relay.core.rewrite import rewrite_content

SPEC_EXAMPLES = Path(__file__).parent / "data" / "events" / "spec"

KEY = bytes(range(32))
IV = bytes(range(8)) + bytes(8)  # the low 64 bits of the counter block start at zero
SHA256 = hashlib.sha256(b"ciphertext").digest()
THUMB_KEY = bytes(range(100, 132))
THUMB_IV = bytes(range(50, 58)) + bytes(8)
THUMB_SHA256 = hashlib.sha256(b"thumbnail ciphertext").digest()


# --- helpers ------------------------------------------------------------------------------


def _load_example(path: Path) -> dict[str, Any]:
    """Load a spec example (JSON in .yaml files), resolving its "$ref" chain."""
    data: dict[str, Any] = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    ref = data.pop("$ref", None)
    if ref is None:
        return data
    base = _load_example(path.parent / ref)
    base.update(data)
    return base


def _unpadded(data: bytes, *, urlsafe: bool = False) -> str:
    encoded = base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)
    return encoded.decode().rstrip("=")


def _encrypted_file(
    url: str, key: bytes = KEY, iv: bytes = IV, sha256: bytes = SHA256
) -> dict[str, Any]:
    """A valid EncryptedFile as the spec describes it."""
    return {
        "url": url,
        "key": {
            "kty": "oct",
            "key_ops": ["encrypt", "decrypt"],
            "alg": "A256CTR",
            "k": _unpadded(key, urlsafe=True),
            "ext": True,
        },
        "iv": _unpadded(iv),
        "hashes": {"sha256": _unpadded(sha256)},
        "v": "v2",
    }


def _event(event_type: str, content: Any, **extra: Any) -> dict[str, Any]:
    return {
        "type": event_type,
        "event_id": "$event:example.org",
        "room_id": "!room:example.org",
        "sender": "@alice:example.org",
        "origin_server_ts": 1432735824653,
        "content": content,
        **extra,
    }


def _summary(extraction: Extraction) -> list[tuple[Any, ...]]:
    """References as comparable tuples (without encryption)."""
    return [
        (
            str(ref.media),
            ref.role,
            ref.path,
            ref.mimetype,
            ref.size,
            ref.width,
            ref.height,
            ref.filename,
        )
        for ref in extraction.references
    ]


def _media(uri: str) -> MediaId:
    server, _, media_id = uri.removeprefix("mxc://").partition("/")
    return MediaId(server, media_id)


def _resolve(content: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        content = content[part]
    return content


C, T, A = Role.CONTENT, Role.THUMBNAIL, Role.AVATAR


# --- the spec's own examples ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        (
            "m.room.message$m.image.yaml",
            [
                ("mxc://example.org/JWEIFJgwEIhweiWJE", C, ("url",), "image/jpeg", 31037, 394,
                 398, "filename.jpg"),
            ],
        ),
        (
            "m.room.message$m.file.yaml",
            [
                ("mxc://example.org/FHyPlCeYUSFFxlgbQYZmoEoe", C, ("url",), "application/msword",
                 46144, None, None, "something-important.doc"),
            ],
        ),
        (
            "m.room.message$m.video.yaml",
            [
                ("mxc://example.org/a526eYUSFFxlgbQYZmo442", C, ("url",), "video/mp4", 1563685,
                 480, 320, "Gangnam Style"),
                ("mxc://example.org/FHyPlCeYUSFFxlgbQYZmoEoe", T, ("info", "thumbnail_url"),
                 "image/jpeg", 46144, 300, 300, None),
            ],
        ),
        (
            "m.room.message$m.audio.yaml",
            [
                ("mxc://example.org/ffed755USFFxlgbQYZGtryd", C, ("url",), "audio/mpeg", 1563685,
                 None, None, "Bee Gees - Stayin' Alive"),
            ],
        ),
        (
            # A sticker's body is a description, not a file name; the thumbnail is the
            # same media as the sticker and is still reported under its own path.
            "m.sticker.yaml",
            [
                ("mxc://matrix.org/sHhqkFCvSkFwtmvtETOtKnLP", C, ("url",), "image/png", 73602,
                 140, 200, None),
                ("mxc://matrix.org/sHhqkFCvSkFwtmvtETOtKnLP", T, ("info", "thumbnail_url"),
                 "image/png", 73602, 140, 200, None),
            ],
        ),
        (
            "m.room.member.yaml",
            [
                ("mxc://example.org/SEsfnsuifSDFSSEF", A, ("avatar_url",), None, None, None, None,
                 None),
            ],
        ),
    ],
)  # fmt: skip
def test_spec_examples(example: str, expected: list[tuple[Any, ...]]) -> None:
    """Every media example of the spec yields exactly its references and metadata."""
    extraction = extract_media(_load_example(SPEC_EXAMPLES / example))
    assert _summary(extraction) == expected
    assert extraction.invalid == 0
    assert all(ref.encryption is None for ref in extraction.references)


def test_spec_encrypted_image_example() -> None:
    """The spec's encrypted-attachment example yields the file and thumbnail with their keys."""
    event = _load_example(SPEC_EXAMPLES / "m.room.message$encrypted-image.json")
    extraction = extract_media(event)
    assert extraction.invalid == 0
    assert _summary(extraction) == [
        ("mxc://example.org/FHyPlCeYUSFFxlgbQYZmoEoe", C, ("file",), "image/jpeg", 422018, 864,
         1536, "something-important.jpg"),
        ("mxc://example.org/pmVJxyxGlmxHposwVSlOaEOv", T, ("info", "thumbnail_file"),
         "image/jpeg", 211009, 432, 768, None),
    ]  # fmt: skip
    file_enc, thumb_enc = (ref.encryption for ref in extraction.references)
    assert file_enc == EncryptionInfo(
        key=base64.urlsafe_b64decode("aWF6-32KGYaC3A_FEUCk1Bt0JA37zP0wrStgmdCaW-0="),
        iv=base64.b64decode("w+sE15fzSc0AAAAAAAAAAA=="),
        sha256=base64.b64decode("fdSLu/YkRx3Wyh3KQabP3rd6+SFiKg5lsJZQHtkSAYA="),
    )
    assert thumb_enc == EncryptionInfo(
        key=base64.urlsafe_b64decode("RMyd6zhlbifsACM1DXkCbioZ2u0SywGljTH8JmGcylg="),
        iv=base64.b64decode("U+k7PfwLr6UAAAAAAAAAAA=="),
        sha256=base64.b64decode("/NogKqW5bz/m8xHgFiH5haFGjCNVmUIPLzfvOhHdrxY="),
    )


# --- encrypted attachments ------------------------------------------------------------------


def test_encrypted_file_and_thumbnail() -> None:
    """`file` and `info.thumbnail_file` give content and thumbnail references with key material."""
    content = {
        "msgtype": "m.video",
        "body": "clip.mp4",
        "file": _encrypted_file("mxc://example.org/video"),
        "info": {
            "mimetype": "video/mp4",
            "size": 1000,
            "w": 640,
            "h": 480,
            "thumbnail_file": _encrypted_file(
                "mxc://example.org/thumb", THUMB_KEY, THUMB_IV, THUMB_SHA256
            ),
            "thumbnail_info": {"mimetype": "image/png", "size": 50, "w": 64, "h": 48},
        },
    }
    extraction = extract_from_content(content, "m.room.message")
    assert extraction.references == (
        MediaReference(
            _media("mxc://example.org/video"), C, ("file",), "video/mp4", 1000, 640, 480,
            "clip.mp4", EncryptionInfo(KEY, IV, SHA256),
        ),
        MediaReference(
            _media("mxc://example.org/thumb"), T, ("info", "thumbnail_file"), "image/png", 50, 64,
            48, None, EncryptionInfo(THUMB_KEY, THUMB_IV, THUMB_SHA256),
        ),
    )  # fmt: skip
    assert extraction.invalid == 0


@pytest.mark.parametrize(
    "padded",
    [
        pytest.param({"iv": _unpadded(IV) + "=="}, id="padded-iv"),
        pytest.param({"hashes": {"sha256": _unpadded(SHA256) + "="}}, id="padded-sha256"),
        pytest.param({"key_ops": ["decrypt"]}, id="decrypt-only"),
        pytest.param({"ext": None}, id="no-ext"),
    ],
)
def test_encrypted_file_tolerated_variations(padded: dict[str, Any]) -> None:
    """Padded Base64 (the appendix asks decoders to accept it) and a decrypt-only JWK pass."""
    file = _encrypted_file("mxc://example.org/ok")
    for key, value in padded.items():
        if key in ("key_ops", "ext"):
            if value is None:
                del file["key"][key]
            else:
                file["key"][key] = value
        else:
            file[key] = value
    extraction = extract_from_content({"msgtype": "m.file", "body": "a", "file": file})
    assert extraction.invalid == 0
    assert [ref.encryption for ref in extraction.references] == [EncryptionInfo(KEY, IV, SHA256)]


def _bad_file(mutate: Any) -> dict[str, Any]:
    file = _encrypted_file("mxc://example.org/secret")
    mutate(file)
    return file


BAD_ENCRYPTED_FILES = [
    pytest.param(_bad_file(lambda f: f.update(v="v1")), id="v1"),
    pytest.param(_bad_file(lambda f: f.update(v=2)), id="v-not-string"),
    pytest.param(_bad_file(lambda f: f.pop("v")), id="no-v"),
    pytest.param(_bad_file(lambda f: f.pop("url")), id="no-url"),
    pytest.param(_bad_file(lambda f: f.update(url="mxc://example.org/../x")), id="bad-url"),
    pytest.param(_bad_file(lambda f: f.update(key="k")), id="key-not-object"),
    pytest.param(_bad_file(lambda f: f.pop("key")), id="no-key"),
    pytest.param(_bad_file(lambda f: f["key"].update(kty="RSA")), id="wrong-kty"),
    pytest.param(_bad_file(lambda f: f["key"].update(alg="A128CTR")), id="wrong-alg"),
    pytest.param(_bad_file(lambda f: f["key"].pop("alg")), id="no-alg"),
    pytest.param(_bad_file(lambda f: f["key"].update(key_ops=["encrypt"])), id="no-decrypt"),
    pytest.param(_bad_file(lambda f: f["key"].update(key_ops="decrypt")), id="key-ops-string"),
    pytest.param(
        _bad_file(lambda f: f["key"].update(k=_unpadded(KEY[:16], urlsafe=True))), id="short-key"
    ),
    pytest.param(
        _bad_file(lambda f: f["key"].update(k=_unpadded(KEY + b"x", urlsafe=True))), id="long-key"
    ),
    pytest.param(_bad_file(lambda f: f["key"].update(k="!!not base64!!")), id="key-not-base64"),
    pytest.param(
        # URL-safe Base64 is required for JWK "k"; "+" and "/" belong to the other alphabet.
        _bad_file(lambda f: f["key"].update(k="+/" + _unpadded(KEY, urlsafe=True)[2:])),
        id="key-wrong-alphabet",
    ),
    pytest.param(_bad_file(lambda f: f["key"].update(k=12)), id="key-not-string"),
    pytest.param(_bad_file(lambda f: f["key"].update(k=_unpadded(KEY)[:-1] + "A===")), id="pad3"),
    pytest.param(_bad_file(lambda f: f.update(iv=_unpadded(IV[:8]))), id="short-iv"),
    pytest.param(_bad_file(lambda f: f.update(iv="w+sE15fzSc0AAAAAAAAAA")), id="iv-bad-length"),
    pytest.param(
        _bad_file(lambda f: f.update(iv="w+sE15fzSc0AAAAAAAAA\u00e9A")), id="iv-non-ascii"
    ),
    pytest.param(_bad_file(lambda f: f.pop("iv")), id="no-iv"),
    pytest.param(_bad_file(lambda f: f.pop("hashes")), id="no-hashes"),
    pytest.param(_bad_file(lambda f: f.update(hashes=[])), id="hashes-not-object"),
    pytest.param(_bad_file(lambda f: f["hashes"].pop("sha256")), id="no-sha256"),
    pytest.param(
        _bad_file(lambda f: f["hashes"].update(sha256=_unpadded(SHA256[:20]))), id="short-sha256"
    ),
    pytest.param("mxc://example.org/secret", id="file-is-a-string"),
    pytest.param(None, id="file-is-null"),
]


@pytest.mark.parametrize("bad", BAD_ENCRYPTED_FILES)
def test_invalid_encrypted_file_is_counted_and_dropped(bad: Any) -> None:
    """A bad EncryptedFile counts as invalid, is not returned, and its valid sibling is kept."""
    content = {
        "msgtype": "m.image",
        "body": "a.png",
        "file": bad,
        "info": {"thumbnail_url": "mxc://example.org/thumb"},
    }
    extraction = extract_from_content(content, "m.room.message")
    assert extraction.invalid == 1
    assert _summary(extraction) == [
        ("mxc://example.org/thumb", T, ("info", "thumbnail_url"), None, None, None, None, None)
    ]


@pytest.mark.parametrize("bad", BAD_ENCRYPTED_FILES)
def test_invalid_encrypted_thumbnail_is_counted_and_dropped(bad: Any) -> None:
    """A bad `thumbnail_file` counts as invalid while the main `file` is still returned."""
    content = {
        "msgtype": "m.image",
        "body": "a.png",
        "file": _encrypted_file("mxc://example.org/main"),
        "info": {"thumbnail_file": bad},
    }
    extraction = extract_from_content(content, "m.room.message")
    assert extraction.invalid == 1
    assert [(str(r.media), r.path) for r in extraction.references] == [
        ("mxc://example.org/main", ("file",))
    ]


# --- bad mxc URIs ---------------------------------------------------------------------------

BAD_MXCS = [
    pytest.param("mxc://example.org/../../v3/joined_rooms", id="traversal"),
    pytest.param("mxc://example.org/abc/def", id="extra-segment"),
    pytest.param("mxc://example.org/abc%2F..", id="percent"),
    pytest.param("mxc://example.org/", id="empty-media-id"),
    pytest.param("mxc://example.org", id="no-media-id"),
    pytest.param("mxc:///abc", id="empty-server"),
    pytest.param("mxc://exa mple.org/abc", id="space-in-server"),
    pytest.param("mxc://example.org:99999/abc", id="bad-port"),
    pytest.param("https://example.org/abc", id="not-mxc"),
    pytest.param("MXC://example.org/abc", id="uppercase-scheme"),
    pytest.param("mxc://example.org/abc?x=1", id="query"),
    pytest.param("", id="empty-string"),
    pytest.param(42, id="int"),
    pytest.param(True, id="bool"),
    pytest.param(None, id="null"),
    pytest.param(["mxc://example.org/abc"], id="list"),
    pytest.param({"url": "mxc://example.org/abc"}, id="object"),
]


@pytest.mark.parametrize("bad", BAD_MXCS)
def test_bad_url_is_invalid_and_sibling_kept(bad: Any) -> None:
    """A bad `url` is counted, never returned, and the thumbnail beside it is still returned."""
    content = {
        "msgtype": "m.image",
        "body": "a.png",
        "url": bad,
        "info": {"thumbnail_url": "mxc://example.org/thumb"},
    }
    extraction = extract_media(_event("m.room.message", content))
    assert extraction.invalid == 1
    assert [(str(r.media), r.role, r.path) for r in extraction.references] == [
        ("mxc://example.org/thumb", T, ("info", "thumbnail_url"))
    ]


@pytest.mark.parametrize("bad", BAD_MXCS)
def test_bad_thumbnail_url_is_invalid_and_sibling_kept(bad: Any) -> None:
    """A bad `info.thumbnail_url` is counted, never returned, and the main `url` is kept."""
    content = {
        "msgtype": "m.image",
        "body": "a.png",
        "url": "mxc://example.org/main",
        "info": {"thumbnail_url": bad},
    }
    extraction = extract_media(_event("m.room.message", content))
    assert extraction.invalid == 1
    assert [(str(r.media), r.path) for r in extraction.references] == [
        ("mxc://example.org/main", ("url",))
    ]


@pytest.mark.parametrize("bad", [p for p in BAD_MXCS if p.values[0] not in ("", None)])
def test_bad_avatar_url_is_invalid(bad: Any) -> None:
    """A bad member `avatar_url` is counted and no reference is returned."""
    extraction = extract_media(_event("m.room.member", {"membership": "join", "avatar_url": bad}))
    assert extraction == Extraction(references=(), invalid=1)


# --- avatars --------------------------------------------------------------------------------


def test_room_avatar() -> None:
    """`m.room.avatar` gives an avatar reference with its `info`, and its thumbnail."""
    content = {
        "url": "mxc://example.org/roomavatar",
        "info": {
            "mimetype": "image/png",
            "size": 2048,
            "w": 128,
            "h": 96,
            "thumbnail_url": "mxc://example.org/roomthumb",
            "thumbnail_info": {"mimetype": "image/jpeg", "size": 100, "w": 32, "h": 24},
        },
    }
    extraction = extract_media(_event("m.room.avatar", content, state_key=""))
    assert _summary(extraction) == [
        ("mxc://example.org/roomavatar", A, ("url",), "image/png", 2048, 128, 96, None),
        ("mxc://example.org/roomthumb", T, ("info", "thumbnail_url"), "image/jpeg", 100, 32, 24,
         None),
    ]  # fmt: skip
    assert extraction.invalid == 0


@pytest.mark.parametrize(
    ("event_type", "content"),
    [
        pytest.param("m.room.member", {"membership": "join", "avatar_url": ""}, id="member-empty"),
        pytest.param("m.room.member", {"membership": "join", "avatar_url": None}, id="member-null"),
        pytest.param("m.room.member", {"membership": "join"}, id="member-absent"),
        pytest.param("m.room.avatar", {"url": ""}, id="room-avatar-empty"),
        pytest.param("m.room.avatar", {}, id="room-avatar-cleared"),
    ],
)
def test_avatar_removal_is_not_invalid(event_type: str, content: dict[str, Any]) -> None:
    """Removing an avatar ("" / null / absent) yields no reference and is not counted invalid."""
    assert extract_media(_event(event_type, content)) == Extraction(references=(), invalid=0)


# --- edits ----------------------------------------------------------------------------------


def _edit(rel_type: str | None) -> dict[str, Any]:
    content: dict[str, Any] = {
        "msgtype": "m.image",
        "body": "* old.png",
        "url": "mxc://example.org/fallback",
        "m.new_content": {
            "msgtype": "m.image",
            "body": "new.png",
            "url": "mxc://example.org/new",
            "info": {
                "mimetype": "image/webp",
                "thumbnail_file": _encrypted_file("mxc://example.org/newthumb"),
                "thumbnail_info": {"mimetype": "image/png"},
            },
        },
    }
    if rel_type is not None:
        content["m.relates_to"] = {"rel_type": rel_type, "event_id": "$original:example.org"}
    return content


def test_edit_yields_new_content_references() -> None:
    """An m.replace edit yields the fallback's and `m.new_content`'s references, paths prefixed."""
    extraction = extract_media(_event("m.room.message", _edit("m.replace")))
    assert _summary(extraction) == [
        ("mxc://example.org/fallback", C, ("url",), None, None, None, None, "* old.png"),
        ("mxc://example.org/new", C, ("m.new_content", "url"), "image/webp", None, None, None,
         "new.png"),
        ("mxc://example.org/newthumb", T, ("m.new_content", "info", "thumbnail_file"),
         "image/png", None, None, None, None),
    ]  # fmt: skip
    assert extraction.references[2].encryption == EncryptionInfo(KEY, IV, SHA256)


@pytest.mark.parametrize("rel_type", [None, "m.thread", "m.annotation"])
def test_new_content_ignored_without_replace_relation(rel_type: str | None) -> None:
    """`m.new_content` only counts when the event is an `m.replace` edit."""
    extraction = extract_media(_event("m.room.message", _edit(rel_type)))
    assert [str(r.media) for r in extraction.references] == ["mxc://example.org/fallback"]


def test_invalid_reference_in_new_content_is_counted() -> None:
    """A bad mxc inside `m.new_content` is counted while the fallback reference is kept."""
    content = _edit("m.replace")
    content["m.new_content"] = {"msgtype": "m.file", "body": "x", "url": "mxc://e.org/a/../b"}
    extraction = extract_from_content(content, "m.room.message")
    assert extraction.invalid == 1
    assert [str(r.media) for r in extraction.references] == ["mxc://example.org/fallback"]


# --- event types and shapes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_type", "content", "expected"),
    [
        pytest.param(
            None,
            {"avatar_url": "mxc://example.org/av", "displayname": "A"},
            [("mxc://example.org/av", A, ("avatar_url",), None, None, None, None, None)],
            id="shape-avatar",
        ),
        pytest.param(
            None,
            {"msgtype": "m.image", "body": "x.png", "url": "mxc://example.org/img"},
            [("mxc://example.org/img", C, ("url",), None, None, None, None, "x.png")],
            id="shape-image",
        ),
        pytest.param(
            None,
            {"info": {"thumbnail_url": "mxc://example.org/t"}},
            [("mxc://example.org/t", T, ("info", "thumbnail_url"), None, None, None, None, None)],
            id="shape-thumbnail-only",
        ),
        pytest.param(
            "m.room.message",
            {"msgtype": "m.text", "body": "look", "url": "mxc://example.org/x"},
            [("mxc://example.org/x", C, ("url",), None, None, None, None, None)],
            id="other-msgtype-with-url",
        ),
        pytest.param(
            "m.room.message",
            {"msgtype": "org.example.custom", "body": "b", "filename": "f.bin",
             "url": "mxc://example.org/x"},
            [("mxc://example.org/x", C, ("url",), None, None, None, None, "f.bin")],
            id="custom-msgtype-with-filename",
        ),
        pytest.param(
            "org.example.custom",
            {"url": "mxc://example.org/x"},
            [("mxc://example.org/x", C, ("url",), None, None, None, None, None)],
            id="unknown-type-with-url",
        ),
        pytest.param("org.example.custom", {"key": "value"}, [], id="unknown-type-no-media"),
        pytest.param(
            "m.room.message", {"msgtype": "m.text", "body": "mxc://example.org/x"}, [],
            id="text-mentioning-mxc",
        ),
    ],
)  # fmt: skip
def test_event_types_and_shapes(
    event_type: str | None, content: dict[str, Any], expected: list[tuple[Any, ...]]
) -> None:
    """Roles follow the event type, or the content's shape when no type is given."""
    extraction = extract_from_content(content, event_type)
    assert _summary(extraction) == expected
    assert extraction.invalid == 0


def test_encrypted_event_has_no_references() -> None:
    """An `m.room.encrypted` event (opaque ciphertext) yields nothing."""
    content = {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7U"}
    event = _event("m.room.encrypted", content)
    assert extract_media(event) == Extraction(references=(), invalid=0)


# --- field validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (31037, 31037),
        (2**31 - 1, 2**31 - 1),
        (2**53, None),
        (-1, None),
        (True, None),
        (False, None),
        (1.5, None),
        (100.0, None),
        ("100", None),
        (None, None),
        ([1], None),
    ],
)
def test_numeric_fields_validated(value: Any, expected: int | None) -> None:
    """`size`, `w`, `h` (and thumbnail_info's) keep only non-negative JSON integers.

    (Sizes up to 2**53 - 1 and sides up to 2**31 - 1: see test_unstorable_metadata_…)
    """
    info = {"size": value, "w": value, "h": value, "thumbnail_url": "mxc://example.org/t",
            "thumbnail_info": {"size": value, "w": value, "h": value}}  # fmt: skip
    content = {"msgtype": "m.image", "body": "a", "url": "mxc://example.org/a", "info": info}
    for ref in extract_from_content(content, "m.room.message").references:
        assert (ref.size, ref.width, ref.height) == (expected, expected, expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("image/png", "image/png"),
        ("x" * 255, "x" * 255),
        ("x" * 256, None),
        ("", None),
        (5, None),
        (None, None),
        (["image/png"], None),
    ],
)
def test_mimetype_validated(value: Any, expected: str | None) -> None:
    """A mimetype must be a non-empty string of at most 255 characters."""
    content = {"msgtype": "m.file", "body": "a", "url": "mxc://example.org/a",
               "info": {"mimetype": value}}  # fmt: skip
    (ref,) = extract_from_content(content, "m.room.message").references
    assert ref.mimetype == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"body": "photo.jpg"}, "photo.jpg", id="body"),
        pytest.param({"body": "caption", "filename": "photo.jpg"}, "photo.jpg", id="filename-wins"),
        pytest.param({"body": "caption", "filename": 7}, None, id="bad-filename-no-fallback"),
        pytest.param({"body": "caption", "filename": "x" * 256}, None, id="filename-too-long"),
        pytest.param({"body": "x" * 255}, "x" * 255, id="body-255"),
        pytest.param({"body": "x" * 256}, None, id="body-too-long"),
        pytest.param({"body": ["a"]}, None, id="body-not-string"),
        pytest.param({}, None, id="no-body"),
        pytest.param({"body": "../../etc/passwd"}, "../../etc/passwd", id="kept-as-given"),
    ],
)
def test_filename(fields: dict[str, Any], expected: str | None) -> None:
    """`filename` wins over `body`; strings up to 255 characters are kept as given."""
    content = {"msgtype": "m.file", "url": "mxc://example.org/a", **fields}
    (ref,) = extract_from_content(content, "m.room.message").references
    assert ref.filename == expected


def test_info_not_an_object() -> None:
    """A non-object `info` gives no metadata and no thumbnails, without counting invalid."""
    content = {"msgtype": "m.image", "body": "a.png", "url": "mxc://example.org/a",
               "info": "mxc://example.org/t"}  # fmt: skip
    extraction = extract_from_content(content, "m.room.message")
    assert _summary(extraction) == [
        ("mxc://example.org/a", C, ("url",), None, None, None, None, "a.png")
    ]
    assert extraction.invalid == 0


# --- malformed events -----------------------------------------------------------------------


def _without(key: str) -> dict[str, Any]:
    event = _event("m.room.message", {"msgtype": "m.text", "body": "hi"})
    del event[key]
    return event


@pytest.mark.parametrize(
    ("event", "match"),
    [
        pytest.param([], "must be an object", id="list"),
        pytest.param("event", "must be an object", id="string"),
        pytest.param(None, "must be an object", id="null"),
        pytest.param(_without("content"), "'content'", id="no-content"),
        pytest.param(_event("m.room.message", []), "'content'", id="content-list"),
        pytest.param(_event("m.room.message", None), "'content'", id="content-null"),
        pytest.param(
            _event("m.room.message", "mxc://example.org/a"), "'content'", id="content-str"
        ),
        pytest.param(_event("m.room.message", {}, event_id=5), "'event_id'", id="event-id-int"),
        pytest.param(_without("event_id"), "'event_id'", id="no-event-id"),
        pytest.param(_without("type"), "'type'", id="no-type"),
        pytest.param(_event(None, {}), "'type'", id="type-null"),  # type: ignore[arg-type]
        pytest.param(_without("room_id"), "'room_id'", id="no-room-id"),
        pytest.param(_event("m.room.message", {}, sender=["@a:b"]), "'sender'", id="sender-list"),
    ],
)
def test_malformed_event(event: Any, match: str) -> None:
    """Events without the required, well-typed fields raise MalformedEvent naming the field."""
    with pytest.raises(MalformedEvent, match=match):
        extract_media(event)


@pytest.mark.parametrize("content", [[], "x", None, 3])
def test_content_not_an_object(content: Any) -> None:
    """Bare content that is not an object raises MalformedEvent (a ValueError)."""
    with pytest.raises(MalformedEvent, match="content must be an object"):
        extract_from_content(content)
    with pytest.raises(ValueError):
        rewrite_content(content, lambda ref: {"url": "https://x"})


# --- redactions -----------------------------------------------------------------------------

GOOD_ID = "$Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg"
OLD_ID = "$143273582443PhrSn:example.org"


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param(_event("m.room.redaction", {"redacts": GOOD_ID}), GOOD_ID, id="v11-content"),
        pytest.param(_event("m.room.redaction", {}, redacts=OLD_ID), OLD_ID, id="old-top-level"),
        pytest.param(
            _event("m.room.redaction", {"redacts": GOOD_ID}, redacts=GOOD_ID), GOOD_ID,
            id="v11-copied-to-top-level",
        ),
        pytest.param(
            # Rooms v1-10 check only the top-level field; content is the sender's to fill.
            _event("m.room.redaction", {"redacts": GOOD_ID}, redacts=OLD_ID), OLD_ID,
            id="disagreeing-prefers-top-level",
        ),
        pytest.param(
            _event("m.room.redaction", {"redacts": GOOD_ID}, redacts=5), GOOD_ID,
            id="bad-top-level-falls-back",
        ),
        pytest.param(_event("m.room.redaction", None, redacts=OLD_ID), OLD_ID, id="content-null"),
        pytest.param(_event("m.room.redaction", {"reason": "spam"}), None, id="absent"),
        pytest.param(_event("m.room.redaction", {"redacts": 5}), None, id="int"),
        pytest.param(_event("m.room.redaction", {"redacts": ""}), None, id="empty"),
        pytest.param(_event("m.room.redaction", {"redacts": "$"}), None, id="sigil-only"),
        pytest.param(_event("m.room.redaction", {"redacts": "abc:example.org"}), None, id="no-$"),
        pytest.param(_event("m.room.redaction", {"redacts": "$a b"}), None, id="space"),
        pytest.param(_event("m.room.redaction", {"redacts": "$a\nb"}), None, id="newline"),
        pytest.param(_event("m.room.redaction", {"redacts": "$" + "a" * 254}), "$" + "a" * 254,
                     id="255-chars"),
        pytest.param(_event("m.room.redaction", {"redacts": "$" + "a" * 255}), None,
                     id="too-long"),
        pytest.param(_event("m.room.message", {"redacts": GOOD_ID}, redacts=GOOD_ID), None,
                     id="not-a-redaction"),
        pytest.param([], None, id="not-an-object"),
    ],
)  # fmt: skip
def test_redacted_event_id(event: Any, expected: str | None) -> None:
    """The redacted event id is read from either room-version shape and validated."""
    assert redacted_event_id(event) == expected


# --- rewriting ------------------------------------------------------------------------------


def _signer(calls: list[MediaReference]) -> Any:
    def url_for(ref: MediaReference) -> dict[str, Any] | None:
        calls.append(ref)
        if ref.media.media_id.startswith("unseen"):
            return None
        return {"url": f"https://relay.example/m/{ref.media.media_id}", "expires_at": 1000}

    return url_for


def _rewrite_input() -> dict[str, Any]:
    return {
        "msgtype": "m.image",
        "body": "* a.png",
        "url": "mxc://example.org/url",
        "file": _encrypted_file("mxc://example.org/file"),
        "avatar_url": "mxc://example.org/avatar",
        "info": {
            "mimetype": "image/png",
            "thumbnail_url": "mxc://example.org/thumburl",
            "thumbnail_file": _encrypted_file("mxc://example.org/thumbfile"),
        },
        "m.new_content": {
            "msgtype": "m.image",
            "body": "a.png",
            "url": "mxc://example.org/newurl",
            "info": {"thumbnail_file": _encrypted_file("mxc://example.org/newthumb")},
        },
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$orig"},
    }


def test_rewrite_every_key_kind() -> None:
    """Every reference gets `<key>_https` beside it and one entry in the media list."""
    content = _rewrite_input()
    before = copy.deepcopy(content)
    calls: list[MediaReference] = []
    rewritten, media = rewrite_content(content, _signer(calls))

    expected = copy.deepcopy(before)
    base = "https://relay.example/m/"
    expected["url_https"] = base + "url"
    expected["file_https"] = base + "file"
    expected["avatar_url_https"] = base + "avatar"
    expected["info"]["thumbnail_url_https"] = base + "thumburl"
    expected["info"]["thumbnail_file_https"] = base + "thumbfile"
    expected["m.new_content"]["url_https"] = base + "newurl"
    expected["m.new_content"]["info"]["thumbnail_file_https"] = base + "newthumb"
    assert rewritten == expected
    assert media == [
        {"mxc": "mxc://example.org/" + name, "role": role, "path": path,
         "url": base + name, "expires_at": 1000}
        for name, role, path in [
            ("url", "content", ["url"]),
            ("file", "content", ["file"]),
            ("avatar", "avatar", ["avatar_url"]),
            ("thumburl", "thumbnail", ["info", "thumbnail_url"]),
            ("thumbfile", "thumbnail", ["info", "thumbnail_file"]),
            ("newurl", "content", ["m.new_content", "url"]),
            ("newthumb", "thumbnail", ["m.new_content", "info", "thumbnail_file"]),
        ]
    ]  # fmt: skip
    assert content == before  # input not mutated
    # The callback sees full references, including key material for encrypted files.
    assert calls[1].encryption == EncryptionInfo(KEY, IV, SHA256)


def test_rewrite_returns_independent_copy() -> None:
    """The rewritten content shares no nested object with the input."""
    content = _rewrite_input()
    rewritten, _ = rewrite_content(content, _signer([]))
    assert rewritten["info"] is not content["info"]
    assert rewritten["file"] is not content["file"]
    assert rewritten["file"]["key"]["key_ops"] is not content["file"]["key"]["key_ops"]
    rewritten["m.new_content"]["info"]["thumbnail_file"]["url"] = "changed"
    assert content["m.new_content"]["info"]["thumbnail_file"]["url"] == "mxc://example.org/newthumb"


def test_rewrite_leaves_unsigned_references_alone() -> None:
    """When url_for returns None the reference is unchanged and missing from the media list."""
    content = {
        "msgtype": "m.video",
        "body": "v.mp4",
        "url": "mxc://example.org/unseenvideo",
        "info": {"thumbnail_url": "mxc://example.org/thumb"},
    }
    rewritten, media = rewrite_content(content, _signer([]), "m.room.message")
    assert rewritten == {
        "msgtype": "m.video",
        "body": "v.mp4",
        "url": "mxc://example.org/unseenvideo",
        "info": {
            "thumbnail_url": "mxc://example.org/thumb",
            "thumbnail_url_https": "https://relay.example/m/thumb",
        },
    }
    assert [entry["mxc"] for entry in media] == ["mxc://example.org/thumb"]


def test_rewrite_removes_spoofed_links() -> None:
    """`<key>_https` values supplied by the sender never survive, signed or not."""
    content = {
        "msgtype": "m.image",
        "body": "a.png",
        "url": "mxc://example.org/unseen",
        "url_https": "https://evil.example/a",
        "file_https": "https://evil.example/b",
        "info": {"thumbnail_url": "mxc://example.org/t", "thumbnail_url_https": "https://evil/c"},
        "m.new_content": {"avatar_url_https": "https://evil.example/d", "body": "x"},
    }
    before = copy.deepcopy(content)
    rewritten, media = rewrite_content(content, _signer([]), "m.room.message")
    assert "url_https" not in rewritten
    assert "file_https" not in rewritten
    assert rewritten["info"]["thumbnail_url_https"] == "https://relay.example/m/t"
    assert rewritten["m.new_content"] == {"body": "x"}
    assert [entry["mxc"] for entry in media] == ["mxc://example.org/t"]
    assert content == before


def test_rewrite_skips_invalid_references() -> None:
    """Invalid references are neither signed nor listed; url_for is never called for them."""
    calls: list[MediaReference] = []
    content = {"avatar_url": "mxc://example.org/../../v3/joined_rooms", "displayname": "x"}
    rewritten, media = rewrite_content(content, _signer(calls), "m.room.member")
    assert rewritten == content
    assert media == []
    assert calls == []


def test_rewrite_member_avatar() -> None:
    """A member event's avatar is rewritten with the avatar role."""
    content = {"membership": "join", "avatar_url": "mxc://example.org/av"}
    rewritten, media = rewrite_content(content, _signer([]), "m.room.member")
    assert rewritten["avatar_url_https"] == "https://relay.example/m/av"
    assert media[0]["role"] == "avatar"


# --- EncryptionInfo -------------------------------------------------------------------------


def _key_spellings(data: bytes) -> list[str]:
    return [
        data.hex(),
        data.hex().upper(),
        _unpadded(data),
        _unpadded(data, urlsafe=True),
        repr(data)[2:-1],
    ]


def test_encryption_info_repr_hides_key_material() -> None:
    """Neither EncryptionInfo's nor MediaReference's repr/str shows the key or IV."""
    info = EncryptionInfo(KEY, IV, SHA256)
    ref = extract_from_content(
        {"msgtype": "m.file", "body": "a", "file": _encrypted_file("mxc://example.org/a")}
    ).references[0]
    for text in (repr(info), str(info), repr(ref), str(ref), f"{info!r}"):
        assert "redacted" in text
        for spelling in _key_spellings(KEY) + _key_spellings(IV):
            assert spelling not in text


def test_encryption_info_json_round_trip() -> None:
    """to_json is compact JSON and from_json restores the same value."""
    info = EncryptionInfo(KEY, IV, SHA256)
    raw = info.to_json()
    assert " " not in raw
    assert json.loads(raw) == {
        "k": _unpadded(KEY, urlsafe=True),
        "iv": _unpadded(IV),
        "sha256": _unpadded(SHA256),
    }
    assert EncryptionInfo.from_json(raw) == info


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        "null",
        json.dumps({"k": _unpadded(KEY, urlsafe=True), "iv": _unpadded(IV)}),
        json.dumps({"k": _unpadded(KEY[:16], urlsafe=True), "iv": _unpadded(IV),
                    "sha256": _unpadded(SHA256)}),
        json.dumps({"k": _unpadded(KEY, urlsafe=True), "iv": _unpadded(IV + b"x"),
                    "sha256": _unpadded(SHA256)}),
        json.dumps({"k": 1, "iv": _unpadded(IV), "sha256": _unpadded(SHA256)}),
    ],
)  # fmt: skip
def test_encryption_info_from_json_rejects(raw: str) -> None:
    """Stored key material that is not exactly what to_json wrote raises ValueError."""
    with pytest.raises(ValueError):
        EncryptionInfo.from_json(raw)


@pytest.mark.parametrize(
    "fields",
    [
        {"key": KEY[:31], "iv": IV, "sha256": SHA256},
        {"key": KEY, "iv": IV[:15], "sha256": SHA256},
        {"key": KEY, "iv": IV, "sha256": SHA256 + b"x"},
        {"key": _unpadded(KEY), "iv": IV, "sha256": SHA256},
    ],
)
def test_encryption_info_checks_lengths(fields: dict[str, Any]) -> None:
    """EncryptionInfo refuses key material of the wrong type or length."""
    with pytest.raises(ValueError, match="must be"):
        EncryptionInfo(**fields)


# --- properties over arbitrary content ------------------------------------------------------

_KEYS = st.sampled_from(
    ["url", "file", "info", "thumbnail_url", "thumbnail_file", "thumbnail_info", "avatar_url",
     "m.new_content", "m.relates_to", "rel_type", "v", "key", "iv", "hashes", "sha256", "k",
     "kty", "alg", "key_ops", "mimetype", "size", "w", "h", "body", "filename", "msgtype",
     "url_https"]
)  # fmt: skip
_LEAVES = st.one_of(
    st.sampled_from(
        ["mxc://example.org/abc", "mxc://example.org/../x", "m.replace", "v2", "oct", "A256CTR",
         "decrypt", "m.image", "", _unpadded(KEY, urlsafe=True), _unpadded(IV), _unpadded(SHA256)]
    ),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
)  # fmt: skip
_JSON = st.recursive(
    _LEAVES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_KEYS, children, max_size=6),
    max_leaves=25,
)


@given(
    content=st.dictionaries(_KEYS, _JSON, max_size=8),
    event_type=st.sampled_from([None, "m.room.message", "m.room.avatar", "m.room.member"]),
)
def test_arbitrary_content_never_crashes(content: dict[str, Any], event_type: str | None) -> None:
    """Any JSON content is handled; every reference points at a valid mxc where its path says."""
    before = copy.deepcopy(content)
    extraction = extract_from_content(content, event_type)
    assert extraction.invalid >= 0
    for ref in extraction.references:
        value = _resolve(content, ref.path)
        assert (value["url"] if ref.encryption else value) == str(ref.media)
    rewritten, media = rewrite_content(content, lambda ref: {"url": "https://r/" + str(ref.path)})
    assert content == before
    assert len(media) == len(extraction.references)
    for entry in media:
        *parents, last = entry["path"]
        assert _resolve(rewritten, tuple(parents))[last + "_https"] == entry["url"]


@pytest.mark.parametrize(
    ("content", "expected", "dropped"),
    [
        ({"info": {"w": 2**31, "h": 2**31 - 1}}, {"width": None, "height": 2**31 - 1}, 1),
        ({"info": {"size": 2**53, "w": -1}}, {"size": None, "width": None}, 2),
        ({"info": {"size": 2**53 - 1}}, {"size": 2**53 - 1}, 0),
        ({"body": "a\x00.png"}, {"filename": None}, 1),
        ({"filename": "\ud800.png", "body": "caption"}, {"filename": None}, 1),
        ({"info": {"mimetype": "image/png\x00"}}, {"mimetype": None}, 1),
        ({"info": {"mimetype": "image/png", "w": 10}}, {"mimetype": "image/png", "width": 10}, 0),
    ],
)
def test_unstorable_metadata_is_dropped_and_counted(
    content: dict[str, Any], expected: dict[str, Any], dropped: int
) -> None:
    """Integers beyond their column, NUL, lone surrogates: the field goes, the reference stays."""
    base = {"msgtype": "m.image", "body": "a.png", "url": "mxc://example.org/abc"}
    extraction = extract_from_content({**base, **content}, "m.room.message")
    (ref,) = extraction.references
    assert {name: getattr(ref, name) for name in expected} == expected
    assert extraction.dropped == dropped


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sender", "@a\x00:example.org"),
        ("room_id", "!r\ud800:example.org"),
        ("event_id", "$" + "e" * 255),
        ("event_id", ""),
    ],
)
def test_unstorable_envelope_is_malformed(field: str, value: str) -> None:
    """An id that no text column can hold (or over 255 characters) makes the event malformed."""
    event = {
        "type": "m.room.message",
        "event_id": "$e",
        "room_id": "!r:example.org",
        "sender": "@a:example.org",
        "content": {"msgtype": "m.image", "body": "a.png", "url": "mxc://example.org/abc"},
        field: value,
    }
    with pytest.raises(MalformedEvent):
        extract_media(event)

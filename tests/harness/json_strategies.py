"""Hypothesis strategies for Matrix JSON: any value, and event-shaped values.

Event-shaped values are built from media-like parts (mxc-ish strings, ``info``,
``file`` with key material, thumbnails, edits, redactions) so that generated events
reach deep into extraction and ingest instead of failing the first type check.
"""

from __future__ import annotations

from hypothesis import strategies as st

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
SERVER = st.sampled_from(
    ["example.org", "localhost:8448", "[::1]", "1.2.3.4", "", "a..b", "Ex.ORG"]
)
MEDIA_ID = st.sampled_from(["abc", "A_b-9", "", "../x", "a/b", "x" * 300, "é"]) | st.text(
    max_size=8
)
MXC = st.builds(lambda s, m: f"mxc://{s}/{m}", SERVER, MEDIA_ID) | st.text(max_size=20) | JSON
B64 = st.sampled_from(["", "AAAA", "not base64!", "A" * 43]) | st.text(max_size=50)
ENCRYPTED_FILE = st.fixed_dictionaries(
    {},
    optional={
        "url": MXC,
        "v": st.sampled_from(["v2", "v1", ""]) | JSON,
        "iv": B64 | JSON,
        "hashes": st.dictionaries(st.sampled_from(["sha256", "sha512"]), B64 | JSON, max_size=2)
        | JSON,
        "key": st.fixed_dictionaries(
            {},
            optional={
                "alg": st.just("A256CTR") | JSON,
                "k": B64 | JSON,
                "kty": st.just("oct") | JSON,
                "ext": st.booleans() | JSON,
                "key_ops": st.just(["encrypt", "decrypt"]) | JSON,
            },
        )
        | JSON,
    },
)
INFO = st.fixed_dictionaries(
    {},
    optional={
        "mimetype": st.sampled_from(["image/png", "text/html", "a\x00b"]) | JSON,
        "size": JSON,
        "w": JSON,
        "h": JSON,
        "thumbnail_url": MXC,
        "thumbnail_file": ENCRYPTED_FILE | JSON,
        "thumbnail_info": JSON,
    },
)
CONTENT = st.fixed_dictionaries(
    {},
    optional={
        "msgtype": st.sampled_from(["m.image", "m.file", "m.video", "m.audio", "m.text"]) | JSON,
        "body": st.text(max_size=300) | JSON,
        "filename": st.text(max_size=300) | JSON,
        "url": MXC,
        "file": ENCRYPTED_FILE | JSON,
        "info": INFO | JSON,
        "avatar_url": MXC,
        "membership": st.sampled_from(["join", "invite", "leave"]) | JSON,
        "redacts": st.text(max_size=10) | JSON,
        "m.new_content": st.dictionaries(st.sampled_from(["url", "msgtype", "info"]), MXC),
        "m.relates_to": st.fixed_dictionaries(
            {}, optional={"rel_type": st.just("m.replace") | JSON, "event_id": JSON}
        )
        | JSON,
    },
)
EVENT_TYPE = st.sampled_from(
    ["m.room.message", "m.sticker", "m.room.member", "m.room.avatar", "m.room.redaction"]
) | st.text(max_size=20)
EVENT = st.fixed_dictionaries(
    {},
    optional={
        "type": EVENT_TYPE | JSON,
        "event_id": st.sampled_from(["$e", "$a\x00", ""]) | JSON,
        "room_id": st.sampled_from(["!r:example.org", "\ud800"]) | JSON,
        "sender": st.sampled_from(["@a:example.org", "x" * 300]) | JSON,
        "state_key": JSON,
        "redacts": JSON,
        "origin_server_ts": JSON,
        "content": CONTENT | JSON,
        "unsigned": JSON,
    },
)

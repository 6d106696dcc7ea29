"""The shared tier's pure parts: object names, what may be stored, what eviction removes."""

from __future__ import annotations

import hashlib

import pytest

from relay.media.attachments import plaintext_variant
from relay.media.cache_layout import CacheKey
from relay.media.renditions import derived_key
from relay.media.shared_tier import media_folder, object_name, plaintext, to_evict
from relay.s3.bucket import ObjectInfo
from relay.s3.keys import check_name
from tests.harness.encryption import encrypt_attachment


def test_every_variant_of_an_item_shares_one_folder() -> None:
    """Originals and renditions of one item sit under one folder; other items elsewhere."""
    original = CacheKey("example.org", "abc", "original")
    thumb = derived_key(original, "thumb-64x48-crop")
    folder = hashlib.sha256(b"example.org\nabc").hexdigest()
    assert object_name(original) == f"{folder}/{original.digest()}"
    assert object_name(thumb) == f"{folder}/{thumb.digest()}"
    assert media_folder("example.org", "abcd") != folder
    # "a.org"/"xy" and "a.orgx"/"y" must not share a folder.
    assert media_folder("a.org", "xy") != media_folder("a.orgx", "y")
    check_name(object_name(thumb))


def test_plaintext_and_its_renditions_are_never_held() -> None:
    """Decrypted attachments and anything rendered from them are plaintext; ciphertext is not."""
    _, enc = encrypt_attachment(b"secret")
    plain = CacheKey("example.org", "abc", plaintext_variant(enc))
    assert plaintext(plain)
    assert plaintext(derived_key(plain, "thumb-32x32-crop"))
    assert plaintext(derived_key(plain, "stripped"))
    assert not plaintext(CacheKey("example.org", "abc", "original"))
    assert not plaintext(derived_key(CacheKey("example.org", "abc", "original"), "stripped"))


def _info(name: str, size: int, at: float) -> ObjectInfo:
    return ObjectInfo(name, size, at)


@pytest.mark.parametrize(
    ("objects", "max_size", "evicted"),
    [
        ([], 10, []),
        ([_info("a", 5, 1), _info("b", 5, 2)], 10, []),
        ([_info("a", 5, 1), _info("b", 5, 2), _info("c", 5, 3)], 10, ["a"]),
        ([_info("c", 5, 3), _info("b", 5, 2), _info("a", 5, 1)], 10, ["a"]),
        ([_info("a", 5, 1), _info("b", 5, 2), _info("c", 5, 3)], 4, ["a", "b", "c"]),
        ([_info("big", 100, 9), _info("small", 1, 1)], 50, ["small", "big"]),
        # Same store time (S3 lists whole seconds on some servers): by name, stably.
        ([_info("b", 5, 1), _info("a", 5, 1), _info("c", 5, 2)], 10, ["a"]),
    ],
)
def test_eviction_takes_the_oldest_first(
    objects: list[ObjectInfo], max_size: int, evicted: list[str]
) -> None:
    """Oldest-stored objects go first, only as many as needed to get under the cap."""
    assert [info.name for info in to_evict(objects, max_size)] == evicted

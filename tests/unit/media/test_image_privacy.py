"""Tests for relay.image_privacy: metadata removed, pixels and coded data untouched."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageCms
from PIL.PngImagePlugin import PngInfo

from relay.media.image_privacy import Stripped, handled_type, strip_metadata

ORIENTATION = 0x0112
GPS_IFD = 0x8825
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">GPSLatitude 51.5</x:xmpmeta>'
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _photo(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    """Noise, so the coded data is non-trivial (stuffed FF00 bytes and all)."""
    im = Image.effect_noise(size, 80).convert("RGB")
    return im.convert(mode)


def _gps_exif(orientation: int | None) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    exif[0x0131] = "Camera app 1.0"
    if orientation is not None:
        exif[ORIENTATION] = orientation
    gps = exif.get_ifd(GPS_IFD)
    gps.update({1: "N", 2: (51.0, 30.0, 26.0), 3: "W", 4: (0.0, 7.0, 39.0)})
    return exif


def _decoded(data: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(io.BytesIO(data)) as im:
        return im.mode, im.size, im.tobytes()


# --- JPEG ---------------------------------------------------------------------------------


def _jpeg_header_segments(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """(marker, whole segment) up to the first SOS, and everything from SOS on."""
    assert data[:2] == b"\xff\xd8"
    pos, segments = 2, []
    while data[pos + 1] != 0xDA:
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segments.append((marker, data[pos : pos + 2 + length]))
        pos += 2 + length
    return segments, data[pos:]


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _mpf_index() -> bytes:
    """A minimal valid CIPA DC-007 MP index (APP2 "MPF"), as phones write for extra images."""
    ifd_size = 2 + 3 * 12 + 4
    entries = [
        (0xB000, 7, 4, b"0100"),  # MPFVersion
        (0xB001, 4, 1, struct.pack("<I", 1)),  # NumberOfImages
        (0xB002, 7, 16, struct.pack("<I", 8 + ifd_size)),  # MPEntry, stored after the IFD
    ]
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHI", tag, kind, count) + v for tag, kind, count, v in entries)
    ifd += b"\x00" * 4
    mp_entry = struct.pack("<IIIHH", 0x20030000, 0, 0, 0, 0)  # representative baseline image
    return b"MPF\x00II*\x00" + struct.pack("<I", 8) + ifd + mp_entry


def _jpeg(
    tmp_path: Path,
    *,
    mode: str = "RGB",
    orientation: int | None = None,
    metadata: bool = True,
    progressive: bool = False,
    trailer: bytes = b"",
) -> Path:
    """A JPEG with GPS EXIF, XMP, a comment, IPTC and an MPF segment, plus an ICC profile."""
    options: dict[str, object] = {"quality": 90, "progressive": progressive, "icc_profile": SRGB}
    if metadata:
        options.update(exif=_gps_exif(orientation), comment=b"at home, 5 Elm St", xmp=XMP)
    buf = io.BytesIO()
    _photo(mode).save(buf, format="JPEG", **options)
    data = buf.getvalue()
    if metadata:
        iptc = _segment(0xED, b"Photoshop 3.0\x008BIM\x04\x04\x00\x00\x00\x00\x00\x05Alice")
        mpf = _segment(0xE2, _mpf_index())
        vendor = _segment(0xEB, b"JP\x00\x00vendor stuff")
        data = data[:2] + iptc + mpf + vendor + data[2:]
    path = tmp_path / "src.jpg"
    path.write_bytes(data + trailer)
    return path


def _should_keep(marker: int, segment: bytes) -> bool:
    """The policy, restated: non-APPn/COM segments, JFIF, ICC profiles and Adobe are kept."""
    if marker == 0xE0:
        return True
    if marker == 0xE2:
        return segment[4:].startswith(b"ICC_PROFILE\x00")
    if marker == 0xEE:
        return segment[4:].startswith(b"Adobe")
    return not (0xE0 <= marker <= 0xEF or marker == 0xFE)


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("orientation", [None, 1, 6])
def test_jpeg_metadata_is_removed_and_coded_data_kept(
    tmp_path: Path, progressive: bool, mode: str, orientation: int | None
) -> None:
    """GPS EXIF, XMP, COM, IPTC, MPF and vendor APPn go; ICC, Adobe, tables and scans stay."""
    src = _jpeg(tmp_path, mode=mode, orientation=orientation, progressive=progressive)
    original = src.read_bytes()
    dst = tmp_path / "dst.jpg"
    assert strip_metadata(src, dst) is Stripped.REMOVED
    stripped = dst.read_bytes()

    for needle in (b"PhoneMaker", b"Camera app", b"Elm St", b"xmpmeta", b"8BIM", b"MPF\x00"):
        assert needle in original
        assert needle not in stripped
    assert _decoded(stripped) == _decoded(original)

    before, scans_before = _jpeg_header_segments(original)
    after, scans_after = _jpeg_header_segments(stripped)
    assert scans_after == scans_before  # entropy-coded data (and later tables), byte for byte
    kept = [(marker, segment) for marker, segment in before if _should_keep(marker, segment)]
    assert [s for s in after if s[0] != 0xE1] == kept
    assert (0xEE in [m for m, _ in after]) == (mode == "CMYK")  # Adobe APP14 for CMYK

    with Image.open(dst) as im:
        assert im.info.get("icc_profile") == SRGB
        assert "comment" not in im.info
        assert "xmp" not in im.info
        exif = im.getexif()
        assert exif.get_ifd(GPS_IFD) == {}
        if orientation in (None, 1):
            assert "exif" not in im.info
            assert [m for m, _ in after].count(0xE1) == 0
        else:
            assert dict(exif) == {ORIENTATION: orientation}  # only the Orientation survives


def test_jpeg_trailing_data_is_dropped(tmp_path: Path) -> None:
    """Bytes after EOI (appended images, vendor trailers) are removed."""
    src = _jpeg(tmp_path, metadata=False, trailer=b"SEFT trailer with GPS 51.5,-0.1")
    dst = tmp_path / "dst.jpg"
    assert strip_metadata(src, dst) is Stripped.REMOVED
    assert dst.read_bytes() == src.read_bytes()[: -len(b"SEFT trailer with GPS 51.5,-0.1")]


def test_jpeg_without_metadata_is_left_alone(tmp_path: Path) -> None:
    """A JPEG with only JFIF, ICC and coded data needs nothing: False, dst not written."""
    src = _jpeg(tmp_path, metadata=False)
    dst = tmp_path / "dst.jpg"
    assert strip_metadata(src, dst) is Stripped.CLEAN
    assert not dst.exists()


@pytest.mark.parametrize("orientation", [None, 8])
def test_jpeg_stripping_is_idempotent(tmp_path: Path, orientation: int | None) -> None:
    """A stripped JPEG (even one keeping its minimal Orientation EXIF) needs no more stripping."""
    src = _jpeg(tmp_path, orientation=orientation)
    once, twice = tmp_path / "once.jpg", tmp_path / "twice.jpg"
    assert strip_metadata(src, once) is Stripped.REMOVED
    assert strip_metadata(once, twice) is Stripped.CLEAN
    assert not twice.exists()


def test_jpeg_fill_bytes_before_markers_are_accepted(tmp_path: Path) -> None:
    """Fill bytes (FF FF ...) before a marker are legal and survive verbatim."""
    buf = io.BytesIO()
    _photo().save(buf, format="JPEG", comment=b"secret")
    data = buf.getvalue()
    sos = data.index(b"\xff\xda")
    padded = data[:sos] + b"\xff\xff" + data[sos:]
    src = tmp_path / "src.jpg"
    src.write_bytes(padded)
    dst = tmp_path / "dst.jpg"
    assert strip_metadata(src, dst) is Stripped.REMOVED
    assert b"secret" not in dst.read_bytes()
    assert _decoded(dst.read_bytes()) == _decoded(data)


# --- PNG ----------------------------------------------------------------------------------


def _png_chunks(data: bytes) -> list[bytes]:
    """Each chunk, whole (length, type, data, CRC)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append(data[pos : pos + 12 + length])
        pos += 12 + length
    return chunks


def _png(tmp_path: Path, *, orientation: int | None = None, metadata: bool = True) -> Path:
    info = PngInfo()
    options: dict[str, object] = {"icc_profile": SRGB, "pnginfo": info}
    if metadata:
        info.add_text("Author", "Alice Example")
        info.add_text("Comment", "taken at 5 Elm St" * 20, zip=True)  # zTXt
        info.add_itxt("Description", "Grandma's house", lang="en", tkey="Description")
        info.add(b"tIME", struct.pack(">HBBBBB", 2024, 5, 17, 10, 30, 0))
        options["exif"] = _gps_exif(orientation)
    path = tmp_path / "src.png"
    _photo("RGBA").save(path, format="PNG", **options)
    return path


@pytest.mark.parametrize("orientation", [None, 1, 3])
def test_png_metadata_chunks_are_removed(tmp_path: Path, orientation: int | None) -> None:
    """tEXt, zTXt, iTXt, tIME and eXIf go; every other chunk stays byte for byte (CRC too)."""
    src = _png(tmp_path, orientation=orientation)
    original = src.read_bytes()
    dst = tmp_path / "dst.png"
    assert strip_metadata(src, dst) is Stripped.REMOVED
    stripped = dst.read_bytes()

    dropped = {b"tEXt", b"zTXt", b"iTXt", b"tIME", b"eXIf"}
    before = _png_chunks(original)
    assert {c[4:8] for c in before} >= dropped  # the fixture really has them all
    after = _png_chunks(stripped)
    non_exif = [c for c in after if c[4:8] != b"eXIf"]
    assert non_exif == [c for c in before if c[4:8] not in dropped]
    assert b"iCCP" in [c[4:8] for c in after]
    for needle in (b"Alice", b"Grandma", b"PhoneMaker"):
        assert needle not in stripped

    with Image.open(dst) as im:
        im.verify()  # signature, chunk order and every CRC
    assert _decoded(stripped) == _decoded(original)
    with Image.open(dst) as im:
        im.load()
        exif = im.getexif()
        if orientation in (None, 1):
            assert not exif
            assert b"eXIf" not in [c[4:8] for c in after]
        else:
            assert dict(exif) == {ORIENTATION: orientation}


def test_png_without_metadata_is_left_alone(tmp_path: Path) -> None:
    """A PNG with nothing personal returns False and writes nothing."""
    src = _png(tmp_path, metadata=False)
    dst = tmp_path / "dst.png"
    assert strip_metadata(src, dst) is Stripped.CLEAN
    assert not dst.exists()


def test_png_stripping_is_idempotent(tmp_path: Path) -> None:
    """Stripping a stripped PNG (with its minimal eXIf) changes nothing."""
    src = _png(tmp_path, orientation=6)
    once, twice = tmp_path / "once.png", tmp_path / "twice.png"
    assert strip_metadata(src, once) is Stripped.REMOVED
    assert strip_metadata(once, twice) is Stripped.CLEAN


# --- WebP ---------------------------------------------------------------------------------


def _riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(fourcc, payload) of each chunk of a WebP file, checking the RIFF size."""
    assert data[:4] == b"RIFF"
    assert data[8:12] == b"WEBP"
    assert int.from_bytes(data[4:8], "little") == len(data) - 8
    pos, chunks = 12, []
    while pos < len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        chunks.append((data[pos : pos + 4], data[pos + 8 : pos + 8 + size]))
        pos += 8 + size + (size & 1)
    assert pos == len(data)
    return chunks


def _webp(tmp_path: Path, *, orientation: int | None = None, metadata: bool = True) -> Path:
    options: dict[str, object] = {"lossless": True, "icc_profile": SRGB}
    if metadata:
        options.update(exif=_gps_exif(orientation), xmp=XMP)
    path = tmp_path / "src.webp"
    _photo("RGBA").save(path, format="WEBP", **options)
    return path


@pytest.mark.parametrize("orientation", [None, 6])
def test_webp_exif_and_xmp_are_removed(tmp_path: Path, orientation: int | None) -> None:
    """EXIF and XMP chunks go, their VP8X flags are cleared and the RIFF size fixed."""
    src = _webp(tmp_path, orientation=orientation)
    original = src.read_bytes()
    before = _riff_chunks(original)
    assert [c[0] for c in before] == [b"VP8X", b"ICCP", b"VP8L", b"EXIF", b"XMP "]
    assert before[0][1][0] & 0x0C == 0x0C
    dst = tmp_path / "dst.webp"
    assert strip_metadata(src, dst) is Stripped.REMOVED
    stripped = dst.read_bytes()

    after = _riff_chunks(stripped)
    keeps_exif = orientation not in (None, 1)
    expected = [b"VP8X", b"ICCP", b"VP8L"] + ([b"EXIF"] if keeps_exif else [])
    assert [c[0] for c in after] == expected
    assert after[1:3] == before[1:3]  # colour profile and image data verbatim
    flags = after[0][1][0]
    assert flags == (before[0][1][0] & ~0x0C) | (0x08 if keeps_exif else 0)
    assert after[0][1][1:] == before[0][1][1:]  # canvas size untouched
    for needle in (b"PhoneMaker", b"xmpmeta"):
        assert needle not in stripped

    assert _decoded(stripped) == _decoded(original)
    with Image.open(dst) as im:
        assert "xmp" not in im.info
        assert im.info.get("icc_profile") == SRGB
        exif = im.getexif()
        assert dict(exif) == ({ORIENTATION: orientation} if keeps_exif else {})


def test_webp_without_metadata_is_left_alone(tmp_path: Path) -> None:
    """A simple lossy WebP (no VP8X, so no metadata possible) returns False."""
    src = tmp_path / "src.webp"
    _photo().save(src, format="WEBP", quality=80)
    assert strip_metadata(src, tmp_path / "dst.webp") is Stripped.CLEAN
    assert not (tmp_path / "dst.webp").exists()


# --- what is not handled --------------------------------------------------------------------


def _gif(path: Path) -> bytes:
    buf = io.BytesIO()
    _photo().save(buf, format="GIF", comment=b"hello")
    return buf.getvalue()


def _jpeg_bytes(path: Path) -> bytes:
    return _jpeg(path.parent).read_bytes()


def _png_bytes(path: Path) -> bytes:
    return _png(path.parent).read_bytes()


@pytest.mark.parametrize(
    ("make", "expected", "served_as"),
    [
        (_gif, Stripped.NOT_HANDLED, None),
        (lambda p: b"<html><body>hi</body></html>", Stripped.NOT_HANDLED, None),
        (lambda p: b"", Stripped.NOT_HANDLED, None),
        (lambda p: b"\xff\xd8", Stripped.NOT_HANDLED, None),  # SOI without a marker
        (_jpeg_bytes, Stripped.REMOVED, "image/jpeg"),
        (_png_bytes, Stripped.REMOVED, "image/png"),
    ],
)
def test_the_bytes_decide(
    tmp_path: Path,
    make: Callable[[Path], bytes],
    expected: Stripped,
    served_as: str | None,
) -> None:
    """Magic numbers, not a label, say what is stripped (a label is not even asked for)."""
    src = tmp_path / "input"
    src.write_bytes(make(src))
    assert handled_type(src.read_bytes()[:16]) == served_as
    assert strip_metadata(src, tmp_path / "dst") is expected
    assert (tmp_path / "dst").exists() == (expected is Stripped.REMOVED)


def _malformed_jpegs() -> list[bytes]:
    buf = io.BytesIO()
    _photo().save(buf, format="JPEG", exif=_gps_exif(6), comment=b"x")
    good = buf.getvalue()
    sos = good.index(b"\xff\xda")
    app1 = good.index(b"\xff\xe1")
    return [
        b"\xff\xd8\xff",
        b"\xff\xd8\xff\xe1\x00",  # length cut off
        b"\xff\xd8\xff\xe1\xff\xf0Exif\x00\x00",  # length past the end
        b"\xff\xd8\xff\xe1\x00\x01",  # length below 2
        good[: app1 + 40],  # cut inside the EXIF segment (GPS before the cut)
        good[:sos],  # cut before the first scan
        b"\xff\xd8\xff\xd8" + good[2:],  # second SOI
    ]


@pytest.mark.parametrize("data", _malformed_jpegs())
def test_malformed_jpeg_is_refused(tmp_path: Path, data: bytes) -> None:
    """A JPEG whose segments cannot be walked is MALFORMED (never served), nothing written."""
    src = tmp_path / "src.jpg"
    src.write_bytes(data)
    assert strip_metadata(src, tmp_path / "dst") is Stripped.MALFORMED
    assert not (tmp_path / "dst").exists()


def _gps_jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    _photo().save(buf, format="JPEG", exif=_gps_exif(6), comment=b"camera serial 12345")
    return buf.getvalue()


@pytest.mark.parametrize(
    "cut",
    [
        lambda good, sos: good[: sos + 40],  # inside the entropy-coded data: no EOI
        lambda good, sos: good[: len(good) // 2],
        lambda good, sos: good[:-2],  # only the EOI missing
        lambda good, sos: good[:-1],  # half the EOI
    ],
)
def test_truncated_jpeg_is_stripped_as_far_as_it_goes(
    tmp_path: Path, cut: Callable[[bytes, int], bytes]
) -> None:
    """Cut inside its scan, a JPEG loses its metadata, keeps its partial scan, gains an EOI."""
    good = _gps_jpeg_bytes()
    sos = good.index(b"\xff\xda")
    data = cut(good, sos)
    assert b"camera serial" in data
    src = tmp_path / "src.jpg"
    src.write_bytes(data)
    dst = tmp_path / "dst.jpg"
    assert strip_metadata(src, dst) is Stripped.REMOVED
    out = dst.read_bytes()
    assert b"camera serial" not in out
    assert b"Exif" in data and b"\x88\x25" not in out[: out.index(b"\xff\xda")]  # GPS IFD tag
    assert out.endswith(b"\xff\xd9")
    scan = data[sos:].removesuffix(b"\xff")
    assert out[:-2].endswith(scan)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data).to_bytes(4, "big")
    return len(data).to_bytes(4, "big") + kind + data + crc


def _malformed_pngs() -> list[bytes]:
    buf = io.BytesIO()
    info = PngInfo()
    info.add_text("Author", "Alice")
    _photo().save(buf, format="PNG", pnginfo=info)
    good = buf.getvalue()
    sig = good[:8]
    return [
        sig,
        sig + b"\x00\x00",
        good[:-12],  # no IEND
        good[: len(good) // 2],
        sig + _png_chunk(b"tEXt", b"a\x00b") + good[8:],  # IHDR not first
        sig + b"\x7f\xff\xff\xffIHDR",  # length past the end
        good[:8] + good[8:12] + b"IH\x00R" + good[16:],  # not a chunk type
        b"\x89PNG\r\n\x1b\n" + good[8:],  # bad signature
    ]


@pytest.mark.parametrize("data", _malformed_pngs())
def test_malformed_png_is_refused(tmp_path: Path, data: bytes) -> None:
    """A truncated or garbled PNG is MALFORMED (a bad signature: not a PNG), nothing written."""
    src = tmp_path / "src.png"
    src.write_bytes(data)
    expected = Stripped.MALFORMED if handled_type(data[:16]) else Stripped.NOT_HANDLED
    assert strip_metadata(src, tmp_path / "dst") is expected
    assert not (tmp_path / "dst").exists()


_WEBP_BREAKERS: list[Callable[[bytes], bytes]] = [
    lambda good: b"RIFF",
    lambda good: good[:11],
    lambda good: good[: len(good) // 2],
    lambda good: good[:4] + len(good).to_bytes(4, "little") + good[8:],  # RIFF size too big
    lambda good: good[:16] + (9).to_bytes(4, "little") + good[20:],  # VP8X of the wrong size
    lambda good: good[:12] + b"EXIF\xff\xff\x00\x00",  # chunk past the end
    lambda good: b"RIFF\x04\x00\x00\x00WAVE",
]


@pytest.mark.parametrize("breaker", _WEBP_BREAKERS)
def test_malformed_webp_is_refused(tmp_path: Path, breaker: Callable[[bytes], bytes]) -> None:
    """A truncated or inconsistent WebP is MALFORMED (no RIFF/WEBP: not a WebP), unwritten."""
    src = tmp_path / "bad.webp"
    data = breaker(_webp(tmp_path, orientation=6).read_bytes())
    src.write_bytes(data)
    expected = Stripped.MALFORMED if handled_type(data[:16]) else Stripped.NOT_HANDLED
    assert strip_metadata(src, tmp_path / "dst") is expected
    assert not (tmp_path / "dst").exists()


def test_missing_source_is_an_os_error(tmp_path: Path) -> None:
    """Only file-level I/O problems raise."""
    with pytest.raises(FileNotFoundError):
        strip_metadata(tmp_path / "gone.jpg", tmp_path / "dst")

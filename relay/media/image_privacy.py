"""Remove personal metadata (GPS, camera serials, names, comments) from images.

Phones write where and when a photo was taken into EXIF and XMP; a bridged image
would hand that to everyone outside Matrix. We cut the metadata out of the
container without touching the coded pixels, so the image decodes to exactly
the same pixels and costs no quality and little CPU.

Choices:
- Colour data is not personal and is kept (JPEG APP2 ICC_PROFILE and APP14 Adobe,
  PNG iCCP/sRGB/gAMA/cHRM, WebP ICCP): dropping it would change how pixels look.
- EXIF Orientation is kept, alone: dropping it would show phone photos sideways.
  When the original says anything other than 1 ("as stored") we write a minimal
  EXIF holding only that tag, where the original EXIF was.
- Anything after the image's end (JPEG EOI, PNG IEND, the RIFF size) is dropped:
  phones append extra images and vendor trailers there, with their own EXIF.
- The bytes decide, never the declared type: ``image/jpg``, ``image/pjpeg``,
  ``application/octet-stream`` or no type at all still carry the EXIF of a JPEG. A
  file is handled when its magic number says JPEG, PNG or WebP
  (:func:`relay.media.thumbnails.sniff_format`, the one signature table).
- A file that says it is one of those but whose structure cannot be walked is
  :attr:`Stripped.MALFORMED`: the caller refuses it (422) rather than serve metadata
  it could not find. One exception, the common one: a JPEG cut short inside its
  entropy-coded data (an interrupted upload) has all its segments before that point;
  they are stripped as usual, the partial scan kept, and an EOI appended, so viewers
  show what there is, as they would of the original.
"""

from __future__ import annotations

import enum
import mmap
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from relay.media.thumbnails import SNIFF_BYTES, sniff_format

# A piece of the output: a (start, end) range of the source, or new bytes.
Piece = tuple[int, int] | bytes

_EXIF_ORIENTATION = 0x0112
_EXIF_HEADER = b"Exif\x00\x00"


class _Malformed(Exception):
    """The file does not follow its format's structure."""


class Stripped(enum.Enum):
    """What :func:`strip_metadata` did."""

    REMOVED = "removed"  # dst holds the file without its metadata
    CLEAN = "clean"  # a JPEG, PNG or WebP with nothing to remove: serve src
    NOT_HANDLED = "not-handled"  # by its bytes not a JPEG, PNG or WebP: serve src as it is
    MALFORMED = "malformed"  # one of those, but unwalkable: serve neither


# The media type each handled format is served as (by its bytes, not its label).
STRIPPED_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def handled_type(head: bytes) -> str | None:
    """``image/jpeg``, ``image/png`` or ``image/webp`` when ``head`` (the first
    ``SNIFF_BYTES`` bytes) starts a file this module strips, else None."""
    return STRIPPED_TYPES.get(sniff_format(head) or "")


def strip_metadata(src: Path, dst: Path) -> Stripped:
    """Write ``src`` without personal metadata to ``dst``, pixels untouched.

    ``dst`` is written only for :attr:`Stripped.REMOVED`. Only I/O errors on the two
    files raise (``OSError``).
    """
    with src.open("rb") as f:
        fmt = sniff_format(f.read(SNIFF_BYTES))
        planner = _PLANNERS.get(fmt or "")
        if planner is None:
            return Stripped.NOT_HANDLED
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                plan = planner(data)
            except (_Malformed, struct.error, IndexError, ValueError):
                return Stripped.MALFORMED
            if _same_as_source(plan, data):
                return Stripped.CLEAN
            _write(plan, data, dst)
    return Stripped.REMOVED


def _same_as_source(plan: Sequence[Piece], data: mmap.mmap) -> bool:
    """Whether writing ``plan`` would reproduce ``data`` byte for byte."""
    pos = 0
    for piece in plan:
        if isinstance(piece, bytes):
            if data[pos : pos + len(piece)] != piece:
                return False
            pos += len(piece)
        else:
            if piece[0] != pos:
                return False
            pos = piece[1]
    return pos == len(data)


def _write(plan: Sequence[Piece], data: mmap.mmap, dst: Path) -> None:
    with dst.open("wb") as out, memoryview(data) as view:
        for piece in plan:
            if isinstance(piece, bytes):
                out.write(piece)
            else:
                with view[piece[0] : piece[1]] as chunk:
                    out.write(chunk)


class _Plan:
    """Output pieces, with adjacent source ranges merged."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []

    def keep(self, start: int, end: int) -> None:
        last = self.pieces[-1] if self.pieces else None
        if isinstance(last, tuple) and last[1] == start:
            self.pieces[-1] = (last[0], end)
        else:
            self.pieces.append((start, end))

    def add(self, new: bytes) -> None:
        self.pieces.append(new)


def _orientation(exif_payload: bytes) -> int:
    """The Orientation tag (1-8) of an EXIF (TIFF) block, 1 if absent or unreadable."""
    exif = Image.Exif()
    try:
        exif.load(exif_payload)
        value = exif.get(_EXIF_ORIENTATION, 1)
    except Exception:  # hostile EXIF can make Pillow raise almost anything; 1 is safe
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _orientation_only_exif(orientation: int) -> bytes:
    """A minimal EXIF block, ``Exif\\0\\0`` + TIFF, holding only the Orientation tag."""
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = orientation
    return exif.tobytes()


# --- JPEG (ITU T.81 Annex B; EXIF 2.32 section 4.5.4; JFIF 1.02) -------------------------

_SOI, _EOI, _SOS, _COM = 0xD8, 0xD9, 0xDA, 0xFE
_APP0, _APP1, _APP2, _APP14, _APP15 = 0xE0, 0xE1, 0xE2, 0xEE, 0xEF
# Markers with no length field (T.81 B.1.1.3): TEM and RST0-7.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _plan_jpeg(data: mmap.mmap) -> list[Piece]:
    """Keep every segment but APP1 (EXIF, XMP), APP13 (IPTC), other vendor APPn and COM."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise _Malformed
    plan = _Plan()
    plan.keep(0, 2)
    orientation_written = False
    pos = 2
    while True:
        if pos >= n or data[pos] != 0xFF:
            raise _Malformed
        start = pos
        while pos < n and data[pos] == 0xFF:  # fill bytes may precede a marker (B.1.1.2)
            pos += 1
        if pos >= n:
            raise _Malformed
        marker = data[pos]
        pos += 1
        if marker == _EOI:
            plan.keep(start, pos)
            return plan.pieces  # anything after EOI is dropped
        if marker in _STANDALONE:
            plan.keep(start, pos)
            continue
        if marker in (0x00, _SOI) or pos + 2 > n:
            raise _Malformed
        length = int.from_bytes(data[pos : pos + 2], "big")
        end = pos + length
        if length < 2 or end > n:
            raise _Malformed
        if marker == _SOS:
            # Entropy-coded data follows the scan header; copy it verbatim up to the next
            # marker (progressive files have several scans, with tables between them).
            end, truncated = _entropy_end(data, end)
            plan.keep(start, end)
            if truncated:
                # Cut short inside the scan (no EOI): every segment before it has been
                # seen and stripped; keep the partial scan and close the file properly.
                plan.add(b"\xff\xd9")
                return plan.pieces
        elif _APP0 <= marker <= _APP15 or marker == _COM:
            payload = data[pos + 2 : end]
            if _keep_jpeg_app(marker, payload):
                plan.keep(start, end)
            elif marker == _APP1 and payload.startswith(_EXIF_HEADER) and not orientation_written:
                orientation_written = True
                orientation = _orientation(payload)
                if orientation != 1:
                    exif = _orientation_only_exif(orientation)
                    plan.add(b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif)
        else:
            plan.keep(start, end)  # tables, frame headers, restart intervals, ...
        pos = end


def _keep_jpeg_app(marker: int, payload: bytes) -> bool:
    """Which application segments carry decoding or colour data rather than metadata."""
    if marker == _APP0:
        return True  # JFIF/JFXX: density and colour space
    if marker == _APP2:
        # ICC profile; not MPF, whose offsets would point at the dropped trailing images.
        return payload.startswith(b"ICC_PROFILE\x00")
    return marker == _APP14 and payload.startswith(b"Adobe")  # colour transform flag


def _entropy_end(data: mmap.mmap, pos: int) -> tuple[int, bool]:
    """Where the entropy-coded data starting at ``pos`` ends (the next real marker), and
    whether the file was cut short inside it instead."""
    n = len(data)
    while True:
        i = data.find(b"\xff", pos)
        if i < 0:
            return n, True  # no EOI: truncated
        if i + 1 >= n:
            return i, True  # a lone FF at the very end: half a marker, dropped
        following = data[i + 1]
        # FF00 is a stuffed data byte, FFD0-FFD7 restart markers inside the scan,
        # FFFF a fill byte before a marker (T.81 B.1.1.5, F.1.2.3).
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            pos = i + 2
        elif following == 0xFF:
            pos = i + 1
        else:
            return i, False


# --- PNG (PNG 3rd edition, sections 5.3 and 11.3) ---------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Text, time and EXIF; colour chunks (iCCP, sRGB, gAMA, cHRM, cICP) are kept.
_PNG_DROP = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"tIME"})


def _plan_png(data: mmap.mmap) -> list[Piece]:
    """Keep every chunk, CRC included, except text, time and EXIF chunks."""
    n = len(data)
    if data[:8] != _PNG_SIGNATURE:
        raise _Malformed
    plan = _Plan()
    plan.keep(0, 8)
    orientation_written = False
    pos = 8
    first = True
    while True:
        if pos + 12 > n:
            raise _Malformed  # no IEND: truncated
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = bytes(data[pos + 4 : pos + 8])
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > n or not kind.isalpha() or not kind.isascii():
            raise _Malformed
        if first and kind != b"IHDR":
            raise _Malformed
        first = False
        if kind not in _PNG_DROP:
            plan.keep(pos, end)
        elif kind == b"eXIf" and not orientation_written:
            orientation_written = True
            orientation = _orientation(data[pos + 8 : end - 4])
            if orientation != 1:
                # eXIf holds the TIFF block without the JPEG "Exif\0\0" prefix.
                tiff = _orientation_only_exif(orientation).removeprefix(_EXIF_HEADER)
                crc = zlib.crc32(b"eXIf" + tiff).to_bytes(4, "big")
                plan.add(len(tiff).to_bytes(4, "big") + b"eXIf" + tiff + crc)
        pos = end
        if kind == b"IEND":
            return plan.pieces  # anything after IEND is dropped


# --- WebP (RFC 9649, section 2.7) ----------------------------------------------------------

_VP8X_EXIF = 0x08
_VP8X_XMP = 0x04


def _plan_webp(data: mmap.mmap) -> list[Piece]:
    """Drop EXIF and XMP chunks, clear their VP8X flags and fix the RIFF size."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise _Malformed
    riff_end = 8 + int.from_bytes(data[4:8], "little")
    if riff_end > len(data):
        raise _Malformed
    chunks: list[Piece] = []
    vp8x: tuple[int, bytes] | None = None  # (index in chunks, the chunk)
    has_exif = False
    pos = 12
    while pos < riff_end:
        if pos + 8 > riff_end:
            raise _Malformed
        kind = bytes(data[pos : pos + 4])
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        end = pos + 8 + size + (size & 1)  # chunks are padded to an even length
        if end > riff_end:
            raise _Malformed
        if kind == b"VP8X":
            if size != 10 or vp8x is not None:
                raise _Malformed
            vp8x = (len(chunks), bytes(data[pos:end]))
            chunks.append(vp8x[1])
        elif kind == b"EXIF":
            orientation = 1 if has_exif else _orientation(data[pos + 8 : pos + 8 + size])
            has_exif = True
            if orientation != 1:
                tiff = _orientation_only_exif(orientation).removeprefix(_EXIF_HEADER)
                padding = b"\x00" * (len(tiff) & 1)
                chunks.append(b"EXIF" + len(tiff).to_bytes(4, "little") + tiff + padding)
        elif kind != b"XMP ":
            chunks.append((pos, end))
        pos = end
    if vp8x is not None:
        index, header_chunk = vp8x
        kept_exif = any(isinstance(c, bytes) and c.startswith(b"EXIF") for c in chunks)
        flags = header_chunk[8] & ~(_VP8X_EXIF | _VP8X_XMP) | (_VP8X_EXIF if kept_exif else 0)
        chunks[index] = header_chunk[:8] + bytes([flags]) + header_chunk[9:]
    body = sum(len(c) if isinstance(c, bytes) else c[1] - c[0] for c in chunks)
    header = b"RIFF" + (4 + body).to_bytes(4, "little") + b"WEBP"
    plan = _Plan()
    plan.add(header)
    for chunk in chunks:
        if isinstance(chunk, bytes):
            plan.add(chunk)
        else:
            plan.keep(*chunk)
    return plan.pieces


# By the format the bytes have (relay.media.thumbnails.sniff_format).
_PLANNERS: dict[str, Callable[[mmap.mmap], list[Piece]]] = {
    "JPEG": _plan_jpeg,
    "PNG": _plan_png,
    "WEBP": _plan_webp,
}

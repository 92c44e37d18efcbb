"""Removing metadata from image bytes before they are stored: a byte-level filter, no re-encode.

    stripped = strip_metadata(data, "JPEG")   # .data, .removed (kinds), .orientation (1..8 or None)

A photo straight from a phone carries where it was taken (EXIF GPS), the camera and its serial,
editing software, captions and author names (XMP, IPTC, comments). None of it is needed to
see the picture, so none of it is kept. The filter drops whole segments or chunks and copies
everything else byte for byte: the compressed pixel data is never decoded or re-encoded, so
the picture is exactly the one posted (same pixels, no generation loss) and stripping twice
changes nothing (the result is a fixed point, so content addresses are stable).

What goes, per format (everything else stays, in its order):

- **JPEG**: every APPn segment except APP0 (JFIF/JFXX), APP2 (ICC colour profile) and APP14
  (Adobe colour transform) — APP1 is EXIF or XMP, APP13 is Photoshop/IPTC, the others are
  vendor metadata no decoder needs; COM comments; an APP2 ``MPF`` index; and anything after
  EOI (a multi-picture file's further pictures, each with its own EXIF, or appended trailers).
  Quantisation and Huffman tables, frame and scan headers and the entropy-coded data are copied.
- **PNG**: ``eXIf``, ``tEXt``, ``iTXt`` and ``zTXt`` chunks, and anything after ``IEND``. Each
  chunk carries its own CRC, so the chunks kept stay valid as they are (``iCCP``, ``gAMA``...).
- **WebP**: the ``EXIF`` and ``XMP `` chunks of the RIFF container; the ``VP8X`` header's EXIF
  and XMP flags are cleared and the RIFF size is rewritten to match.
- **GIF**: comment extensions and XMP application extensions (``XMP DataXMP``).
- **BMP**: has no metadata fields; kept as it is.

TIFF and AVIF are refused (:class:`NotStrippable`): their metadata lives in the same index as
the pixel data's offsets (a TIFF IFD, an ISOBMFF ``iloc``), so removing it means rewriting that
layout — not a segment filter — and keeping it would store the location of whoever posted it.

The EXIF orientation (tag 0x0112, 1..8) is read before the EXIF goes, so a photo taken sideways
can still be shown upright: the ``images`` table records it (``exif_orientation``) and the face
stage transposes by it (:mod:`pipeline.core.orientation`).

A file whose segments or chunks do not add up raises :class:`MalformedImage`, naming the format,
the offset and what was wrong; the downloader records it as ``decode_error``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from PIL import Image

#: Formats whose metadata this module removes (``check_image``'s format names).
STRIPPABLE = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP")

_EXIF_ORIENTATION = 0x0112


class MetadataError(ValueError):
    """The image's metadata cannot be removed; the message names the format and the reason."""


class MalformedImage(MetadataError):
    """The file's segments or chunks are broken (truncated, a length past the end, no header)."""


class NotStrippable(MetadataError):
    """A format whose metadata cannot be removed without rewriting its layout (TIFF, AVIF)."""


@dataclass(frozen=True)
class Stripped:
    """Image bytes without metadata, what kinds were removed, and the orientation they said."""

    data: bytes
    removed: tuple[str, ...]  # sorted kinds: exif, xmp, iptc, comment, text, app<n>, mpf, trailer
    orientation: int | None  # EXIF orientation 1..8 before stripping; None when absent or invalid


def strip_metadata(data: bytes, fmt: str) -> Stripped:
    """``data`` (an image in Pillow format ``fmt``) without its metadata; see the module doc."""
    fmt = fmt.upper()
    if fmt in ("JPEG", "MPO"):  # MPO: a phone's multi-picture JPEG; its first picture is kept
        return _strip_jpeg(data)
    if fmt == "PNG":
        return _strip_png(data)
    if fmt == "WEBP":
        return _strip_webp(data)
    if fmt == "GIF":
        return _strip_gif(data)
    if fmt == "BMP":
        return Stripped(data, (), None)
    raise NotStrippable(f"{fmt or 'an unknown format'}: its metadata cannot be removed without rewriting the file's layout; not kept")


def exif_orientation(exif: bytes) -> int | None:
    """The orientation tag of an EXIF block (TIFF data, with or without the ``Exif\\0\\0``
    prefix), or None when it has none, an out-of-range one, or cannot be parsed (the block is
    being removed anyway; a broken one must not cost the image)."""
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        value = parsed.get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad EXIF
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def _result(out: bytes | bytearray, removed: set[str], orientation: int | None) -> Stripped:
    return Stripped(bytes(out), tuple(sorted(removed)), orientation)


# --------------------------------------------------------------------------- JPEG

#: APPn segments a decoder may need: APP0 JFIF (pixel density, JFXX thumbnails are rare and
#: harmless), APP2 ICC profile (colours), APP14 Adobe (whether the data is YCbCr, RGB or YCCK).
_JPEG_KEPT_APPS = (0xE0, 0xE2, 0xEE)
_SOI, _EOI, _SOS, _COM, _APP1, _APP2, _APP13 = 0xD8, 0xD9, 0xDA, 0xFE, 0xE1, 0xE2, 0xED
#: In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte), a restart marker
#: (0xD0-0xD7) or another 0xFF (fill); any other byte after 0xFF is the next marker.
_NEXT_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


def _strip_jpeg(data: bytes) -> Stripped:
    if data[:2] != b"\xff\xd8":
        raise MalformedImage("JPEG: does not start with SOI (FF D8)")
    out, removed, orientation = bytearray(data[:2]), set(), None
    pos, n = 2, len(data)
    while True:
        if pos >= n:
            raise MalformedImage(f"JPEG: ends at byte {pos} before its image data (no SOS segment)")
        if data[pos] != 0xFF:
            raise MalformedImage(f"JPEG: expected a marker at byte {pos}, found 0x{data[pos]:02X}")
        while pos < n and data[pos] == 0xFF:  # fill bytes before a marker are allowed
            pos += 1
        if pos >= n:
            raise MalformedImage("JPEG: ends inside a marker")
        marker = data[pos]
        start = pos - 1
        pos += 1
        if marker == _EOI:
            out += b"\xff\xd9"
            if pos < n:  # further MPO pictures (each with its own EXIF) or an appended trailer
                removed.add("trailer")
            return _result(out, removed, orientation)
        if marker == _SOI or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length field
            out += data[start:pos]
            continue
        if pos + 2 > n:
            raise MalformedImage(f"JPEG: segment 0x{marker:02X} at byte {start} has no length")
        (length,) = struct.unpack_from(">H", data, pos)
        end = pos + length
        if length < 2 or end > n:
            raise MalformedImage(f"JPEG: segment 0x{marker:02X} at byte {start} claims {length} bytes, "
                                 f"past the end of the file ({n} bytes)")
        payload = data[pos + 2:end]
        kind = _jpeg_metadata_kind(marker, payload)
        if kind is None:
            out += data[start:end]
        else:
            removed.add(kind)
            if kind == "exif" and orientation is None:
                orientation = exif_orientation(payload)
        pos = end
        if marker == _SOS:  # entropy-coded data follows, up to the next real marker
            found = _NEXT_MARKER.search(data, pos)
            if found is None:  # cut off mid-scan: kept as it is; the face stage reports it
                out += data[pos:]
                return _result(out, removed, orientation)
            out += data[pos:found.start()]
            pos = found.start()


def _jpeg_metadata_kind(marker: int, payload: bytes) -> str | None:
    """What metadata a segment is, or None for a segment the picture needs."""
    if marker == _COM:
        return "comment"
    if marker == _APP1:
        if payload.startswith(b"Exif\x00"):
            return "exif"
        return "xmp" if payload.startswith(b"http://ns.adobe.com/") else "app1"
    if marker == _APP2 and payload.startswith(b"MPF\x00"):
        return "mpf"  # offsets of the pictures after EOI, which are removed with it
    if marker == _APP13:
        return "iptc"
    if 0xE0 <= marker <= 0xEF and marker not in _JPEG_KEPT_APPS:
        return f"app{marker - 0xE0}"
    return None


# --------------------------------------------------------------------------- PNG

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_REMOVED = {b"eXIf": "exif", b"tEXt": "text", b"iTXt": "text", b"zTXt": "text"}


def _strip_png(data: bytes) -> Stripped:
    if not data.startswith(_PNG_SIGNATURE):
        raise MalformedImage("PNG: does not start with the PNG signature")
    out, removed, orientation = bytearray(_PNG_SIGNATURE), set(), None
    pos, n = len(_PNG_SIGNATURE), len(data)
    while True:
        if pos + 8 > n:
            raise MalformedImage(f"PNG: ends at byte {pos} without an IEND chunk")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length  # length, type, data, CRC
        if end > n:
            raise MalformedImage(f"PNG: chunk {kind!r} at byte {pos} claims {length} bytes, "
                                 f"past the end of the file ({n} bytes)")
        if kind in _PNG_REMOVED:
            removed.add(_PNG_REMOVED[kind])
            if kind == b"eXIf" and orientation is None:
                orientation = exif_orientation(data[pos + 8:pos + 8 + length])
        else:
            out += data[pos:end]
        pos = end
        if kind == b"IEND":
            if pos < n:
                removed.add("trailer")
            return _result(out, removed, orientation)


# --------------------------------------------------------------------------- WebP

_WEBP_REMOVED = {b"EXIF": "exif", b"XMP ": "xmp"}
#: VP8X header flags (byte 0 of its payload): 0x08 = has EXIF, 0x04 = has XMP.
_VP8X_METADATA_FLAGS = 0x08 | 0x04


def _strip_webp(data: bytes) -> Stripped:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise MalformedImage("WEBP: does not start with a RIFF/WEBP header")
    (riff_size,) = struct.unpack_from("<I", data, 4)
    n = 8 + riff_size  # the RIFF chunk's end; bytes after it are not part of the image
    if n > len(data):
        raise MalformedImage(f"WEBP: the RIFF header claims {n} bytes, the file has {len(data)}")
    chunks, removed, orientation = bytearray(), set(), None
    pos = 12
    while pos < n:
        if pos + 8 > n:
            raise MalformedImage(f"WEBP: a chunk header at byte {pos} is cut off")
        kind, size = struct.unpack_from("<4sI", data, pos)
        end = pos + 8 + size + (size & 1)  # chunks are padded to an even size
        if pos + 8 + size > n:
            raise MalformedImage(f"WEBP: chunk {kind!r} at byte {pos} claims {size} bytes, past the RIFF end ({n})")
        end = min(end, n)  # a missing pad byte on the last chunk is tolerated, as decoders do
        if kind in _WEBP_REMOVED:
            removed.add(_WEBP_REMOVED[kind])
            if kind == b"EXIF" and orientation is None:
                orientation = exif_orientation(data[pos + 8:pos + 8 + size])
        elif kind == b"VP8X" and size >= 1:
            chunk = bytearray(data[pos:end])
            chunk[8] &= ~_VP8X_METADATA_FLAGS & 0xFF  # the flags say what chunks follow: none now
            chunks += chunk
        else:
            chunks += data[pos:end]
        pos = end
    if n < len(data):
        removed.add("trailer")
    return _result(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks, removed, orientation)


# --------------------------------------------------------------------------- GIF

_GIF_EXTENSION, _GIF_IMAGE, _GIF_TRAILER = 0x21, 0x2C, 0x3B
_GIF_COMMENT, _GIF_APPLICATION = 0xFE, 0xFF


def _gif_sub_blocks_end(data: bytes, pos: int) -> int:
    """The offset after a run of data sub-blocks (length byte, bytes; a 0 length ends it)."""
    n = len(data)
    while True:
        if pos >= n:
            raise MalformedImage("GIF: ends inside a block of data")
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos


def _strip_gif(data: bytes) -> Stripped:
    if data[:6] not in (b"GIF87a", b"GIF89a") or len(data) < 13:
        raise MalformedImage("GIF: does not start with a GIF header")
    flags = data[10]
    pos = 13 + (3 * 2 ** ((flags & 0x07) + 1) if flags & 0x80 else 0)  # the global colour table
    out, removed = bytearray(data[:pos]), set()
    n = len(data)
    while True:
        if pos >= n:
            raise MalformedImage(f"GIF: ends at byte {pos} without a trailer")
        block = data[pos]
        if block == _GIF_TRAILER:
            out.append(_GIF_TRAILER)
            if pos + 1 < n:
                removed.add("trailer")
            return _result(out, removed, None)
        if block == _GIF_EXTENSION:
            if pos + 2 > n:
                raise MalformedImage(f"GIF: extension at byte {pos} is cut off")
            label = data[pos + 1]
            end = _gif_sub_blocks_end(data, pos + 2)
            if label == _GIF_COMMENT:
                removed.add("comment")
            elif label == _GIF_APPLICATION and data[pos + 3:pos + 14] == b"XMP DataXMP":
                removed.add("xmp")
            else:  # graphic control, looping (NETSCAPE2.0), plain text: part of the picture
                out += data[pos:end]
            pos = end
        elif block == _GIF_IMAGE:
            if pos + 10 > n:
                raise MalformedImage(f"GIF: image descriptor at byte {pos} is cut off")
            local = data[pos + 9]
            start, pos = pos, pos + 10 + (3 * 2 ** ((local & 0x07) + 1) if local & 0x80 else 0)
            end = _gif_sub_blocks_end(data, pos + 1)  # one byte of LZW code size, then the data
            out += data[start:end]
            pos = end
        else:
            raise MalformedImage(f"GIF: unknown block 0x{block:02X} at byte {pos}")

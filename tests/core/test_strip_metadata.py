"""Stripping metadata segment by segment: what goes, what stays byte for byte, what is refused."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from pipeline.core.strip_metadata import MalformedImage, NotStrippable, strip_metadata
from tests.fixtures.metadata import (
    PLANTED,
    gif_with_comment,
    gps_of,
    jpeg_segment,
    jpeg_with_metadata,
    picture,
    pixels,
    png_with_metadata,
    webp_with_metadata,
)

CASES = {
    "jpeg": (lambda: jpeg_with_metadata(orientation=6), "JPEG", {"exif", "xmp", "iptc", "comment"}, 6),
    "progressive jpeg": (lambda: jpeg_with_metadata(progressive=True), "JPEG", {"exif", "xmp", "iptc", "comment"}, 1),
    "png": (lambda: png_with_metadata(orientation=8), "PNG", {"exif", "text"}, 8),
    "webp": (lambda: webp_with_metadata(orientation=3), "WEBP", {"exif", "xmp"}, 3),
    "gif": (gif_with_comment, "GIF", {"comment"}, None),
}


@pytest.mark.parametrize("name", CASES)
def test_metadata_goes_and_pixels_stay(name):
    make, fmt, kinds, orientation = CASES[name]
    data = make()
    assert any(mark in data for mark in PLANTED)
    stripped = strip_metadata(data, fmt)
    assert not [mark for mark in PLANTED if mark in stripped.data]
    assert set(stripped.removed) == kinds
    assert stripped.orientation == orientation
    assert gps_of(stripped.data) == {}
    with Image.open(io.BytesIO(stripped.data)) as im:
        assert not im.getexif() and "xmp" not in im.info and "comment" not in im.info
        assert im.format == fmt
        if fmt != "GIF":
            assert im.info.get("icc_profile"), "the colour profile is part of the picture: kept"
    assert (pixels(stripped.data) == pixels(data)).all()
    assert strip_metadata(stripped.data, fmt).data == stripped.data  # a fixed point: addresses stay stable


def test_jpeg_keeps_every_other_segment_byte_for_byte():
    data = jpeg_with_metadata()
    stripped = strip_metadata(data, "JPEG").data
    scan = data.index(b"\xff\xda")  # tables, frame header, scan and entropy-coded data: all kept as they were
    assert stripped.endswith(data[data.index(b"\xff\xdb", 2):])
    assert stripped.startswith(data[:2 + 2 + struct.unpack_from(">H", data, 4)[0]])  # SOI + APP0 JFIF
    assert len(data) - len(stripped) == sum(
        2 + struct.unpack_from(">H", data, i + 2)[0]
        for i in range(2, scan) if data[i] == 0xFF and data[i + 1] in (0xE1, 0xED, 0xFE))


def test_webp_header_flags_and_riff_size_follow():
    stripped = strip_metadata(webp_with_metadata(), "WEBP").data
    assert struct.unpack_from("<I", stripped, 4)[0] == len(stripped) - 8
    vp8x = stripped.index(b"VP8X")
    flags = stripped[vp8x + 8]
    assert flags & 0x08 == 0 and flags & 0x04 == 0  # no EXIF, no XMP announced
    assert flags & 0x20  # the ICC profile still is
    assert b"EXIF" not in stripped and b"XMP " not in stripped


def test_data_after_the_image_goes():
    # A multi-picture file's second picture (with its own EXIF and GPS) sits after the first's EOI.
    second = jpeg_with_metadata(picture(seed=9))
    stripped = strip_metadata(jpeg_with_metadata() + second, "JPEG")
    assert "trailer" in stripped.removed and stripped.data.endswith(b"\xff\xd9")
    assert not [mark for mark in PLANTED if mark in stripped.data]


def test_truncated_scan_is_kept_for_the_face_stage_to_judge():
    data = jpeg_with_metadata()
    cut = data[: data.index(b"\xff\xda") + 60]
    stripped = strip_metadata(cut, "JPEG")
    assert "exif" in stripped.removed and stripped.data.endswith(cut[-40:])


@pytest.mark.parametrize("data, fmt, problem", [
    (b"\xff\xd8" + jpeg_segment(0xE1, b"Exif\x00\x00")[:4] + b"\x00" * 3, "JPEG", "past the end"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "JPEG", "past the end"),
    (b"\xff\xd8" + jpeg_segment(0xE0, b"JFIF\x00\x01\x01"), "JPEG", "no SOS"),
    (b"\xff\xd8\x00\x00", "JPEG", "expected a marker"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", "PNG", "past the end"),
    (b"\x89PNG\r\n\x1a\n", "PNG", "without an IEND"),
    (b"RIFF\xff\x00\x00\x00WEBPVP8 ", "WEBP", "RIFF header claims"),
    (b"GIF89a\x01\x00\x01\x00\x00\x00\x00", "GIF", "without a trailer"),
    (b"GIF89a\x01\x00\x01\x00\x00\x00\x00\x07", "GIF", "unknown block"),
])
def test_malformed_files_are_named_errors(data, fmt, problem):
    with pytest.raises(MalformedImage, match=problem) as err:
        strip_metadata(data, fmt)
    assert str(err.value).startswith(fmt)


@pytest.mark.parametrize("fmt", ["TIFF", "AVIF"])
def test_formats_whose_metadata_cannot_be_cut_out_are_refused(fmt):
    buf = io.BytesIO()
    picture().save(buf, "TIFF")
    with pytest.raises(NotStrippable, match=fmt):
        strip_metadata(buf.getvalue(), fmt)


def test_bmp_has_nothing_to_remove():
    buf = io.BytesIO()
    picture().save(buf, "BMP")
    stripped = strip_metadata(buf.getvalue(), "BMP")
    assert stripped.data == buf.getvalue() and stripped.removed == ()


def test_a_broken_exif_block_costs_the_orientation_not_the_image():
    data = jpeg_with_metadata()
    at = data.index(b"Exif\x00\x00")
    broken = data[:at + 6] + b"XX" + data[at + 8:]  # the TIFF byte-order mark, garbled
    stripped = strip_metadata(broken, "JPEG")
    assert stripped.orientation is None and "exif" in stripped.removed
    assert (pixels(stripped.data) == pixels(data)).all()

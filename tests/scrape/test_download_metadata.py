"""Downloads through a loopback server are stored without metadata: no GPS, camera, XMP,
IPTC or comment in the stored bytes, the same pixels, the orientation kept as a column."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from pipeline.core.storage import ImageStore, LocalStorage
from pipeline.scrape.download import Downloader
from tests.fixtures.metadata import (
    LATITUDE,
    PLANTED,
    gif_with_comment,
    gps_of,
    jpeg_with_metadata,
    picture,
    pixels,
    png_with_metadata,
    webp_with_metadata,
)
from tests.fixtures.scrape import FakeMastodon

SERVED = {
    "gps.jpg": (jpeg_with_metadata(orientation=6), "image/jpeg", "JPEG", 6),
    "text.png": (png_with_metadata(), "image/png", "PNG", 1),
    "exif.webp": (webp_with_metadata(orientation=8), "image/webp", "WEBP", 8),
    "comment.gif": (gif_with_comment(), "image/gif", "GIF", None),
}


def _tiff() -> bytes:
    buf = io.BytesIO()
    picture().save(buf, "TIFF")
    return buf.getvalue()


@pytest.fixture
def served(fake_mastodon):
    for name, (body, ctype, _, _) in SERVED.items():
        fake_mastodon.faults[name] = lambda h, body=body, ctype=ctype: FakeMastodon.send(h, 200, body, ctype)
    # After the scan, where the header check does not look: a comment claiming 16 KB, with 4 there.
    broken = jpeg_with_metadata()[:-2] + b"\xff\xfe\x40\x00gone"
    fake_mastodon.faults["broken.jpg"] = lambda h: FakeMastodon.send(h, 200, broken, "image/jpeg")
    fake_mastodon.faults["scan.tif"] = lambda h: FakeMastodon.send(h, 200, _tiff(), "image/tiff")
    return fake_mastodon


@pytest.fixture
def store(tmp_path):
    return LocalStorage(tmp_path / "store")


@pytest.mark.parametrize("name", SERVED)
def test_stored_bytes_carry_no_metadata(served, scrape_cfg, store, name):
    original, _, fmt, orientation = SERVED[name]
    with Downloader(scrape_cfg.scrape, store) as downloader:
        result = downloader.fetch("p1", f"{served.url}/fault/{name}")
    assert result.status == "ok", result.download["error"]
    image = result.image
    stored = store.get_bytes(image["storage_key"])  # images/<aa>/<sha256>, read back as any reader would
    assert not [mark for mark in PLANTED if mark in stored]
    assert gps_of(stored) == {}
    assert (pixels(stored) == pixels(original)).all()
    # The content address is the stripped bytes' digest, and the row says what was done.
    assert image["sha256"] == hashlib.sha256(stored).hexdigest() == result.download["sha256"]
    assert image["storage_key"] == ImageStore.key(image["sha256"])
    assert image["bytes"] == len(stored) < len(original)
    assert image["format"] == fmt and image["metadata_stripped"] is True
    assert image["metadata_removed"] and "exif" in image["metadata_removed"] or fmt == "GIF"
    assert image["exif_orientation"] == orientation


def test_the_gps_of_a_phone_photo_is_not_stored(served, scrape_cfg, store):
    assert gps_of(SERVED["gps.jpg"][0])[2] == LATITUDE  # the photo as served names where it was taken
    with Downloader(scrape_cfg.scrape, store) as downloader:
        downloader.fetch("p1", f"{served.url}/fault/gps.jpg")
    (key,) = store.list("images/")
    with Image.open(io.BytesIO(store.get_bytes(key))) as im:
        assert 0x8825 not in im.getexif() and im.getexif().get_ifd(0x8825) == {}
        assert 0x010F not in im.getexif()  # nor the camera's make


def test_a_broken_segment_is_a_decode_error_row(served, scrape_cfg, store):
    with Downloader(scrape_cfg.scrape, store) as downloader:
        result = downloader.fetch("p1", f"{served.url}/fault/broken.jpg")
    row = result.download
    assert row["status"] == "decode_error" and result.image is None and row["sha256"] is None
    assert "JPEG" in row["error"] and "past the end" in row["error"] and "/fault/broken.jpg" in row["error"]
    assert store.list("images/") == []


def test_a_format_that_cannot_be_stripped_is_not_kept(served, scrape_cfg, store):
    with Downloader(scrape_cfg.scrape, store) as downloader:
        result = downloader.fetch("p1", f"{served.url}/fault/scan.tif")
    assert result.download["status"] == "not_strippable" and "TIFF" in result.download["error"]
    assert store.list("images/") == []

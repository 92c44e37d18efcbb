"""``likerank migrate`` strips images stored before the downloader did: new bytes under a new
digest, every table re-keyed to it, the old bytes gone; idempotent, and resumable mid-batch."""

from __future__ import annotations

import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from likerank.cli.main import main
from pipeline.core import clean_stored_images as cleaning
from pipeline.core import keys
from pipeline.core.clean_stored_images import clean_stored_images
from pipeline.core.schemas import DOWNLOADS, FACES, IMAGES, LABELS, TABLES
from pipeline.core.storage import ImageStore, Storage
from pipeline.core.tables import read_table, version, write_partition
from tests.core.test_migrate import WHEN, download, face_row, label
from tests.fixtures.metadata import PLANTED, gps_of, jpeg_with_metadata, pixels, png_with_metadata
from tests.fixtures.scrape import jpeg_bytes

DAY = "2026-11-02"
NEW_COLUMNS = ("metadata_stripped", "metadata_removed", "exif_orientation")
#: The images table as the previous release wrote it: without the columns added since.
OLD_IMAGES = pa.schema([f for f in IMAGES if f.name not in NEW_COLUMNS])
BLOB = re.compile(r"images/[0-9a-f]{2}/[0-9a-f]{64}")


def blobs(storage: Storage) -> dict[str, bytes]:
    return {k: storage.get_bytes(k) for k in storage.list("images/") if BLOB.fullmatch(k)}


def stored_before(storage: Storage) -> dict[str, str]:
    """Images as the previous release stored them, bytes unchanged: name -> sha256."""
    store = ImageStore(storage)
    originals = {"gps": (jpeg_with_metadata(orientation=6), "JPEG"), "text": (png_with_metadata(), "PNG"),
                 "clean": (jpeg_bytes(seed=4), "JPEG")}
    return {name: store.put(data)[0] for name, (data, _) in originals.items()}, originals


def old_partition(storage: Storage, table: str, value: str, rows: pa.Table) -> None:
    t = TABLES[table]
    buf = io.BytesIO()
    pq.write_table(rows, buf)
    storage.put_bytes(f"{t.path}/{t.partition}={value}/data.parquet", buf.getvalue())


def image_row(sha: str, data: bytes, fmt: str) -> dict:
    return {"sha256": sha, "width": 96, "height": 64, "format": fmt, "bytes": len(data),
            "storage_key": keys.image_bytes(sha)}


def rows_naming(shas: dict[str, str]) -> dict[str, pa.Table]:
    """downloads (two posts share the GPS photo), faces and labels rows naming the stored images."""
    gps, text, clean = shas["gps"], shas["text"], shas["clean"]
    downloads = [{**download(i), "sha256": sha} for i, sha in enumerate((gps, gps, text, clean))]
    faces = [{**face_row(0), "sha256": gps}, {**face_row(1), "sha256": clean}]
    labels = [{**label(0, "a" * 64), "image_sha256": gps}, {**label(1, "b" * 64), "image_sha256": clean}]
    return {"downloads": pa.Table.from_pylist(downloads, schema=DOWNLOADS),
            "faces": pa.Table.from_pylist(faces, schema=FACES),
            "labels": pa.Table.from_pylist(labels, schema=LABELS)}


def test_migrate_strips_old_images_and_rekeys_every_table(local_storage, capsys):
    storage = local_storage
    shas, originals = stored_before(storage)
    assert gps_of(storage.get_bytes(keys.image_bytes(shas["gps"])))  # the store holds where the photo was taken
    old_partition(storage, "images", DAY, pa.Table.from_pylist(
        [image_row(shas[n], data, fmt) for n, (data, fmt) in originals.items()], schema=OLD_IMAGES))
    for table, rows in rows_naming(shas).items():
        old_partition(storage, table, "L1" if table == "labels" else DAY, rows)
    storage.put_text("state/tombstones.json", json.dumps([{"at": WHEN.isoformat(), "reason": "request", "authors": [],
                                                           "posts": [["https://x.example", "999"]],
                                                           "images": [shas["gps"]]}]))
    storage.put_text(keys.PUBLISHED_LABELS, json.dumps({"run_id": "L1", "labels_sha256": "old"}))

    assert main(["--set", f"storage.root={storage.root}", "migrate"]) == 0
    out = capsys.readouterr().out
    assert "stripped 3 stored image(s): 2 rewritten under a new digest" in out and "1 had none" in out
    assert "labels run L1 is published" in out

    # No stored byte names a place, a camera, a creator or a caption; the pictures are the same.
    stored = blobs(storage)
    assert len(stored) == 3 and not [k for k, data in stored.items() for mark in PLANTED if mark in data]
    images = {r["format"] + ("-clean" if not r["metadata_removed"] else ""): r
              for r in read_table(storage, "images").to_pylist()}
    gps, text, clean = images["JPEG"], images["PNG"], images["JPEG-clean"]
    assert clean["sha256"] == shas["clean"]  # nothing to remove: same bytes, same digest
    for row, name in ((gps, "gps"), (text, "text")):
        data = stored[row["storage_key"]]
        assert row["sha256"] != shas[name] and row["bytes"] == len(data) and gps_of(data) == {}
        assert (pixels(data) == pixels(originals[name][0])).all()
        assert not storage.exists(keys.image_bytes(shas[name]))  # the old bytes are gone
    assert all(r["metadata_stripped"] for r in images.values())
    assert gps["exif_orientation"] == 6 and set(gps["metadata_removed"]) == {"exif", "xmp", "iptc", "comment"}
    assert text["exif_orientation"] == 1 and set(text["metadata_removed"]) == {"exif", "text"}

    # Everything that named an old digest names the new one.
    renamed = {shas["gps"]: gps["sha256"], shas["text"]: text["sha256"], shas["clean"]: shas["clean"]}
    assert sorted(read_table(storage, "downloads")["sha256"].to_pylist()) == sorted(
        renamed[s] for s in rows_naming(shas)["downloads"]["sha256"].to_pylist())
    faces = {r["sha256"]: r for r in read_table(storage, "faces").to_pylist()}
    assert set(faces) == {gps["sha256"], shas["clean"]} and faces[gps["sha256"]]["n_faces"] == 1
    assert set(read_table(storage, "labels")["image_sha256"].to_pylist()) == {gps["sha256"], shas["clean"]}
    (tomb,) = read_table(storage, "tombstones").to_pylist()
    assert gps["sha256"] in tomb["images"]  # a forget that was cut short still cleans the image by its new name

    # A rerun finds nothing to do and commits nothing.
    versions = {t: version(storage, t) for t in ("images", "downloads", "faces", "labels", "tombstones")}
    assert main(["--set", f"storage.root={storage.root}", "migrate"]) == 0
    assert "no stored image left to strip" in capsys.readouterr().out
    assert {t: version(storage, t) for t in versions} == versions and len(blobs(storage)) == 3


def test_a_delta_table_written_before_the_new_columns_reads_and_gains_them(local_storage, capsys):
    from deltalake import write_deltalake

    from pipeline.core.tables import location

    shas, originals = stored_before(local_storage)
    rows = pa.Table.from_pylist([image_row(shas[n], data, fmt) for n, (data, fmt) in originals.items()],
                                schema=OLD_IMAGES)
    uri, options = location(local_storage, "images")
    write_deltalake(uri, rows.append_column("dt", pa.array([DAY] * 3)), partition_by=["dt"], storage_options=options)
    before = read_table(local_storage, "images", columns=["sha256", "exif_orientation", "metadata_stripped"])
    assert before.num_rows == 3 and before["exif_orientation"].null_count == 3  # readable before any upgrade

    assert main(["--set", f"storage.root={local_storage.root}", "migrate"]) == 0
    out = capsys.readouterr().out
    assert "added column(s) metadata_stripped, metadata_removed, exif_orientation" in out
    assert "stripped 3 stored image(s)" in out
    assert read_table(local_storage, "images")["metadata_stripped"].to_pylist() == [True] * 3


def test_dry_run_counts_and_changes_nothing(local_storage, capsys):
    shas, originals = stored_before(local_storage)
    write_partition(local_storage, "images", DAY, pa.Table.from_pylist(
        [image_row(shas[n], data, fmt) for n, (data, fmt) in originals.items()], schema=IMAGES))
    before = blobs(local_storage)
    assert main(["--set", f"storage.root={local_storage.root}", "migrate", "--dry-run"]) == 0
    assert "would strip the metadata of 3 stored image(s)" in capsys.readouterr().out
    assert blobs(local_storage) == before


def test_a_run_killed_mid_batch_is_finished_by_the_next(local_storage, monkeypatch):
    storage = local_storage
    shas, originals = stored_before(storage)
    write_partition(storage, "images", DAY, pa.Table.from_pylist(
        [image_row(shas[n], data, fmt) for n, (data, fmt) in originals.items()], schema=IMAGES))
    for table, rows in rows_naming(shas).items():
        write_partition(storage, table, "L1" if table == "labels" else DAY, rows)

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    # Killed after images and downloads moved, before faces did: the old bytes are still named there.
    monkeypatch.setattr(cleaning, "_move_faces", killed)
    with pytest.raises(RuntimeError, match="killed"):
        clean_stored_images(storage)
    assert storage.exists(keys.STRIP_JOURNAL) and storage.exists(keys.image_bytes(shas["gps"]))
    assert read_table(storage, "images", columns=["metadata_stripped"])["metadata_stripped"].to_pylist() == [True] * 3
    monkeypatch.undo()

    result = clean_stored_images(storage)
    assert result.resumed == 3 and result.todo == 0  # the images table had moved: only the journal knew
    assert not storage.exists(keys.STRIP_JOURNAL)
    assert not storage.exists(keys.image_bytes(shas["gps"])) and not storage.exists(keys.image_bytes(shas["text"]))
    new = {r["format"]: r["sha256"] for r in read_table(storage, "images").to_pylist() if r["metadata_removed"]}
    assert set(read_table(storage, "faces")["sha256"].to_pylist()) == {new["JPEG"], shas["clean"]}
    assert clean_stored_images(storage).todo == 0 and len(blobs(storage)) == 3


def test_bytes_that_cannot_be_stripped_are_reported_and_left(local_storage, capsys):
    broken = jpeg_with_metadata()[:-2] + b"\xff\xfe\x40\x00gone"  # a comment claiming 16 KB after the scan
    sha, key = ImageStore(local_storage).put(broken)
    write_partition(local_storage, "images", DAY, pa.Table.from_pylist([image_row(sha, broken, "JPEG")], schema=IMAGES))
    assert main(["--set", f"storage.root={local_storage.root}", "migrate"]) == 1
    err = capsys.readouterr().err
    assert "1 stored image(s) could not be stripped" in err and sha in err and "past the end" in err
    assert local_storage.get_bytes(key) == broken

"""The face-detection stage over storage: plan, detect a shard, rows, reruns, CLI."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline.core.schemas import FACES
from pipeline.core.tables import list_partitions, read_table
from pipeline.faces.detect_faces import (
    current_detector_id,
    detect_manifest,
    detect_shard,
    detect_stream,
    merge_summaries,
    plan_shards,
    shard_partition,
    write_shard_manifests,
)
from tests.fixtures.faces import photo_bytes, store_images, truncated_jpeg

DAY = "2026-11-23"


def _rows(table: pa.Table) -> dict[str, dict]:
    return {r["sha256"]: r for r in table.to_pylist()}


def test_detect_shard_writes_one_row_per_image(faces_cfg, local_storage, face_detector):
    shas = store_images(local_storage, {
        "t1": photo_bytes("t1"), "astronaut": photo_bytes("astronaut"), "chelsea": photo_bytes("chelsea"),
        "truncated": truncated_jpeg(), "garbage": b"<html>404</html>",
    })
    (shard,) = plan_shards(faces_cfg, local_storage)
    assert sorted(shard) == sorted(shas.values())

    summary = detect_shard(faces_cfg, 0, shard, DAY, storage=local_storage, detector=face_detector)
    assert summary["images"] == 5 and summary["many_faces"] == 1 and summary["one_face"] == 1
    assert summary["no_face"] == 1 and summary["decode_error"] == 2
    assert summary["provider"] == "CPUExecutionProvider"
    assert summary["partition"] == shard_partition(DAY, 0, shard)
    assert summary["partition"].startswith(f"{DAY}-s0000-")

    table = read_table(local_storage, "faces")
    assert table.schema.remove(table.schema.get_field_index("dt")).equals(FACES, check_metadata=False)
    rows = _rows(table)
    t1 = rows[shas["t1"]]
    assert t1["status"] == "ok" and t1["n_faces"] == 6 and len(t1["faces"]) == 6
    assert (t1["width"], t1["height"]) == (1280, 886)
    assert t1["detector_id"] == face_detector.detector_id
    for f in t1["faces"]:
        assert 0 <= f["x1"] < f["x2"] <= 1280 and 0 <= f["y1"] < f["y2"] <= 886
        assert f["score"] >= 0.5 and len(f["landmarks"]) == 10
    big = max((f["x2"] - f["x1"]) * (f["y2"] - f["y1"]) for f in t1["faces"])
    assert t1["largest_face_share"] == pytest.approx(big / (1280 * 886), rel=1e-4)
    assert 0 < t1["largest_face_cx"] < 1 and 0 < t1["largest_face_cy"] < 1

    astro = rows[shas["astronaut"]]
    assert astro["n_faces"] == 1 and 0.01 < astro["largest_face_share"] < 0.2
    cat = rows[shas["chelsea"]]
    assert cat["status"] == "ok" and cat["n_faces"] == 0 and cat["largest_face_share"] == 0.0
    assert cat["largest_face_cx"] is None

    # Every decoded image has its perceptual hash: the one decode of the pipeline is here.
    assert all(len(r["phash"]) == 16 and int(r["phash"], 16) >= 0 for r in (t1, astro, cat))
    assert len({t1["phash"], astro["phash"], cat["phash"]}) == 3

    for name in ("truncated", "garbage"):
        row = rows[shas[name]]
        assert row["status"] == "decode_error" and row["error"] and row["n_faces"] == 0
        assert row["largest_face_share"] is None and row["phash"] is None
    assert "truncated" in rows[shas["truncated"]]["error"]

    # the resolved config is saved beside the partition, secrets blanked
    assert local_storage.exists(summary["key"].rsplit("/", 1)[0] + "/_config.toml")


def test_rerun_skips_done_images_and_new_model_redetects(faces_cfg, local_storage, face_detector):
    store_images(local_storage, {"t1": photo_bytes("t1"), "coffee": photo_bytes("coffee")})
    (shard,) = plan_shards(faces_cfg, local_storage)
    detect_shard(faces_cfg, 0, shard, DAY, storage=local_storage, detector=face_detector)
    assert plan_shards(faces_cfg, local_storage) == []  # same detector id: nothing left
    # a new model (another detector id) re-detects everything
    assert plan_shards(faces_cfg, local_storage, detector_id="0" * 64) == [sorted(shard)]
    # new images arrive: only they are planned
    new = store_images(local_storage, {"astronaut": photo_bytes("astronaut")}, partition="2026-11-24")
    assert plan_shards(faces_cfg, local_storage) == [[new["astronaut"]]]


def test_retried_shard_replaces_its_partition_and_others_survive(faces_cfg, local_storage, face_detector):
    shas = store_images(local_storage, {"t1": photo_bytes("t1"), "coffee": photo_bytes("coffee"),
                                        "chelsea": photo_bytes("chelsea")})
    first = [shas["t1"]]
    detect_shard(faces_cfg, 0, first, DAY, storage=local_storage, detector=face_detector)
    detect_shard(faces_cfg, 0, first, DAY, storage=local_storage, detector=face_detector)  # a task retry
    assert len(list_partitions(local_storage, "faces")) == 1
    # a re-planned run numbers its shards from 0 again but must not overwrite the first
    (rest,) = plan_shards(faces_cfg, local_storage)
    assert sorted(rest) == sorted([shas["coffee"], shas["chelsea"]])
    detect_shard(faces_cfg, 0, rest, DAY, storage=local_storage, detector=face_detector)
    assert len(list_partitions(local_storage, "faces")) == 2
    assert read_table(local_storage, "faces").num_rows == 3


def test_missing_image_bytes_are_a_row_and_retried(faces_cfg, local_storage, face_detector):
    shas = store_images(local_storage, {"t1": photo_bytes("t1"), "gone": photo_bytes("coffee")})
    local_storage.delete(f"images/{shas['gone'][:2]}/{shas['gone']}")
    (shard,) = plan_shards(faces_cfg, local_storage)
    summary = detect_shard(faces_cfg, 0, shard, DAY, storage=local_storage, detector=face_detector)
    assert summary["missing"] == 1
    row = _rows(read_table(local_storage, "faces"))[shas["gone"]]
    assert row["status"] == "missing" and "not in storage" in row["error"]
    assert plan_shards(faces_cfg, local_storage) == [[shas["gone"]]]  # missing is not final


def test_shards_respect_size_and_max_shards(faces_cfg, local_storage):
    import io

    from PIL import Image

    images = {}
    for i in range(7):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(buf, "PNG")
        images[str(i)] = buf.getvalue()
    store_images(local_storage, images)
    faces_cfg.faces.shard_size = 3
    shards = plan_shards(faces_cfg, local_storage)
    assert [len(s) for s in shards] == [3, 3, 1]
    assert [len(s) for s in plan_shards(faces_cfg, local_storage, max_shards=2)] == [4, 3]
    assert sorted(sum(shards, [])) == sum(shards, [])  # sorted, stable across plans


def test_plan_with_no_images_table_is_empty(faces_cfg, local_storage):
    assert plan_shards(faces_cfg, local_storage) == []


def test_manifest_round_trip_on_both_storages(faces_cfg, storage, face_detector, monkeypatch):
    """What the DAG does: plan to manifests (small XCom), detect from a manifest, on local and S3."""
    import pipeline.core.storage as storage_mod
    import pipeline.faces.detector as detector_mod

    store_images(storage, {"t1": photo_bytes("t1"), "chelsea": photo_bytes("chelsea")})
    monkeypatch.setattr(storage_mod, "open_storage", lambda _cfg: storage)
    monkeypatch.setattr(detector_mod, "FaceDetector", lambda _cfg: face_detector)
    (shard,) = write_shard_manifests(faces_cfg, DAY, max_shards=1024)
    assert set(shard) == {"shard_id", "manifest", "n"} and shard["n"] == 2
    summary = detect_manifest(faces_cfg, shard, DAY)
    assert summary["images"] == 2 and summary["many_faces"] == 1
    total = merge_summaries([summary])
    assert total["images"] == 2 and total["providers"] == ["CPUExecutionProvider"]
    assert write_shard_manifests(faces_cfg, DAY) == []  # all done


def test_stream_is_ordered_bounded_and_reports_missing_files(face_detector, tmp_path):
    paths = []
    for i, name in enumerate(["t1", "chelsea", "astronaut"] * 4):
        p = tmp_path / f"{i:02d}-{name}"
        p.write_bytes(photo_bytes(name))
        paths.append(p)
    paths.insert(5, tmp_path / "does-not-exist.jpg")
    out = list(detect_stream(face_detector, ((p, p.read_bytes) for p in paths), decode_workers=2, queue_size=2))
    assert [k for k, _ in out] == paths
    counts = [len(d.faces) for _, d in out if d.status == "ok"]
    assert counts == [6, 0, 1] * 4
    assert [d.status for k, d in out if k.name == "does-not-exist.jpg"] == ["missing"]


# ---------------------------------------------------------------- CLI


def test_cli_detect_prints_one_json_line_per_file(faces_model, tmp_path, capsys, monkeypatch):
    from likerank.cli.main import main

    monkeypatch.setenv("LIKERANK_FACES__MODEL", str(faces_model))
    good = tmp_path / "t1.jpg"
    good.write_bytes(photo_bytes("t1"))
    bad = tmp_path / "half.jpg"
    bad.write_bytes(truncated_jpeg())
    code = main(["--set", "faces.providers=CPUExecutionProvider", "faces", "detect", str(good), str(bad)])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert code == 1  # one file failed
    assert [x["path"] for x in lines] == [str(good), str(bad)]
    assert lines[0]["status"] == "ok" and lines[0]["n_faces"] == 6 and len(lines[0]["faces"][0]["landmarks"]) == 10
    assert lines[1]["status"] == "decode_error" and lines[1]["error"]


def test_cli_faces_detects_stored_images_with_limit(faces_model, tmp_path, capsys, monkeypatch):
    from likerank.cli.main import main
    from pipeline.core.storage import LocalStorage

    monkeypatch.setenv("LIKERANK_FACES__MODEL", str(faces_model))
    root = tmp_path / "data"
    store_images(LocalStorage(root), {"t1": photo_bytes("t1"), "coffee": photo_bytes("coffee"),
                                      "astronaut": photo_bytes("astronaut")})
    args = ["--set", f"storage.root={root}", "--set", "faces.providers=CPUExecutionProvider", "faces"]
    assert main([*args, "--limit", "2", "--date", DAY]) == 0
    out = capsys.readouterr().out
    assert "faces: 2 image(s)" in out and "images/s on CPUExecutionProvider" in out
    assert main([*args, "--date", DAY]) == 0
    assert "faces: 1 image(s)" in capsys.readouterr().out
    assert main([*args]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert read_table(LocalStorage(root), "faces").num_rows == 3


def test_current_detector_id_is_the_model_sha256(faces_cfg, face_detector):
    assert current_detector_id(faces_cfg) == face_detector.detector_id


def _sideways_t1(orientation: int) -> bytes:
    """t1 (six faces) as a phone held sideways stores it: pixels turned 90 degrees, and an EXIF
    orientation tag saying how to turn them back (6: 90 clockwise, 8: 90 anticlockwise)."""
    import io

    from PIL import Image

    from tests.fixtures.metadata import exif_with_gps

    turned = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    with Image.open(io.BytesIO(photo_bytes("t1"))) as im:
        buf = io.BytesIO()
        im.transpose(turned).save(buf, "JPEG", quality=95, exif=exif_with_gps(orientation))
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_sideways_photo_is_detected_upright_after_its_exif_is_stripped(
        faces_cfg, scrape_cfg, local_storage, face_detector, fake_mastodon, orientation):
    import io

    from PIL import Image

    from pipeline.core.schemas import IMAGES
    from pipeline.core.tables import write_partition
    from pipeline.scrape.download import Downloader
    from tests.fixtures.metadata import gps_of
    from tests.fixtures.scrape import FakeMastodon

    sideways = _sideways_t1(orientation)
    fake_mastodon.faults["sideways.jpg"] = lambda h: FakeMastodon.send(h, 200, sideways, "image/jpeg")
    with Downloader(scrape_cfg.scrape, local_storage) as downloader:  # the scraper's own path: strip, store, row
        image = downloader.fetch("p1", f"{fake_mastodon.url}/fault/sideways.jpg").image
    write_partition(local_storage, "images", DAY, pa.Table.from_pylist([image], schema=IMAGES))
    stored = local_storage.get_bytes(image["storage_key"])
    assert image["exif_orientation"] == orientation
    assert gps_of(stored) == {} and not Image.open(io.BytesIO(stored)).getexif()

    (shard,) = plan_shards(faces_cfg, local_storage)
    detect_shard(faces_cfg, 0, shard, DAY, storage=local_storage, detector=face_detector)
    row = _rows(read_table(local_storage, "faces"))[image["sha256"]]
    assert row["status"] == "ok" and row["n_faces"] == 6  # as many as in the upright original
    assert (row["width"], row["height"]) == (1280, 886)  # the upright frame the boxes are in

    # Without the recorded orientation the same bytes are decoded sideways: most faces are missed.
    unturned = list(detect_stream(face_detector, [("x", lambda: stored)], orientations={"x": 1}))
    assert unturned[0][1].status == "ok" and len(unturned[0][1].faces) < 6

"""The photo attributes the face stage stores in ``faces``: measured from the pixels decoded for
detection, sane on real photos, null where nothing decoded, and queryable by an analyst,
also over a table whose older rows were written before the columns existed."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageOps

from pipeline.core.config import FacesConfig
from pipeline.core.query import run_query
from pipeline.core.tables import read_table
from pipeline.faces import photo_attributes as PA
from pipeline.faces.detect_faces import detect_shard, plan_shards
from tests.fixtures.faces import (
    PHOTO_ATTRIBUTE_COLUMNS,
    photo_bytes,
    store_images,
    truncated_jpeg,
    write_old_faces,
)

DAY = "2026-11-23"


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _bordered_astronaut() -> bytes:
    astronaut = Image.open(io.BytesIO(photo_bytes("astronaut"))).convert("RGB")
    return _jpeg(ImageOps.expand(astronaut, border=24, fill=(255, 255, 255)))


def test_geometry_of_the_largest_face():
    small = {"x1": 0.0, "y1": 0.0, "x2": 10.0, "y2": 10.0, "landmarks": [0.0] * 10}
    # eyes at (20, 20) and (40, 40): the head rolled 45 degrees
    big = {"x1": 10.0, "y1": 20.0, "x2": 50.0, "y2": 70.0, "landmarks": [20.0, 20.0, 40.0, 40.0, *[0.0] * 6]}
    g = PA.face_geometry([small, big], 100, 200)
    assert g["largest_face_share"] == pytest.approx(40 * 50 / (100 * 200))
    assert g["largest_face_height"] == pytest.approx(50 / 200)
    assert (g["largest_face_cx"], g["largest_face_cy"]) == pytest.approx((0.3, 0.225))
    assert g["head_tilt"] == pytest.approx(45)
    assert PA.face_geometry([], 100, 200) == {**dict.fromkeys(PA.FACE_COLUMNS),
                                              "largest_face_share": 0.0, "largest_face_height": 0.0}
    assert PA.face_geometry([big], None, None) == dict.fromkeys(PA.FACE_COLUMNS)  # did not decode


def test_bytes_are_measured_as_the_stage_decodes_them():
    assert PA.FIT_PX == FacesConfig().det_size  # old rows read as the default detector input


def test_detect_shard_stores_the_attributes_of_real_photos(faces_cfg, local_storage, face_detector):
    shas = store_images(local_storage, {
        "t1": photo_bytes("t1"), "astronaut": photo_bytes("astronaut"), "camera": photo_bytes("camera"),
        "chelsea": photo_bytes("chelsea"), "bordered": _bordered_astronaut(), "truncated": truncated_jpeg(),
    })
    (shard,) = plan_shards(faces_cfg, local_storage)
    detect_shard(faces_cfg, 0, shard, DAY, storage=local_storage, detector=face_detector)
    rows = {r["sha256"]: r for r in read_table(local_storage, "faces").to_pylist()}
    t1, astro, camera, cat = (rows[shas[n]] for n in ("t1", "astronaut", "camera", "chelsea"))
    bordered, broken = rows[shas["bordered"]], rows[shas["truncated"]]

    for r in (t1, astro, camera, cat, bordered):  # every decoded photo: in range
        assert 0 < r["brightness"] <= 255 and 0 < r["contrast"] < 128 and 0 <= r["saturation"] <= 1
        assert r["sharpness"] > 0 and isinstance(r["black_and_white"], bool) and isinstance(r["border"], bool)
    # insightface's t1: six people; the largest face is a sixth of the height, its head a little tilted
    assert t1["n_faces"] == 6 and 0.1 < t1["largest_face_height"] < 0.3 and 0 <= t1["head_tilt"] < 30
    # skimage's astronaut: one face ~120 px tall in 512, nearly upright, high in the frame, in colour
    assert astro["n_faces"] == 1 and astro["largest_face_height"] == pytest.approx(0.23, abs=0.04)
    assert astro["head_tilt"] < 8 and astro["largest_face_cy"] < 0.3
    assert not astro["black_and_white"] and not astro["border"] and astro["saturation"] > 0.2
    # skimage's camera (a greyscale PNG): black and white, no saturation
    assert camera["black_and_white"] and camera["saturation"] < 0.02
    # a white frame is a border, and the picture inside it reads as the plain one
    assert bordered["border"] and not bordered["black_and_white"]
    assert bordered["brightness"] == pytest.approx(astro["brightness"], abs=6)
    assert bordered["saturation"] == pytest.approx(astro["saturation"], abs=0.03)
    # the cat has no human face: no face geometry but its pixels
    assert cat["n_faces"] == 0 and cat["largest_face_height"] == 0.0 and cat["head_tilt"] is None
    assert cat["brightness"] is not None
    # nothing decoded, nothing measured
    assert broken["status"] == "decode_error" and all(broken[c] is None for c in PHOTO_ATTRIBUTE_COLUMNS)

    # the pixels are the ones detection decoded: measuring the bytes the same way gives the same numbers
    again = PA.measure_bytes(photo_bytes("astronaut"))
    for name, value in vars(again).items():
        assert astro[name] == pytest.approx(value, rel=1e-6), name


def test_an_analyst_queries_the_attributes_old_rows_read_null(faces_cfg, local_storage, face_detector):
    from pipeline.faces.detect_faces import detect_stream, faces_table

    # a table written by a release before the attributes: its files and schema lack the columns
    old = store_images(local_storage, {"t1": photo_bytes("t1")}, partition="2026-11-01")
    results = list(detect_stream(face_detector, [(old["t1"], lambda: photo_bytes("t1"))], decode_workers=1))
    write_old_faces(local_storage, "2026-11-01-s0000-old", faces_table(results, face_detector.detector_id))

    new = store_images(local_storage, {"astronaut": photo_bytes("astronaut"), "camera": photo_bytes("camera")},
                       partition="2026-11-24")
    (shard,) = plan_shards(faces_cfg, local_storage)
    assert sorted(shard) == sorted(new.values())
    detect_shard(faces_cfg, 0, shard, DAY, storage=local_storage, detector=face_detector)

    got = run_query(local_storage, """
        select count(*) as n, count(brightness) as measured, avg(brightness) as brightness,
               sum(case when black_and_white then 1 else 0 end) as bw, max(head_tilt) as tilt
        from faces where status = 'ok'""").to_pylist()[0]
    rows = {r["sha256"]: r for r in read_table(local_storage, "faces").to_pylist()}
    assert got["n"] == 3 and got["measured"] == 2 and got["bw"] == 1  # the old row: null, not counted
    assert got["brightness"] == pytest.approx((rows[new["astronaut"]]["brightness"]
                                               + rows[new["camera"]]["brightness"]) / 2)
    assert 0 < got["tilt"] < 10
    assert all(rows[old["t1"]][c] is None for c in PHOTO_ATTRIBUTE_COLUMNS)
    assert rows[old["t1"]]["n_faces"] == 6  # the rest of the old row is as written

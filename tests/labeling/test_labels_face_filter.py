"""The labeler's face filter, table-driven: ``faces`` rows -> :func:`face_counts` (the SQL the
labeler joins) -> :func:`apply_filters`' ``face_filter`` and ``no_face_detection`` drops."""

from __future__ import annotations

import pyarrow as pa
import pytest

from labeling.eligibility import CANDIDATES, apply_filters, face_counts
from pipeline.core.config import FacesConfig, LabelingConfig
from pipeline.faces.detect_faces import Detection, faces_table
from pipeline.faces.detector import Face


def face(size: float, score: float = 0.9) -> Face:
    return Face(0.0, 0.0, size, size, score, (0.0,) * 10)


# 100x100 images; a face of side s covers s*s/10_000 of it.
ROWS = {
    "none": Detection("ok", width=100, height=100),
    "one_big": Detection("ok", width=100, height=100, faces=[face(50)]),  # share 0.25
    "one_small": Detection("ok", width=100, height=100, faces=[face(10)]),  # share 0.01
    "two": Detection("ok", width=100, height=100, faces=[face(40), face(20)]),
    "one_sure_one_doubtful": Detection("ok", width=100, height=100, faces=[face(30, 0.9), face(60, 0.55)]),
    "broken": Detection("decode_error", error="truncated"),
}
TABLE = faces_table(list(ROWS.items()), "det")


def cfg(**kw) -> FacesConfig:
    c = FacesConfig(**kw)
    c.validate()
    return c


def passing_images(faces: pa.Table, fc: FacesConfig) -> set[str]:
    """The images whose post the labeler keeps, all other filters passing."""
    counted = {r["sha256"]: r for r in face_counts(faces, fc.min_score).to_pylist()}
    shas = faces.column("sha256").to_pylist()
    n = len(shas)
    cands = pa.table({
        "post_id": [str(i) for i in range(n)], "source": ["mastodon"] * n, "author_key": ["a"] * n, "image_sha256": shas,
        "likes": [1] * n, "followers": [100] * n, "n_tags": [1] * n, "age_days": [60.0] * n, "views": [None] * n,
        "n_faces": [counted.get(s, {}).get("n_faces") for s in shas],
        "face_share": [counted.get(s, {}).get("face_share") for s in shas],
    }, schema=CANDIDATES)
    lab = LabelingConfig()
    lab.min_followers, lab.max_followers = 0, 10**9
    alive, _ = apply_filters(cands, lab, fc)
    return {s for s, keep in zip(shas, alive, strict=True) if keep}


@pytest.mark.parametrize("settings, passing", [
    ({}, {"one_big", "one_small", "two", "one_sure_one_doubtful"}),  # default: >= 1 face
    ({"max_faces": 1}, {"one_big", "one_small"}),  # exactly-one-face dataset
    ({"max_faces": 1, "min_score": 0.7}, {"one_big", "one_small", "one_sure_one_doubtful"}),
    ({"min_face_share": 0.1}, {"one_big", "two", "one_sure_one_doubtful"}),
    ({"min_face_share": 0.1, "min_score": 0.7}, {"one_big", "two"}),  # the 60-px face does not count
    ({"min_faces": 2}, {"two", "one_sure_one_doubtful"}),
    ({"min_faces": 0}, {"none", "one_big", "one_small", "two", "one_sure_one_doubtful"}),  # never broken rows
    ({"min_faces": 0, "max_faces": 0, "min_score": 1.0}, {"none", "one_big", "one_small", "two",
                                                          "one_sure_one_doubtful"}),
])
def test_filter_table(settings, passing):
    assert passing_images(TABLE, cfg(**settings)) == passing


def test_shares_count_only_faces_at_min_score():
    shares = {r["sha256"]: r["face_share"] for r in face_counts(TABLE, 0.7).to_pylist()}
    assert shares["one_big"] == pytest.approx(0.25) and shares["none"] == 0.0
    assert shares["one_sure_one_doubtful"] == pytest.approx(0.09)  # the 60-px face scores 0.55
    assert "broken" not in shares  # not an ok detection: no face measure at all


def test_the_latest_ok_detection_of_an_image_counts():
    from datetime import UTC, datetime

    old = faces_table([("a", Detection("ok", width=100, height=100))], "det", datetime(2026, 1, 1, tzinfo=UTC))
    new = faces_table([("a", Detection("ok", width=100, height=100, faces=[face(50)]))], "det",
                      datetime(2026, 1, 2, tzinfo=UTC))
    failed = faces_table([("a", Detection("decode_error", error="x"))], "det", datetime(2026, 1, 3, tzinfo=UTC))
    counted = face_counts(pa.concat_tables([old, new, failed]), 0.5).to_pylist()
    assert [(r["sha256"], r["n_faces"]) for r in counted] == [("a", 1)]


def test_empty_table():
    assert face_counts(TABLE.slice(0, 0), 0.5).num_rows == 0
    assert passing_images(TABLE.slice(0, 0), cfg()) == set()

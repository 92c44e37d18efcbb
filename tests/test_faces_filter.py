"""``passes_face_filter``: the labeler's face predicate, table-driven."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import FacesConfig
from pipeline.faces import passes_face_filter
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
    mask = passes_face_filter(TABLE, cfg(**settings))
    assert mask.dtype == bool and mask.shape == (len(ROWS),)
    assert {name for name, keep in zip(ROWS, mask, strict=True) if keep} == passing


def test_pandas_frame_gives_the_same_mask():
    frame = TABLE.to_pandas()
    for settings in ({}, {"max_faces": 1, "min_score": 0.7}, {"min_face_share": 0.1}):
        np.testing.assert_array_equal(passes_face_filter(frame, cfg(**settings)),
                                      passes_face_filter(TABLE, cfg(**settings)))


def test_extra_columns_are_fine_and_missing_ones_are_named():
    joined = TABLE.append_column("post_id", TABLE.column("sha256"))
    assert passes_face_filter(joined, cfg()).sum() == 4
    with pytest.raises(ValueError, match="faces"):
        passes_face_filter(TABLE.drop_columns(["faces"]), cfg())
    with pytest.raises(TypeError, match="pyarrow Table or pandas DataFrame"):
        passes_face_filter([1, 2], cfg())


def test_empty_table():
    assert passes_face_filter(TABLE.slice(0, 0), cfg()).shape == (0,)

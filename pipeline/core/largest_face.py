"""The largest face of each stored image, as the ``faces`` table recorded it.

Training crops around it and an export ships it beside the image; both read it here so they
agree on which row and which face count (the newest ``ok`` row, the largest box by area).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.core.storage import Storage


def box_area(face: Mapping[str, Any]) -> float:
    """A face box's area (``x1, y1, x2, y2``), pixels squared; 0 for an empty box."""
    return max(0.0, face["x2"] - face["x1"]) * max(0.0, face["y2"] - face["y1"])


def largest_box(faces: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The face of ``faces`` (not empty) with the largest box."""
    return max(faces, key=box_area)


def largest_faces(storage: Storage, shas: set[str]) -> dict[str, tuple[list[float], float, float, str]]:
    """sha256 -> (largest face box [x1, y1, x2, y2], width, height, detector id), from the newest
    ok faces row. Width and height are the frame the box refers to, pixels (NaN: unknown); an
    image with no ok row, or whose newest ok row found no face, is absent."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.core.tables import list_partitions, read_table

    if not list_partitions(storage, "faces"):
        return {}
    cols = ["sha256", "detector_id", "status", "width", "height", "faces", "detected_at"]
    t = read_table(storage, "faces", columns=cols, filter=pc.field("status") == "ok")
    t = t.filter(pc.is_in(t["sha256"], value_set=pa.array(sorted(shas), pa.string())))
    newest: dict[str, dict] = {}
    for row in t.to_pylist():
        prev = newest.get(row["sha256"])
        if prev is None or row["detected_at"] > prev["detected_at"]:
            newest[row["sha256"]] = row
    out = {}
    for sha, row in newest.items():
        faces = row["faces"] or []
        if not faces:
            continue
        f = largest_box(faces)
        out[sha] = ([f["x1"], f["y1"], f["x2"], f["y2"]], row["width"] or math.nan,
                    row["height"] or math.nan, row["detector_id"])
    return out

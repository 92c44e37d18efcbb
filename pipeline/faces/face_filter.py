"""Which photos have the faces a dataset wants: the labeling stage's face predicate.

    from pipeline.faces import passes_face_filter
    keep = passes_face_filter(faces, cfg.faces)   # numpy bool array, one per row of `faces`

``faces`` is the ``faces`` table (a ``pyarrow.Table``, e.g. from
:func:`pipeline.faces.detect_faces.read_faces`) or a pandas DataFrame with its columns; the
columns used are ``status``, ``width``, ``height`` and ``faces``. A row passes when its
status is ``ok`` and, counting only faces with ``score >= min_score``:

* at least ``min_faces`` faces,
* at most ``max_faces`` faces (``max_faces = 0``: no upper limit),
* the largest counted face covers at least ``min_face_share`` of the image area.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.config import FacesConfig


def face_counts_and_shares(faces: Any, min_score: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the number of faces with ``score >= min_score`` and the largest such face's
    box area / image area (0 without one)."""
    import pyarrow.compute as pc

    table = _as_arrow(faces, ["faces", "width", "height"])
    n = table.num_rows
    lists = table.column("faces").combine_chunks()
    flat = lists.flatten()
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    counts = np.zeros(n, dtype=np.int64)
    largest = np.zeros(n, dtype=np.float64)
    if len(flat):
        score = flat.field("score").to_numpy(zero_copy_only=False).astype(np.float64)
        keep = score >= min_score
        area = np.clip(flat.field("x2").to_numpy(zero_copy_only=False) - flat.field("x1").to_numpy(zero_copy_only=False), 0, None) \
            * np.clip(flat.field("y2").to_numpy(zero_copy_only=False) - flat.field("y1").to_numpy(zero_copy_only=False), 0, None)
        np.add.at(counts, parent[keep], 1)
        np.maximum.at(largest, parent[keep], area[keep].astype(np.float64))
    w = table.column("width").to_numpy(zero_copy_only=False).astype(np.float64)
    h = table.column("height").to_numpy(zero_copy_only=False).astype(np.float64)
    pixels = np.where(np.isfinite(w * h) & (w * h > 0), w * h, np.inf)
    return counts, largest / pixels


def passes_face_filter(faces: Any, cfg: FacesConfig) -> np.ndarray:
    """Boolean mask over the rows of ``faces`` (pyarrow Table or pandas DataFrame of the
    ``faces`` table): ``True`` where the photo meets ``cfg.min_faces``, ``cfg.max_faces``,
    ``cfg.min_face_share`` and ``cfg.min_score`` (see the module docstring)."""
    table = _as_arrow(faces, ["status", "faces", "width", "height"])
    counts, share = face_counts_and_shares(table, cfg.min_score)
    status = table.column("status").to_numpy(zero_copy_only=False)
    mask = (status == "ok") & (counts >= cfg.min_faces) & (share >= cfg.min_face_share)
    if cfg.max_faces:
        mask &= counts <= cfg.max_faces
    return np.asarray(mask, dtype=bool)


def _as_arrow(faces: Any, columns: list[str]):
    import pyarrow as pa

    from pipeline.schemas import FACES

    if isinstance(faces, pa.Table):
        missing = [c for c in columns if c not in faces.column_names]
        if missing:
            raise ValueError(f"face filter: input lacks column(s) {', '.join(missing)} of the faces table")
        return faces.select(columns)
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a core dependency
        pd = None
    if pd is not None and isinstance(faces, pd.DataFrame):
        missing = [c for c in columns if c not in faces.columns]
        if missing:
            raise ValueError(f"face filter: input lacks column(s) {', '.join(missing)} of the faces table")
        schema = pa.schema([FACES.field(c) for c in columns])
        return pa.Table.from_pandas(faces[columns], schema=schema, preserve_index=False)
    raise TypeError(f"face filter: expected a pyarrow Table or pandas DataFrame, got {type(faces).__name__}")

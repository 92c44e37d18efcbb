"""Training data: the published-labels gate, examples with face boxes, the Dataset. Also the tiny
published labels run the other training tests import (test_train*.py, test_launch*.py).

Images are 64x64 PNGs: grey noise with one square "face" whose brightness depends on the
label (positives bright, negatives dark, plus noise), so a small net's loss can fall in a
couple of epochs. Faces rows carry that square's box, so face crops are exercised.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from pipeline.core import keys
from pipeline.core.config import load_config
from pipeline.core.labels_run import write_labels_run
from pipeline.core.schemas import FACES, LABELS
from pipeline.core.storage import ImageStore, Storage
from pipeline.core.tables import get_json, partition_sha256, put_json, write_partition

LABELS_RUN = "lbl-test-1"
DETECTOR = "det-test-sha"


def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_labels_run(storage: Storage, *, run_id: str = LABELS_RUN, n: dict[str, int] | None = None,
                    publish: bool = True, seed: int = 0, size: int = 64, encode=png) -> pa.Table:
    """Write images, a faces partition and labels run ``run_id`` (published unless told not to).
    ``encode``: pixels (H x W x 3 uint8) -> stored bytes (PNG; bench/train_input.py stores JPEGs)."""
    n = n or {"train": 64, "val": 16, "test": 16}
    rng = np.random.default_rng(seed)
    images = ImageStore(storage)
    rows, faces = [], []
    i = 0
    for split, count in n.items():
        for _ in range(count):
            label = i % 2
            quality = rng.normal(0.8 if label else -0.8, 0.5)
            arr = rng.integers(60, 190, size=(size, size, 3), dtype=np.uint8)
            side = int(rng.integers(size // 3, size // 2))
            x1, y1 = (int(v) for v in rng.integers(0, size - side, size=2))
            level = int(np.clip(128 + 70 * quality, 0, 255))
            arr[y1:y1 + side, x1:x1 + side] = np.clip(level + rng.normal(0, 10, (side, side, 3)), 0, 255).astype(np.uint8)
            sha, _ = images.put(encode(arr))
            rank = 1 + (i // 2) % 8 + (8 if label else 0)  # groups of 16: positives rank 9..16
            rows.append({
                "post_id": f"p{i:04d}", "source": "mastodon", "image_sha256": sha, "author_key": f"a-{split}-{i // 4}",
                "likes": 10 * rank, "followers": 1000, "n_tags": 1, "age_days": 40.0, "exposure": 1000.0,
                "group_id": i // 16, "rank_in_group": rank, "label": label, "score": (rank - 0.5) / 16,
                "split": split, "labeler": "groups", "params_hash": "p" * 16, "run_id": run_id,
            })
            face = {"x1": float(x1), "y1": float(y1), "x2": float(x1 + side), "y2": float(y1 + side),
                    "score": 0.9, "landmarks": [0.0] * 10}
            faces.append({
                "sha256": sha, "detector_id": DETECTOR, "status": "ok", "error": None, "width": size,
                "height": size, "n_faces": 1, "faces": [face], "largest_face_share": side * side / size / size,
                "largest_face_cx": (x1 + side / 2) / size, "largest_face_cy": (y1 + side / 2) / size,
                "detected_at": datetime(2026, 1, 1, tzinfo=UTC),
            })
            i += 1
    labels = pa.Table.from_pylist(rows, schema=LABELS)
    write_partition(storage, "labels", run_id, labels)
    positive = sum(r["label"] for r in rows)
    write_labels_run(storage, {  # the record, as the labeler writes it beside its labels
        "run_id": run_id, "labeler": "groups", "params_hash": "p" * 16, "group_size": 16,
        "params": load_config(env={}, overrides=["labeling.group_size=16"]).to_dict()["labeling"],
        "labels_sha256": partition_sha256(storage, "labels", run_id), "rows_out": len(rows), "groups": len(rows) // 16,
        "dropped": {}, "sources": {"mastodon": {"rows_out": len(rows), "groups": len(rows) // 16, "positive": positive}},
        "splits": {split: count for split, count in n.items()},
        "label_balance": {"positive": positive, "negative": len(rows) - positive},
    })
    write_partition(storage, "faces", "2026-01-01", pa.Table.from_pylist(faces, schema=FACES))
    if publish:  # as labeling's validate + publish leave it: a passing result for these bytes
        sha = partition_sha256(storage, "labels", run_id)
        put_json(storage, keys.validation_result(run_id), {"run_id": run_id, "success": True, "labels_sha256": sha})
        put_json(storage, keys.PUBLISHED_LABELS, {
            "run_id": run_id, "published_at": "2026-01-02T00:00:00Z", "rows": len(rows),
            "params_hash": "p" * 16, "labeler": "groups", "validation_key": keys.validation_result(run_id),
            "labels_sha256": sha,
        })
    return labels


def truth_file(path, labels: pa.Table) -> str:
    """A simulator-style truth file: post_id, quality (here: the label plus noise)."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    q = np.asarray(labels["label"].to_pylist(), dtype=float) + rng.normal(0, 0.8, len(labels))
    visual = [None if i % 10 == 0 else v for i, v in enumerate(q + rng.normal(0, 0.3, len(q)))]  # nulls, as for boosts
    pq.write_table(pa.table({"post_id": labels["post_id"], "quality": q, "visual_quality": visual}), path)
    return str(path)


#: Small, fast training settings for CPU tests (resnet18 at 32 px, random init).
TINY = [
    "training.backbone=resnet18", "training.weights=none", "training.image_size=32",
    "training.crop=face", "training.epochs=3", "training.batch_size=16", "training.lr=0.001",
    "training.workers=0", "training.nproc=2",
]


# --------------------------------------------------------------------------- tests

import pytest  # noqa: E402

from pipeline.core.published import LabelsNotPublished, require_published  # noqa: E402
from pipeline.faces.crop import face_crop_box  # noqa: E402
from training.data import LabeledImages, load_examples  # noqa: E402


def test_unpublished_labels_are_refused(local_storage):
    with pytest.raises(LabelsNotPublished, match="no labels run is published"):
        require_published(local_storage)
    make_labels_run(local_storage, publish=False, n={"train": 4, "val": 2, "test": 2})
    with pytest.raises(LabelsNotPublished, match="no labels run is published"):
        require_published(local_storage, LABELS_RUN)


def test_only_the_published_run_is_trainable(local_storage):
    make_labels_run(local_storage, n={"train": 4, "val": 2, "test": 2})
    make_labels_run(local_storage, run_id="lbl-unvalidated", publish=False, n={"train": 4, "val": 2, "test": 2})
    assert require_published(local_storage)["run_id"] == LABELS_RUN
    assert require_published(local_storage, LABELS_RUN)["run_id"] == LABELS_RUN
    with pytest.raises(LabelsNotPublished, match="'lbl-unvalidated' is not published"):
        require_published(local_storage, "lbl-unvalidated")


def test_labels_rewritten_under_the_pointer_are_refused(local_storage):
    """Rebuilding the published run's data (without validating it again) must stop training."""
    make_labels_run(local_storage, n={"train": 4, "val": 2, "test": 2})
    make_labels_run(local_storage, publish=False, seed=1, n={"train": 4, "val": 2, "test": 2})  # same run id
    with pytest.raises(LabelsNotPublished, match="is not the file that was validated"):
        require_published(local_storage)


@pytest.mark.parametrize("result, message", [
    (None, "no validation result"),
    ({"success": False}, "its validation failed"),
])
def test_a_missing_or_failed_validation_is_refused(local_storage, result, message):
    make_labels_run(local_storage, n={"train": 4, "val": 2, "test": 2})
    key = keys.validation_result(LABELS_RUN)
    if result is None:
        local_storage.delete(key)
    else:
        put_json(local_storage, key, {**get_json(local_storage, key), **result})
    with pytest.raises(LabelsNotPublished, match=message):
        require_published(local_storage)


def test_examples_carry_splits_and_face_boxes(local_storage):
    labels = make_labels_run(local_storage, n={"train": 8, "val": 4, "test": 4})
    ex = load_examples(local_storage, LABELS_RUN, crop="face")
    assert {s: len(e) for s, e in ex.items()} == {"train": 8, "val": 4, "test": 4}
    assert ex["train"].detector_ids == {DETECTOR}
    assert np.isfinite(ex["train"].box).all() and (ex["train"].frame == 64).all()
    assert not set(ex["train"].author_key) & set(ex["test"].author_key)
    assert sorted(sum((e.post_id for e in ex.values()), [])) == sorted(labels["post_id"].to_pylist())
    full = load_examples(local_storage, LABELS_RUN, crop="full")
    assert np.isnan(full["train"].box).all() and full["train"].detector_ids == set()


@pytest.mark.parametrize("box, margin, expect", [
    ((10, 10, 30, 30), 0.0, (10, 10, 30, 30)),
    ((10, 10, 30, 30), 1.0, (0, 0, 40, 40)),
    ((0, 0, 10, 20), 0.5, (-10, -5, 20, 25)),  # square around the longer side, may leave the image
])
def test_face_crop_box_is_a_square_around_the_face(box, margin, expect):
    assert face_crop_box(np.array(box, dtype=np.float32), margin, (64, 64)) == expect


@pytest.mark.parametrize("crop, augment", [("face", False), ("full", True)])
def test_dataset_items(tmp_path, crop, augment):
    cfg = load_config(overrides=[f"storage.root={tmp_path / 'data'}"])
    from pipeline.core.storage import open_storage

    storage = open_storage(cfg.storage)
    make_labels_run(storage, n={"train": 4, "val": 2, "test": 2})
    ex = load_examples(storage, LABELS_RUN, crop=crop)["train"]
    ds = LabeledImages(ex, cfg.storage, image_size=32, crop=crop, augment=augment)
    import pickle

    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker gets: no live storage inside
    assert clone._storage is None
    item = clone[1]
    assert item["image"].shape == (3, 32, 32) and item["weight"] == 1.0
    assert item["label"] == ex.label[1] and abs(item["score"] - ex.score[1]) < 1e-6


def test_face_crop_sees_the_face(local_storage):
    make_labels_run(local_storage, n={"train": 4, "val": 2, "test": 2})
    ex = load_examples(local_storage, LABELS_RUN, crop="face")["train"]
    ds = LabeledImages(ex, local_storage, image_size=64, crop="face", face_margin=0.0)
    face = np.asarray(ds.load_image(1), dtype=float)  # the square alone: one flat level plus noise 10
    full = np.asarray(LabeledImages(ex, local_storage, image_size=64, crop="full").load_image(1), dtype=float)
    assert face.std() < 15 and full.std() > 25


def test_unreadable_image_is_a_zero_weight_item(local_storage):
    make_labels_run(local_storage, n={"train": 4, "val": 2, "test": 2})
    ex = load_examples(local_storage, LABELS_RUN, crop="face")["train"]
    local_storage.put_bytes(f"images/{ex.sha256[0][:2]}/{ex.sha256[0]}", b"not an image")
    item = LabeledImages(ex, local_storage, image_size=32)[0]
    assert item["weight"] == 0.0 and float(item["image"].abs().sum()) == 0.0

"""The model card: rendered from hand-made metrics, and written from a real labels run on local storage."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pyarrow as pa

from pipeline.core import keys
from pipeline.core.config import load_config
from pipeline.core.schemas import POSTS
from pipeline.core.tables import write_partition
from tests.training.test_train_data import DETECTOR, LABELS_RUN, make_labels_run
from training.model_card import (
    IMAGENET_LICENSE,
    NO_WEIGHTS,
    detector_licenses,
    render_model_card,
    write_model_card,
)

SHIPPED_SHA = "5e4447f50245bbd7966bd6c0fa52938c61474a04ec7def48753668a9d8b4ea3a"  # det_500m.onnx


def metrics(*, truth: bool, weights: str = "imagenet") -> dict:
    return {
        "run_id": "m-1", "status": "complete", "labels_run": "lbl-7", "finished_at": "2026-02-01T10:00:00Z",
        "labels_published": {"run_id": "lbl-7", "params_hash": "abc123", "labeler": "groups"},
        "detector_ids": [SHIPPED_SHA, "f" * 64], "code_version": "v1.2-3-gdeadbee",
        "model": {"backbone": "resnet50", "norm": "batch", "weights": weights, "weights_file": "/home/alice/w.pt"},
        "epochs": 3, "steps": 120, "global_batch": 32,
        "rows": {"train": 1400, "val": 300, "test": 300},
        "val": {"n": 300, "accuracy": 0.61234, "roc_auc": 0.65, "log_loss": 0.6789, "pearson_r": 0.2,
                "unreadable_images": 0},
        "test": {"n": 300, "accuracy": 0.6, "roc_auc": math.nan, "log_loss": None, "pearson_r": 0.1875,
                 "unreadable_images": 2},
        "truth": ({"val": {"n": 300, "roc_auc": 0.7777, "spearman_r": 0.4},
                   "test": {"n": 300, "roc_auc": 0.71, "spearman_r": math.nan}} if truth else None),
        "truth_file": "/home/alice/truth.parquet",
        # the first epoch from a run trained before the validation curve existed (resumed since)
        "history": [{"epoch": 1, "step": 40, "train_loss": 0.9},
                    {"epoch": 2, "step": 80, "train_loss": 0.75, "val_log_loss": 0.7, "val_roc_auc": 0.6,
                     "val_accuracy": 0.55}],
        "config": {"training": {"image_size": 224, "crop": "face", "weights": "imagenet"}},
    }


SUMMARY = {"run_id": "lbl-7", "labeler": "groups", "params_hash": "abc123", "group_size": 100,
           "sources": {"mastodon": {"rows_out": 1200, "groups": 12, "positive": 600},
                       "bluesky": {"rows_out": 800, "groups": 8, "positive": 400}}}
SOURCES = {"per_source": {"mastodon": {"rows": 1200, "first_post": "2025-11-02", "last_post": "2026-01-05"},
                          "bluesky": {"rows": 800, "first_post": "2025-12-01", "last_post": "2026-01-20"}},
           "dates_note": ""}


def licenses(weights: str) -> dict:
    return {"detector": detector_licenses(), "weights": IMAGENET_LICENSE if weights == "imagenet" else NO_WEIGHTS}


def test_card_with_truth_two_sources_and_nan_metrics():
    card = render_model_card(metrics(truth=True), SUMMARY, SOURCES, licenses("imagenet"))
    for section in ("# Model card: m-1", "## Trained on", "## Metrics", "## Intended use", "Out of scope",
                    "## Known biases", "## Licenses", "## Privacy"):
        assert section in card
    assert "| labels run | lbl-7 |" in card
    assert "train 1400, val 300, test 300" in card
    assert "2025-11-02 to 2026-01-20" in card
    assert "| mastodon | 1200 | 12 | 2025-11-02 | 2026-01-05 |" in card
    assert "| bluesky | 800 | 8 | 2025-12-01 | 2026-01-20 |" in card
    assert "hash `abc123`, group size 100" in card
    assert "(det_500m.onnx, shipped)" in card and "`ffffffffffff`" in card
    assert "resnet50" in card and "| epochs | 3 " in card and "224 px" in card and "v1.2-3-gdeadbee" in card
    assert "| accuracy | 0.612 | 0.600 |" in card
    assert "| roc_auc | 0.650 | n/a |" in card and "| log_loss | 0.679 | n/a |" in card
    assert "| pearson_r | 0.200 | 0.188 |" in card and "| unreadable_images | 0 | 2 |" in card
    assert "| 1 | 0.900 | n/a | n/a | n/a |" in card and "| 2 | 0.750 | 0.700 | 0.600 | 0.550 |" in card
    assert "hidden quality" in card and "| roc_auc | 0.778 | 0.710 |" in card and "| spearman_r | 0.400 | n/a |" in card
    assert "Engagement is not beauty" in card and "groups of 100" in card
    assert "non-commercial research use only" in card and "`pipeline/faces/models/README.md`" in card
    assert IMAGENET_LICENSE in card and "`ffffffffffff`: not the shipped model" in card
    assert "nan" not in card.lower().replace("n/a", "")
    # Aggregates only: no local paths, no row-level identifiers.
    for leak in ("alice", "author_key", "post_id", "truth.parquet"):
        assert leak not in card


def test_card_without_truth_summary_or_dates():
    sources = {"per_source": {"mastodon": {"rows": 200, "first_post": None, "last_post": None}},
               "dates_note": "this storage has no posts table", "group_size": 100, "params_hash": "abc123"}
    card = render_model_card(metrics(truth=False, weights="none"), None, sources, licenses("none"))
    assert "hidden quality" not in card
    assert "unknown: this storage has no posts table" in card
    assert "| mastodon | 200 | n/a | unknown | unknown |" in card
    assert "(the labels run has no `_summary.json`)" in card
    assert "ImageNet weights were requested but not available offline" in card
    assert f"Initial weights: {NO_WEIGHTS}." in card and IMAGENET_LICENSE not in card


def posts_for(labels: pa.Table) -> pa.Table:
    """Posts rows for the labeled posts, created on consecutive days from 2025-12-01; one post twice
    (re-scraped on another day), as the posts table can hold it."""
    ids = labels["post_id"].to_pylist()
    rows = []
    for i, pid in enumerate([*ids, ids[0]]):
        rows.append({
            "source": "mastodon", "instance": "https://sim.example", "hashtag": "portrait", "post_id": pid,
            "created_at": datetime(2025, 12, 1 + i % 30, 12, tzinfo=UTC), "author_key": f"a-{i}",
            "author_followers": 1000, "tags": ["portrait"], "n_tags": 1, "likes": 1, "reposts": 0, "replies": 0,
            "views": None, "image_urls": [f"https://sim.example/{pid}.png"], "sensitive": False, "language": None,
            "scraped_at": datetime(2026, 1, 15, tzinfo=UTC),
        })
    return pa.Table.from_pylist(rows, schema=POSTS)


def test_write_model_card_from_a_labels_run(local_storage):
    labels = make_labels_run(local_storage)
    write_partition(local_storage, "posts", "2026-01-15", posts_for(labels))  # and the run's record
    m = metrics(truth=False, weights="none") | {"run_id": "m-2", "labels_run": LABELS_RUN,
                                                 "detector_ids": [DETECTOR], "labels_published": {}}
    key = write_model_card(local_storage, "m-2", m, load_config())
    assert key == keys.model_card("m-2") == "models/m-2/MODEL_CARD.md"
    card = local_storage.get_text(key)
    assert f"| labels run | {LABELS_RUN} |" in card
    assert "2025-12-01 to 2025-12-30" in card
    assert f"| mastodon | {labels.num_rows} | 6 | 2025-12-01 | 2025-12-30 |" in card
    assert f"hash `{'p' * 16}`, group size 16" in card
    assert NO_WEIGHTS in card
    for value in (*labels["post_id"].to_pylist(), *labels["author_key"].to_pylist()):
        assert value not in card


def test_write_model_card_without_posts_or_summary(local_storage):
    labels = make_labels_run(local_storage, n={"train": 32, "val": 16, "test": 16})
    local_storage.delete(keys.labels_summary(LABELS_RUN))  # a run without its record
    m = metrics(truth=True) | {"labels_run": LABELS_RUN, "detector_ids": [DETECTOR], "labels_published": {}}
    card = local_storage.get_text(write_model_card(local_storage, "m-3", m, load_config()))
    assert "unknown: this storage has no posts table" in card
    assert f"| mastodon | {labels.num_rows} | n/a | unknown | unknown |" in card
    # Without the run's record the card says so: it never derives the parameters from the rows.
    assert "hash `n/a`, group size n/a" in card

"""Metrics against brute force and scipy (no scikit-learn in the environment)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training import metrics as M


def auc_brute(y, p):
    pos, neg = [s for s, t in zip(p, y, strict=True) if t], [s for s, t in zip(p, y, strict=True) if not t]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


@pytest.mark.parametrize("y, p", [
    ([0, 1], [0.1, 0.9]),
    ([1, 0], [0.1, 0.9]),
    ([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]),  # all ties: 0.5
    ([0, 1, 0, 1, 1], [0.2, 0.2, 0.7, 0.9, 0.7]),
])
def test_roc_auc_matches_pairwise_counting(y, p):
    assert M.roc_auc(y, p) == pytest.approx(auc_brute(y, p))


def test_roc_auc_random_and_undefined():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 300), np.round(rng.random(300), 1)  # many ties
    assert M.roc_auc(y, p) == pytest.approx(auc_brute(y, p))
    assert math.isnan(M.roc_auc([1, 1], [0.2, 0.3]))


def test_regression_metrics_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a = rng.random(50)
    b = a + rng.normal(0, 0.2, 50)
    assert M.pearson_r(a, b) == pytest.approx(stats.pearsonr(a, b)[0])
    assert M.spearman_r(a, b) == pytest.approx(stats.spearmanr(a, b)[0])
    assert M.mae(a, b) == pytest.approx(np.abs(a - b).mean())
    assert M.rmse(a, b) == pytest.approx(np.sqrt(((a - b) ** 2).mean()))
    assert math.isnan(M.pearson_r([1, 1, 1], [1, 2, 3]))


def test_label_metrics():
    y, p = np.array([0, 1, 1, 0]), np.array([0.2, 0.8, 0.4, 0.6])
    m = M.label_metrics(y, p)
    assert m["n"] == 4 and m["accuracy"] == 0.5 and m["roc_auc"] == 0.75
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.8, 0.4, 0.4])))
    assert M.log_loss([1], [1.0]) == pytest.approx(-math.log(1 - 1e-7))  # clipped, finite


def test_truth_metrics_half_split():
    q = np.array([0.1, 0.2, 0.3, 0.4])
    assert M.truth_metrics(q, np.array([0.0, 0.1, 0.9, 1.0]))["roc_auc"] == 1.0


def test_the_xcom_summary_is_strict_json_when_a_split_is_empty():
    """An empty test split has NaN metrics; Airflow's XCom API refuses NaN, so they travel as None."""
    import json
    import math

    from training.registry import summarize

    metrics = {"run_id": "r", "labels_run": "l", "steps": 3, "model": {"weights": "none"},
               "val": {"accuracy": 0.5, "roc_auc": 0.7}, "test": {"accuracy": math.nan, "roc_auc": math.nan}}
    out = summarize(metrics)
    assert out["val_roc_auc"] == 0.7 and out["test_accuracy"] is None and out["test_roc_auc"] is None
    json.dumps(out, allow_nan=False)

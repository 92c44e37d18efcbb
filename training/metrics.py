"""Evaluation metrics, in numpy (scikit-learn is not a dependency).

Label (binary): accuracy at 0.5, ROC-AUC (Mann-Whitney U with average ranks for ties, the
same value as ``sklearn.metrics.roc_auc_score``), log-loss (natural log, probabilities
clipped to [1e-7, 1 - 1e-7]). Score (regression, the SCUT-FBP5500 protocol): Pearson r,
MAE, RMSE. Every function returns plain floats (NaN where a metric is undefined, e.g. AUC
on a single class) so the results go straight into JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

EPS = 1e-7


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties getting their average rank (scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # Boundaries of runs of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def roc_auc(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of scores ``p`` for binary labels ``y``; NaN with one class."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = _ranks(p)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def accuracy(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray, threshold: float = 0.5) -> float:
    y = np.asarray(y).astype(bool)
    if len(y) == 0:
        return math.nan
    return float(np.mean((np.asarray(p) >= threshold) == y))


def log_loss(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray) -> float:
    y = np.asarray(y, dtype=np.float64)
    if len(y) == 0:
        return math.nan
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def pearson_r(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else math.nan


def spearman_r(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    return pearson_r(_ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64)))


def mae(y: Sequence[float] | np.ndarray, yhat: Sequence[float] | np.ndarray) -> float:
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean(np.abs(y - np.asarray(yhat, dtype=np.float64)))) if len(y) else math.nan


def rmse(y: Sequence[float] | np.ndarray, yhat: Sequence[float] | np.ndarray) -> float:
    y = np.asarray(y, dtype=np.float64)
    return float(math.sqrt(np.mean((y - np.asarray(yhat, dtype=np.float64)) ** 2))) if len(y) else math.nan


def label_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Accuracy, ROC-AUC and log-loss of predicted probabilities ``prob`` for labels ``y``."""
    return {"n": int(len(y)), "accuracy": accuracy(y, prob), "roc_auc": roc_auc(y, prob), "log_loss": log_loss(y, prob)}


def score_metrics(score: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Pearson r, MAE and RMSE of predicted scores against the labels' within-group scores."""
    return {"pearson_r": pearson_r(score, pred), "mae": mae(score, pred), "rmse": rmse(score, pred)}


def truth_metrics(quality: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """How well the model recovers the simulator's hidden quality.

    ``roc_auc`` treats quality above its median as the positive class (the same half split
    the labels make); ``spearman_r`` uses the full ordering.
    """
    quality = np.asarray(quality, dtype=np.float64)
    return {
        "n": int(len(quality)),
        "roc_auc": roc_auc(quality > np.median(quality), prob) if len(quality) else math.nan,
        "spearman_r": spearman_r(quality, prob),
    }

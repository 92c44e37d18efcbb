"""Label quality: how well each labeler's labels recover the true quality of a post.

For every labeler (the rule and the three comparisons) on the same eligible rows:

- ``auc``: ROC-AUC of true quality as a score for the binary label, i.e. the probability that a
  random positive has higher quality than a random negative (ties count half; the
  Mann-Whitney form). 0.5 = the label knows nothing about quality, 1 = it separates perfectly.
  Quality is used as the continuous target, so no threshold (e.g. its median) is chosen.
- ``spearman``: Spearman rank correlation of the label ``score`` with quality.

Only face posts are scored when the truth says which they are (``has_face``), since only
face posts are labeled by the project.

:func:`evaluate_rows` takes rows in memory (post_id, likes, followers, n_tags, age_days,
quality [, author_key, views, has_face]) — a synthetic world or a labels run joined with the
simulator's truth (:func:`evaluate_run`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from labeling.build_labels import LABELERS, label_candidates
from labeling.eligibility import CANDIDATES
from pipeline.core import keys
from pipeline.core.config import Config
from pipeline.core.storage import Storage, open_storage
from pipeline.core.truth import coverage_line, match_id

AUC_DEFINITION = ("P(quality of a random positive > quality of a random negative), ties half "
                  "(ROC-AUC of true quality as a score for the label)")


def auc(label: np.ndarray, quality: np.ndarray) -> float:
    """Mann-Whitney ROC-AUC of ``quality`` for the binary ``label``; NaN when a class is empty."""
    label = np.asarray(label).astype(bool)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = pd.Series(np.asarray(quality, dtype=np.float64)).rank(method="average").to_numpy()
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")
    return float(pd.Series(np.asarray(a, dtype=np.float64)).corr(pd.Series(np.asarray(b, dtype=np.float64)),
                                                                 method="spearman"))


def _candidates(rows: pd.DataFrame) -> pa.Table:
    n = len(rows)
    data = {
        "post_id": rows["post_id"].astype(str).to_numpy(),
        "source": (rows["source"] if "source" in rows else pd.Series([""] * n)).astype(str).to_numpy(),
        "author_key": (rows["author_key"] if "author_key" in rows else rows["post_id"]).astype(str).to_numpy(),
        "image_sha256": rows["image_sha256"].to_numpy() if "image_sha256" in rows else np.full(n, "", dtype=object),
        "likes": rows["likes"].to_numpy(), "followers": rows["followers"].to_numpy(),
        "n_tags": rows["n_tags"].to_numpy(), "age_days": rows["age_days"].to_numpy(dtype=np.float64),
        "views": pa.array(rows["views"], pa.int64(), from_pandas=True) if "views" in rows else pa.nulls(n, pa.int64()),
        "n_faces": pa.nulls(n, pa.int32()), "face_share": pa.nulls(n, pa.float64()),
    }
    return pa.table(data).cast(CANDIDATES)


def evaluate_rows(rows: pd.DataFrame, cfg: Config, labelers: tuple[str, ...] = LABELERS) -> dict[str, Any]:
    """Run each labeler on ``rows`` (the config's filters apply) and score it against ``quality``."""
    rows = rows[rows["quality"].notna()]
    if "has_face" in rows:
        rows = rows[rows["has_face"].astype(bool)]
    cands = _candidates(rows)
    quality = pd.Series(rows["quality"].to_numpy(dtype=np.float64), index=rows["post_id"].astype(str).to_numpy())
    report: dict[str, Any] = {"rows": len(rows), "auc_definition": AUC_DEFINITION, "labelers": {}}
    for name in labelers:
        labels, summary = label_candidates(cands, cfg, "eval", labeler=name, check_faces=False)
        q = quality.reindex(labels.column("post_id").to_numpy(zero_copy_only=False)).to_numpy()
        report["labelers"][name] = {
            "rows": labels.num_rows, "groups": summary["groups"],
            "auc": auc(labels.column("label").to_numpy(), q),
            "spearman": spearman(labels.column("score").to_numpy(), q),
        }
    return report


def evaluate_run(cfg: Config, run_id: str, truth: pd.DataFrame, storage: Storage | None = None) -> dict[str, Any]:
    """Join labels run ``run_id`` with ``truth`` (:func:`pipeline.core.truth.load_truth`), rerun
    every labeler on its rows, score them.

    Also scores the run's own stored labels (``stored``); saves the report as
    ``labels/run=<run_id>/_eval.json`` and returns it.
    """
    from labeling.validate import read_labels_frame
    from pipeline.core.tables import put_json

    storage = storage or open_storage(cfg.storage)
    labels = read_labels_frame(storage, run_id)
    rows = labels.assign(match_id=labels["post_id"].astype(str).map(match_id)).merge(truth, on="match_id", how="inner")
    report = evaluate_rows(rows.drop(columns=["label", "score"]), cfg)
    face = rows[rows["has_face"].astype(bool)] if "has_face" in rows else rows
    face = face[face["quality"].notna()]
    report.update({
        "run_id": run_id, "labels_rows": len(labels), "matched_truth": len(rows),
        "stored": {"labeler": labels["labeler"].iloc[0] if len(labels) else None,
                   "auc": auc(face["label"].to_numpy(), face["quality"].to_numpy()),
                   "spearman": spearman(face["score"].to_numpy(), face["quality"].to_numpy())},
        "key": keys.labels_eval(run_id),
    })
    put_json(storage, report["key"], report)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'labeler':<14}{'rows':>8}{'AUC':>8}{'Spearman':>10}"]
    for name, r in report["labelers"].items():
        lines.append(f"{name:<14}{r['rows']:>8}{r['auc']:>8.3f}{r['spearman']:>10.3f}")
    if "stored" in report:
        s = report["stored"]
        lines.append(f"stored labels ({s['labeler']}): AUC {s['auc']:.3f}, Spearman {s['spearman']:.3f} "
                     f"({coverage_line(report['matched_truth'], report['labels_rows'])})")
    lines.append(f"AUC = {report['auc_definition']}")
    return "\n".join(lines)

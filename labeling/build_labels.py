"""The label stage: candidates -> filters -> labeler -> ``labels/run=<run_id>/``.

Entry points (what the DAG, ``make run`` and the CLI call):

- :func:`build_labels` ``(cfg, run_id, storage=None) -> summary``: the project's tables in,
  the labels partition, its resolved config (``_config.toml``) and run summary
  (``_summary.json``) out;
- :func:`label_file` ``(input, output, cfg, run_id) -> summary``: a bring-your-own file;
- :func:`label_candidates` ``(cands, cfg, run_id) -> (labels, summary)``: the pure in-memory core.

The labels file keeps the candidates' row order (post_id order for the project's tables);
``group_id`` / ``rank_in_group`` say where each row stands.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labeling import baselines
from labeling.eligibility import apply_filters, filter_rows, read_candidates, read_input_file
from labeling.rank_groups import Ranking, exposure, post_id_key, rank_groups
from labeling.splits import SPLITS, assign_splits
from pipeline.core import keys
from pipeline.core.config import Config
from pipeline.core.storage import Storage, open_storage

log = logging.getLogger(__name__)

LABELERS = ("groups", "median_likes", "ratio", "residual")


class NothingToLabel(Exception):
    """Not enough new eligible posts for a labels run yet: the run has nothing to do (a DAG run
    ends *skipped*, not failed). The message says why, with the drop counts by reason."""

    def __init__(self, reason: str, summary: dict[str, Any]):
        drops = ", ".join(f"{k} {v}" for k, v in sorted(summary["dropped"].items(), key=lambda kv: -kv[1]) if v)
        super().__init__(f"labels run {summary['run_id']}: nothing to label yet: {reason}. "
                         f"{summary['rows_in']} candidate posts; dropped: {drops or 'none'}")
        self.reason, self.summary = reason, summary


def check_enough(summary: dict[str, Any], labeled_ids: pa.ChunkedArray | pa.Array, published: dict[str, Any] | None,
                 published_ids: pa.ChunkedArray | pa.Array | None, min_rows: int) -> None:
    """Raise :class:`NothingToLabel` unless this run is worth validating and publishing.

    It is when it labels at least one whole group and ``validation.min_rows`` rows, and, if a
    run is published, at least a group's worth of posts that run did not have (so a refresh
    that matured a handful of posts does not relabel and retrain on nearly the same data).
    """
    group_size = summary["group_size"]
    if summary["rows_out"] < max(group_size, min_rows, 1):
        raise NothingToLabel(f"{summary['rows_out']} posts would be labeled, a run needs at least "
                             f"{max(group_size, min_rows, 1)} (one group of {group_size}, "
                             f"validation.min_rows {min_rows})", summary)
    if published and published_ids is not None:
        # Vectorized membership: Python sets of millions of id strings cost seconds and GBs.
        new = len(labeled_ids) - pc.sum(pc.is_in(labeled_ids, value_set=published_ids)).as_py()
        if new < group_size:
            raise NothingToLabel(f"{new} of the posts it would label are new since the published labels run "
                                 f"{published['run_id']}, fewer than one group of {group_size}", summary)


def new_run_id(now: datetime | None = None) -> str:
    """A run id from the UTC time, e.g. ``20261123T101500Z``."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def clean_run_id(text: str) -> str:
    """A run id safe as a hive partition value and an S3 key (e.g. from an Airflow run id)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    if not cleaned:
        raise ValueError(f"run id {text!r} has no usable characters")
    return cleaned


def rank(labeler: str, *, likes: np.ndarray, followers: np.ndarray, n_tags: np.ndarray,
         exposure_: np.ndarray, key: np.ndarray, group_size: int) -> Ranking:
    """Run one labeler (the rule or a comparison) on eligible rows."""
    if labeler == "groups":
        return rank_groups(exposure_, likes, key, group_size)
    if labeler == "median_likes":
        return baselines.median_likes(likes, exposure_, key)
    if labeler == "ratio":
        return baselines.ratio(likes, exposure_, key)
    if labeler == "residual":
        return baselines.residual(likes, followers, n_tags, exposure_, key)
    raise ValueError(f"unknown labeler {labeler!r} (known: {', '.join(LABELERS)})")


def label_candidates(cands: pa.Table, cfg: Config, run_id: str, *, labeler: str | None = None,
                     check_faces: bool = True, check_face_share: bool = True,
                     counts: dict[str, int] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Label candidates (:data:`labeling.eligibility.CANDIDATES`): the LABELS table and a summary.

    ``counts`` carries drops made while reading (``duplicate_post_id``); they count in ``rows_in``.
    """
    started = time.perf_counter()
    lab = cfg.labeling
    labeler = labeler or lab.labeler
    eligible, dropped = apply_filters(cands, lab, cfg.faces, check_faces=check_faces,
                                      check_face_share=check_face_share)
    for reason, n in (counts or {}).items():
        dropped[reason] += n

    def ints(name: str) -> np.ndarray:  # nulls occur only in ineligible rows
        return np.asarray(cands.column(name).fill_null(0), dtype=np.int64)[eligible]

    likes, followers, n_tags = ints("likes"), ints("followers"), ints("n_tags")
    views = np.asarray(cands.column("views").cast(pa.float64()).fill_null(np.nan), dtype=np.float64)[eligible]
    exp = exposure(followers, n_tags, lab.tag_bonus, views)
    key = post_id_key(cands.column("post_id"))[eligible]  # order-preserving on all rows: no string copy
    ranking = rank(labeler, likes=likes, followers=followers, n_tags=n_tags, exposure_=exp, key=key,
                   group_size=lab.group_size)
    mask = ranking.kept
    kept = ranking.select(mask)
    dropped["partial_group"] = int((~mask).sum())

    labeled = np.flatnonzero(eligible)[mask]  # candidate rows that get a label
    keep = np.zeros(cands.num_rows, dtype=bool)
    keep[labeled] = True
    rows = filter_rows(cands.select(["post_id", "image_sha256", "author_key", "n_tags", "age_days"]), keep)
    n = rows.num_rows
    labels = pa.table({
        "post_id": rows.column("post_id"),
        "image_sha256": rows.column("image_sha256"),
        "author_key": rows.column("author_key"),
        "likes": likes[mask],
        "followers": followers[mask],
        "n_tags": rows.column("n_tags"),
        "age_days": rows.column("age_days"),
        "exposure": exp[mask],
        "group_id": kept.group_id,
        "rank_in_group": kept.rank_in_group,
        "label": kept.label(),
        "score": kept.score(),
        "split": assign_splits(rows.column("author_key"), lab),
        "labeler": pa.repeat(labeler, n),
        "params_hash": pa.repeat(cfg.section_hash("labeling"), n),
        "run_id": pa.repeat(run_id, n),
    })
    positive = int(labels.column("label").to_numpy().sum()) if n else 0
    split_counts = {s: 0 for s in SPLITS}
    if n:
        for row in pc.value_counts(labels.column("split")).to_pylist():
            split_counts[row["values"]] = row["counts"]
    summary = {
        "run_id": run_id,
        "labeler": labeler,
        "params_hash": cfg.section_hash("labeling"),
        "group_size": ranking.group_size,
        "rows_in": cands.num_rows + sum((counts or {}).values()),
        "rows_dropped": sum(dropped.values()),
        "dropped": dropped,
        "rows_out": n,
        "groups": n // ranking.group_size,
        "partial_group_rows": dropped["partial_group"],
        "label_balance": {"positive": positive, "negative": n - positive,
                          "positive_share": round(positive / n, 6) if n else None},
        "splits": split_counts,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return labels, summary


def build_labels(cfg: Config, run_id: str, storage: Storage | None = None) -> dict[str, Any]:
    """Label the project's tables into ``labels/run=<run_id>/``; return the run summary.

    Raises :class:`NothingToLabel` (writing nothing) when too few new eligible posts exist
    (:func:`check_enough`). Rerunning a run id replaces its partition, config and summary
    (idempotent).
    """
    from pipeline.core.tables import get_json, put_json, read_table, write_partition

    storage = storage or open_storage(cfg.storage)
    cands, counts = read_candidates(storage, cfg)
    labels, summary = label_candidates(cands, cfg, run_id, counts=counts)
    published = get_json(storage, keys.PUBLISHED_LABELS)
    if published and published.get("run_id") == run_id:
        published = None  # a rerun of the published run compares against nothing
    published_ids = None
    if published:
        published_ids = read_table(storage, "labels", partitions=[published["run_id"]],
                                   columns=["post_id"]).column("post_id").combine_chunks()
    check_enough(summary, labels.column("post_id"), published, published_ids,
                 cfg.validation.min_rows)
    # A rebuilt run must be validated again before it can be published, and must not stay
    # published meanwhile: training would otherwise read data nobody validated.
    if (get_json(storage, keys.PUBLISHED_LABELS) or {}).get("run_id") == run_id:
        storage.delete(keys.PUBLISHED_LABELS)
        log.warning("labels run %s was the published run: unpublished until the rebuilt run passes validation", run_id)
    storage.delete(keys.validation_result(run_id))
    summary["labels_key"] = write_partition(storage, "labels", run_id, labels)
    summary["config_key"] = keys.labels_config(run_id)
    summary["summary_key"] = keys.labels_summary(run_id)
    summary["labels_uri"] = storage.uri(summary["labels_key"])
    storage.put_text(summary["config_key"], cfg.to_toml())
    put_json(storage, summary["summary_key"], summary)
    log.info("labels run %s: %d rows in, %d labeled in %d groups -> %s", run_id, summary["rows_in"],
             summary["rows_out"], summary["groups"], summary["labels_uri"])
    return summary


def label_file(input_path: str | Path, output_path: str | Path, cfg: Config, run_id: str) -> dict[str, Any]:
    """Label a bring-your-own Parquet/CSV file into ``output_path`` (.parquet or .csv)."""
    from pipeline.core.schemas import conform

    output_path = Path(output_path)
    if output_path.suffix.lower() not in (".parquet", ".pq", ".csv"):
        raise ValueError(f"output {output_path}: unknown format {output_path.suffix!r} (use .parquet or .csv)")
    cands, absent = read_input_file(input_path)
    labels, summary = label_candidates(cands, cfg, run_id, check_faces="n_faces" not in absent,
                                       check_face_share=False)
    labels = conform("labels", labels)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".tmp-{output_path.name}")
    if output_path.suffix.lower() == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(labels, tmp)
    else:
        import pyarrow.parquet as pq

        pq.write_table(labels, tmp, compression="zstd")
    tmp.replace(output_path)  # atomic: a reader sees the old file or the new one
    summary["input"] = str(input_path)
    summary["output"] = str(output_path)
    summary["absent_optional_columns"] = absent
    return summary

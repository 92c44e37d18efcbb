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
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labeling import baselines
from labeling.eligibility import (
    apply_filters,
    filter_rows,
    input_versions,
    numpy_column,
    read_candidates,
    read_input_file,
)
from labeling.rank_groups import (
    WIDE_GROUP_WARNING,
    Ranking,
    code_counts,
    drop_groups,
    exposure,
    group_spans,
    post_id_key_unless_ordered,
    rank_groups,
    source_codes,
)
from labeling.splits import SPLITS, split_index
from pipeline.core import keys
from pipeline.core.config import Config
from pipeline.core.schemas import LABELS
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


def check_enough(summary: dict[str, Any], published: dict[str, Any] | None, new_posts: int | None,
                 min_rows: int) -> None:
    """Raise :class:`NothingToLabel` unless this run is worth validating and publishing.

    It is when it labels at least one whole group and ``validation.min_rows`` rows, and, if a
    run is published, at least a group's worth of posts (``new_posts``) that run did not have
    (so a refresh that matured a handful of posts does not relabel and retrain on nearly the
    same data).
    """
    group_size = summary["group_size"]
    if summary["rows_out"] < max(group_size, min_rows, 1):
        raise NothingToLabel(f"{summary['rows_out']} posts would be labeled, a run needs at least "
                             f"{max(group_size, min_rows, 1)} (one group of {group_size}, "
                             f"validation.min_rows {min_rows})", summary)
    if published and new_posts is not None and new_posts < group_size:
        raise NothingToLabel(f"{new_posts} of the posts it would label are new since the published labels run "
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


def rank(labeler: str, *, likes: np.ndarray, followers: np.ndarray, n_tags: np.ndarray | None,
         exposures: np.ndarray, key: np.ndarray, source: np.ndarray, group_size: int) -> Ranking:
    """Run one labeler (the rule or a comparison) on eligible rows (``n_tags``: the residual's only)."""
    if labeler == "groups":
        return rank_groups(exposures, likes, key, group_size, source)
    if labeler == "median_likes":
        return baselines.median_likes(likes, exposures, key)
    if labeler == "ratio":
        return baselines.ratio(likes, exposures, key)
    if labeler == "residual":
        if n_tags is None:
            raise ValueError("the residual labeler needs n_tags")
        return baselines.residual(likes, followers, n_tags, exposures, key)
    raise ValueError(f"unknown labeler {labeler!r} (known: {', '.join(LABELERS)})")


#: Candidate rows turned into LABELS rows at a time: the labels are written a slice at a time,
#: so a 10M-row run never holds the whole output table (~2 GB) beside its input.
SLICE_ROWS = 1 << 20
SPLIT_NAMES = pa.array(SPLITS)
#: Candidate columns copied into the labels unchanged.
_PASSED = ["post_id", "image_sha256", "author_key", "n_tags", "age_days"]


@dataclass
class LabelsRun:
    """A labeled candidates table, not yet materialized: which rows get a label and their ranking.

    :meth:`slices` builds the LABELS rows (candidates order) a slice of candidates at a time,
    :meth:`table` all at once. ``rows`` and the arrays below are aligned: one entry per eligible
    post, of which those with ``ranking.kept`` get a label (the others fell in a partial group;
    dropping them slice by slice spares a copy of every array).
    """

    cands: pa.Table
    rows: np.ndarray  # int64 candidate row indices of the eligible posts, ascending
    likes: np.ndarray
    followers: np.ndarray
    exposure: np.ndarray
    source: np.ndarray  # index into source_names (uint8 for up to 256 sources)
    source_names: list[str]
    ranking: Ranking
    split: np.ndarray  # int8 index into SPLITS
    labeler: str
    params_hash: str
    run_id: str
    summary: dict[str, Any]

    def slices(self, rows_per_slice: int = SLICE_ROWS) -> Iterator[pa.Table]:
        """The LABELS rows in pieces of at most ``rows_per_slice`` candidates (at least one piece).

        Pieces are built by two threads, at most two ahead of the one being consumed: copying
        the id strings is most of the work, Arrow releases the GIL for it, and the consumer
        (the Parquet writer) works meanwhile. Memory stays at a few pieces.
        """
        n = self.cands.num_rows
        bounds = list(range(0, max(n, 1), rows_per_slice)) + [n]
        starts = np.searchsorted(self.rows, bounds)
        ranges = [(lo, hi) for lo, hi, a, b in zip(bounds[:-1], bounds[1:], starts[:-1], starts[1:], strict=True)
                  if np.count_nonzero(self.ranking.kept[a:b])] or [(0, 0)]  # pieces with labels, or one empty
        # One column per run-wide value, sliced for every piece: no string built per row.
        constants = {name: pa.repeat(value, min(rows_per_slice, max(len(self.rows), 1)))
                     for name, value in (("labeler", self.labeler), ("params_hash", self.params_hash),
                                         ("run_id", self.run_id))}
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="label-slices") as pool:
            pending: deque = deque()
            for lo, hi in ranges:
                pending.append(pool.submit(self._piece, lo, hi, constants))
                if len(pending) > 2:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _piece(self, lo: int, hi: int, constants: dict[str, pa.Array]) -> pa.Table:
        """The LABELS rows of candidates ``lo:hi``."""
        a, b = np.searchsorted(self.rows, [lo, hi])
        here = self.ranking.kept[a:b]  # the eligible rows of this slice that get a label
        labeled = self.rows[a:b][here]
        mask = np.zeros(hi - lo, dtype=bool)
        mask[labeled - lo] = True
        part = filter_rows(self.cands.select(_PASSED).slice(lo, hi - lo), mask)
        k = len(labeled)
        ranking = self.ranking.select(slice(a, b)).select(here)
        return pa.table({
            "post_id": part.column("post_id"),
            # take() from the names: several times faster than casting the dictionary column.
            "source": pa.array(self.source_names, pa.string()).take(pa.array(self.source[a:b][here])),
            "image_sha256": part.column("image_sha256"),
            "author_key": part.column("author_key"),
            "likes": self.likes[a:b][here],
            "followers": self.followers[a:b][here],
            "n_tags": part.column("n_tags"),
            "age_days": part.column("age_days"),
            "exposure": self.exposure[a:b][here],
            "group_id": ranking.group_id,
            "rank_in_group": ranking.rank_in_group,
            "label": ranking.label(),
            "score": ranking.score(),
            "split": SPLIT_NAMES.take(pa.array(self.split[a:b][here])),
            **{name: column.slice(0, k) for name, column in constants.items()},
        }, schema=LABELS)

    def table(self) -> pa.Table:
        return pa.concat_tables(self.slices())

    def count_new(self, published_ids: pa.ChunkedArray | pa.Array) -> int:
        """How many labeled posts are not among ``published_ids`` (vectorized membership:
        Python sets of millions of id strings cost seconds and GBs)."""
        published = np.asarray(pc.is_in(self.cands.column("post_id"), value_set=published_ids), dtype=bool)
        return int(np.count_nonzero(self.ranking.kept & ~published[self.rows]))


@dataclass
class EligibleNumbers:
    """The numeric columns the labelers read, for the eligible rows only (nulls occur only in
    ineligible rows)."""

    likes: np.ndarray  # int64
    followers: np.ndarray  # int64
    exposure: np.ndarray  # float64, :func:`labeling.rank_groups.exposure`
    n_tags: np.ndarray | None  # int64, when asked for (the residual labeler's)


def eligible_numbers(cands: pa.Table, eligible: np.ndarray, tag_bonus: float, *,
                     with_n_tags: bool = False) -> EligibleNumbers:
    """:class:`EligibleNumbers` in one pass, batch by batch: each column is read once in place
    and no temporary is ever as long as the table."""
    n = int(np.count_nonzero(eligible))
    likes, followers = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    exp = np.empty(n, dtype=np.float64)
    n_tags = np.empty(n, dtype=np.int64) if with_n_tags else None
    start = at = 0
    for batch in cands.select(["likes", "followers", "n_tags", "views"]).to_batches():
        keep = eligible[start:start + batch.num_rows]
        start += batch.num_rows
        column = {name: numpy_column(batch.column(name), np.int64, 0, keep) for name in ("likes", "followers", "n_tags")}
        views = batch.column("views")
        views = numpy_column(views, np.float64, np.nan, keep) if views.null_count < len(views) else None
        end = at + len(column["likes"])
        likes[at:end], followers[at:end] = column["likes"], column["followers"]
        exp[at:end] = exposure(column["followers"], column["n_tags"], tag_bonus, views)
        if n_tags is not None:
            n_tags[at:end] = column["n_tags"]
        at = end
    return EligibleNumbers(likes, followers, exp, n_tags)


def label_run(cands: pa.Table, cfg: Config, run_id: str, *, labeler: str | None = None,
              check_faces: bool = True, check_face_share: bool = True,
              counts: dict[str, int] | None = None) -> LabelsRun:
    """Label candidates (:data:`labeling.eligibility.CANDIDATES`): the run, its summary included.

    ``counts`` carries drops made while reading (``duplicate_post_id``); they count in ``rows_in``.
    """
    started = time.perf_counter()
    lab = cfg.labeling
    labeler = labeler or lab.labeler
    # Columns read for every candidate, whatever the filters decide, are computed on a second
    # core while the filters run on this one (numpy and Arrow release the GIL).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="label-columns") as pool:
        keys_ = pool.submit(post_id_key_unless_ordered, cands.column("post_id"))
        sources_ = pool.submit(source_codes, cands.column("source"))
        # Hashed in place in Arrow's buffers, all rows: cheaper than copying the kept strings.
        splits_ = pool.submit(split_index, cands.column("author_key"), lab)
        eligible, dropped = apply_filters(cands, lab, cfg.faces, check_faces=check_faces,
                                          check_face_share=check_face_share)
        for reason, n in (counts or {}).items():
            dropped[reason] += n

        numbers = eligible_numbers(cands, eligible, lab.tag_bonus, with_n_tags=labeler == "residual")
        rows = np.flatnonzero(eligible)
        del eligible
        # Candidates in post_id order (the project's are): their row indices are a post_id key.
        key = keys_.result()
        key = rows if key is None else key[rows]
        source, names = sources_.result()
        source = source[rows]
    ranking = rank(labeler, likes=numbers.likes, followers=numbers.followers, n_tags=numbers.n_tags,
                   exposures=numbers.exposure, key=key, source=source, group_size=lab.group_size)
    del key
    partial_rows = int(np.count_nonzero(~ranking.kept))  # a few rows per source
    spans = group_exposure(ranking, numbers.exposure, source, names, lab) if labeler == "groups" else None
    if spans and lab.drop_wide_groups and spans["flagged"]:
        ranking = drop_groups(ranking, np.array(spans["flagged"]))
    run = LabelsRun(cands=cands, rows=rows, likes=numbers.likes, followers=numbers.followers,
                    exposure=numbers.exposure, source=source, source_names=names, ranking=ranking,
                    split=splits_.result()[rows], labeler=labeler, params_hash=cfg.section_hash("labeling"),
                    run_id=run_id, summary={})
    partial = np.flatnonzero(~ranking.kept)  # the trailing partial groups, and any wide group dropped
    dropped["partial_group"] = partial_rows
    if len(partial) > partial_rows:
        dropped["wide_group"] = len(partial) - partial_rows
    n = len(rows) - len(partial)
    labels = ranking.label()  # 0 where not kept (rank 0)
    positive = int(np.count_nonzero(labels))
    split_counts = code_counts(run.split, len(SPLITS)) - np.bincount(run.split[partial], minlength=len(SPLITS))
    split_counts = dict(zip(SPLITS, split_counts.tolist(), strict=True))
    rows_per_source = code_counts(source, len(names)) - np.bincount(source[partial], minlength=len(names))
    positive_per_source = code_counts(source, len(names), where=labels == 1)
    per_source = {names[code]: {"rows_out": int(rows_per_source[code]),
                                "groups": int(rows_per_source[code]) // run.ranking.group_size,
                                "positive": int(positive_per_source[code])}
                  for code in np.flatnonzero(rows_per_source)}
    run.summary = {
        "run_id": run_id,
        "labeler": labeler,
        "params": cfg.to_dict()["labeling"],
        "params_hash": run.params_hash,
        "group_size": run.ranking.group_size,
        "rows_in": cands.num_rows + sum((counts or {}).values()),
        "rows_dropped": sum(dropped.values()),
        "dropped": dropped,
        "rows_out": n,
        "groups": n // run.ranking.group_size,
        "partial_group_rows": dropped["partial_group"],
        "label_balance": {"positive": positive, "negative": n - positive,
                          "positive_share": round(positive / n, 6) if n else None},
        "splits": split_counts,
        "sources": per_source,
        **({"group_exposure": spans} if spans else {}),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return run


def group_exposure(ranking: Ranking, exposures: np.ndarray, source: np.ndarray, names: list[str],
                   lab: Any) -> dict[str, Any]:
    """Each source's groups' exposure spans (max / min) for the run's summary: the top group's
    span, the median, the widest; ``flagged``, the groups over ``labeling.max_group_exposure_ratio``
    (none when it is 0); ``warning``, a sentence when any group spans more than
    :data:`~labeling.rank_groups.WIDE_GROUP_WARNING` times (its label mostly tracks audience)."""
    spans = group_spans(ranking.group_id, exposures, source)
    ratio = spans.ratio
    per_source: dict[str, Any] = {}
    for code in np.unique(spans.source):
        ids = np.flatnonzero(spans.source == code)  # in exposure order: the first is the top group
        r = ratio[ids]
        per_source[names[int(code)]] = {
            "groups": [int(ids[0]), int(ids[-1])], "top_group_span": round(float(r[0]), 3),
            "median_span": round(float(np.median(r)), 3), "widest_span": round(float(r.max()), 3),
            "widest_group": int(ids[int(np.argmax(r))])}
    limit = lab.max_group_exposure_ratio
    flagged = np.flatnonzero(ratio > limit).tolist() if limit else []
    wide = {name: s for name, s in per_source.items() if s["widest_span"] > WIDE_GROUP_WARNING}
    warning = None
    if wide:
        warning = "; ".join(f"{name}: group {s['widest_group']} spans {s['widest_span']:.0f}x in exposure"
                            for name, s in wide.items()) + (
            " - in such a group positives have far bigger audiences than negatives, so the label mostly "
            "tracks follower count (more posts, or labeling.max_group_exposure_ratio, narrow the groups)")
    return {"per_source": per_source, "max_ratio": limit or None, "flagged": flagged,
            "dropped": bool(flagged) and lab.drop_wide_groups, "warning": warning}


def label_candidates(cands: pa.Table, cfg: Config, run_id: str, **options: Any) -> tuple[pa.Table, dict[str, Any]]:
    """:func:`label_run` materialized: the LABELS table and the summary (for small inputs and tests)."""
    run = label_run(cands, cfg, run_id, **options)
    return run.table(), run.summary


def build_labels(cfg: Config, run_id: str, storage: Storage | None = None, *, as_of: str | None = None) -> dict[str, Any]:
    """Label the project's tables into ``labels/run=<run_id>/``; return the run summary.

    The record keeps the version of every table read (``table_versions``). ``as_of``: rebuild
    that earlier run instead: its table versions, its labeler and its ``[labeling]``
    parameters (not today's), so the labels come out identical as long as those versions have
    not been vacuumed (``storage.retention_hours``); people forgotten since stay out.

    Raises :class:`NothingToLabel` (writing nothing) when too few new eligible posts exist
    (:func:`check_enough`). Rerunning a run id replaces its partition, config and summary
    (idempotent).
    """
    from pipeline.core import published
    from pipeline.core.labels_run import write_labels_run
    from pipeline.core.tables import partition_sha256, read_table, write_partition

    storage = storage or open_storage(cfg.storage)
    labeler = None
    if as_of:
        cfg, versions, labeler = as_of_inputs(cfg, storage, as_of)
    else:
        versions = input_versions(storage)
    cands, counts = read_candidates(storage, cfg, versions)
    run = label_run(cands, cfg, run_id, counts=counts, labeler=labeler)
    summary = run.summary
    summary["table_versions"] = versions
    if as_of:
        summary["as_of"] = as_of
    pointer = published.published(storage)
    if pointer and (pointer.get("run_id") == run_id or as_of):
        pointer = None  # a rerun of the published run, or a rebuild, compares against nothing
    new_posts = None
    if pointer:
        new_posts = run.count_new(read_table(storage, "labels", partitions=[pointer["run_id"]],
                                             columns=["post_id"]).column("post_id"))
    check_enough(summary, pointer, new_posts, cfg.validation.min_rows)
    if (summary.get("group_exposure") or {}).get("warning"):
        log.warning("labels run %s: %s", run_id, summary["group_exposure"]["warning"])
    # A rebuilt run must be validated again before it can be published, and must not stay
    # published meanwhile: training would otherwise read data nobody validated.
    if published.unpublish(storage, run_id):
        log.warning("labels run %s was the published run: unpublished until the rebuilt run passes validation", run_id)
    storage.delete(keys.validation_result(run_id))
    summary["labels_uri"] = write_partition(storage, "labels", run_id, run.slices)
    summary["labels_sha256"] = partition_sha256(storage, "labels", run_id)  # what validation must find
    summary["config_key"] = keys.labels_config(run_id)
    summary["summary_key"] = keys.labels_summary(run_id)
    storage.put_text(summary["config_key"], cfg.to_toml())
    write_labels_run(storage, summary)
    log.info("labels run %s: %d rows in, %d labeled in %d groups -> %s", run_id, summary["rows_in"],
             summary["rows_out"], summary["groups"], summary["labels_uri"])
    return summary


def as_of_inputs(cfg: Config, storage: Storage, run_id: str) -> tuple[Config, dict[str, int | None], str]:
    """What rebuilding labels run ``run_id`` needs: the config with its ``[labeling]``
    parameters, the table versions it read, and its labeler. Raises ValueError naming what is
    missing (a run labeled before versions were recorded, or parameters that no longer load)."""
    import dataclasses

    from pipeline.core.config import LabelingConfig
    from pipeline.core.labels_run import read_labels_run

    record = read_labels_run(storage, run_id)
    versions = record.record.get("table_versions")
    if not versions:
        raise ValueError(f"labels run {run_id}: its record has no table versions (labeled by an older release); "
                         "it cannot be rebuilt as of its inputs")
    try:
        labeling = LabelingConfig(**record.params)
        labeling.validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"labels run {run_id}: its [labeling] parameters do not load today: {exc}") from None
    return dataclasses.replace(cfg, labeling=labeling), versions, record.labeler


def label_file(input_path: str | Path, output_path: str | Path, cfg: Config, run_id: str) -> dict[str, Any]:
    """Label a bring-your-own Parquet/CSV file into ``output_path`` (.parquet or .csv)."""
    output_path = Path(output_path)
    if output_path.suffix.lower() not in (".parquet", ".pq", ".csv"):
        raise ValueError(f"output {output_path}: unknown format {output_path.suffix!r} (use .parquet or .csv)")
    cands, absent = read_input_file(input_path)
    run = label_run(cands, cfg, run_id, check_faces="n_faces" not in absent, check_face_share=False)
    summary = run.summary
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".tmp-{output_path.name}")
    if output_path.suffix.lower() == ".csv":
        import pyarrow.csv as pcsv

        writer = pcsv.CSVWriter(tmp, LABELS)
    else:
        import pyarrow.parquet as pq

        writer = pq.ParquetWriter(tmp, LABELS, compression="zstd")
    with writer:
        for piece in run.slices():
            writer.write_table(piece)
    tmp.replace(output_path)  # atomic: a reader sees the old file or the new one
    summary["input"] = str(input_path)
    summary["output"] = str(output_path)
    summary["absent_optional_columns"] = absent
    return summary

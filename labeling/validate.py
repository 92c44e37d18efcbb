"""The publish gate: Great Expectations suites for ``posts``, ``faces`` and ``labels``.

Suites are built from the shared schemas (:mod:`pipeline.core.schemas`: columns, non-null fields)
plus the labeling rule's invariants. Group- and author-level invariants (exactly G rows and
G/2 positives per group, ranks 1..G, likes ascending with rank, exposure descending with
group id, one split per author) are computed as check columns (``chk_*``) beside each label
row, so GX's unexpected rows point at the offending posts.

:func:`validate_run` runs one GX checkpoint per table in an ephemeral context (data asset named
after the table, GX run named after the labels run), writes the result JSON to
``validation/run=<run_id>/`` (storage may be S3) and, when ``validation.data_docs``, the Data
Docs: likerank's own offline pages rendered from that result by :mod:`pipeline.core.data_docs`
(GX's site needs CDNs and JavaScript to show anything; see that module). It returns a small
report and raises :class:`ValidationFailed` with a readable summary when any expectation fails.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from labeling.splits import SPLITS
from pipeline.core import keys
from pipeline.core.config import Config
from pipeline.core.data_docs import write_data_docs
from pipeline.core.labels_run import LabelsRunRecord, read_labels_run
from pipeline.core.schemas import TABLES
from pipeline.core.storage import Storage, open_storage

log = logging.getLogger(__name__)

#: Columns shown for offending rows in a failure summary.
_SHOWN = {"labels": ["post_id", "author_key", "group_id", "rank_in_group", "label", "split"],
          "posts": ["dt", "instance", "post_id"], "faces": ["dt", "sha256", "status"]}


class LabelsChanged(RuntimeError):
    """The labels file is not the one its run's record says the labeler wrote."""


class ValidationFailed(RuntimeError):
    """A run failed validation; ``report`` holds what failed. The message is the readable summary."""

    def __init__(self, report: dict[str, Any]):
        self.report = report
        super().__init__(format_failures(report))


def great_expectations():
    """The ``great_expectations`` module, imported on first use (it is slow to import)."""
    # GX logs a few hundred lines at import when Airflow came first: quiet it before it loads.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    return gx


# --------------------------------------------------------------------------- suites


def _schema_expectations(table: str, extra_columns: list[str]) -> list:
    gxe = great_expectations().expectations
    schema = TABLES[table].schema
    out = [gxe.ExpectTableColumnsToMatchSet(column_set=schema.names + extra_columns, exact_match=True)]
    out += [gxe.ExpectColumnValuesToNotBeNull(column=f.name) for f in schema if not f.nullable]
    return out


def posts_suite() -> list:
    gxe = great_expectations().expectations
    return _schema_expectations("posts", ["dt"]) + [
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["dt", "instance", "post_id"]),
        gxe.ExpectColumnValuesToBeBetween(column="n_tags", min_value=0),
        *[gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0)
          for c in ("author_followers", "likes", "reposts", "replies", "views")],
    ]


def faces_suite() -> list:
    gxe = great_expectations().expectations
    return _schema_expectations("faces", ["dt"]) + [
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["dt", "sha256", "detector_id"]),
        gxe.ExpectColumnValuesToBeInSet(column="status", value_set=["ok", "decode_error", "missing", "error"]),
        gxe.ExpectColumnValuesToBeBetween(column="n_faces", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="largest_face_share", min_value=0, max_value=1),
    ]


CHECK_COLUMNS = ["chk_group_rows", "chk_group_positives", "chk_group_ranks", "chk_label_matches_rank",
                 "chk_likes_ascending", "chk_exposure_descending", "chk_author_splits", "chk_group_sources"]


def labels_suite(cfg: Config, run: LabelsRunRecord) -> list:
    """The labels expectations for one run, from its record: the labeler, the parameters and
    ``group_size`` (the rule's G, or the run's rows) it was labeled with, whatever today's
    config says. ``cfg`` gives only the validation policy (``validation.min_rows``)."""
    gxe = great_expectations().expectations
    lab, group_size, half = run.params, run.group_size, run.group_size // 2
    run_id, labeler = run.run_id, run.labeler
    one = [True]
    return _schema_expectations("labels", CHECK_COLUMNS) + [
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.validation.min_rows),
        gxe.ExpectColumnValuesToBeUnique(column="post_id"),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1]),
        gxe.ExpectColumnValuesToBeBetween(column="score", min_value=0, max_value=1, strict_min=True, strict_max=True),
        gxe.ExpectColumnValuesToBeBetween(column="rank_in_group", min_value=1, max_value=group_size),
        gxe.ExpectColumnValuesToBeBetween(column="group_id", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="followers", min_value=lab["min_followers"], max_value=lab["max_followers"]),
        gxe.ExpectColumnValuesToBeBetween(column="n_tags", min_value=0, max_value=lab["max_tags"]),
        gxe.ExpectColumnValuesToBeBetween(column="age_days", min_value=lab["min_age_days"]),
        gxe.ExpectColumnValuesToBeBetween(column="likes", min_value=0),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnValuesToBeInSet(column="labeler", value_set=[labeler]),
        gxe.ExpectColumnValuesToBeInSet(column="params_hash", value_set=[run.params_hash]),
        gxe.ExpectColumnValuesToBeInSet(column="run_id", value_set=[run_id]),
        gxe.ExpectColumnValuesToBeBetween(column="chk_group_rows", min_value=group_size, max_value=group_size),
        gxe.ExpectColumnValuesToBeBetween(column="chk_group_positives", min_value=half, max_value=half),
        gxe.ExpectColumnValuesToBeBetween(column="chk_group_ranks", min_value=group_size, max_value=group_size),
        gxe.ExpectColumnValuesToBeInSet(column="chk_label_matches_rank", value_set=one),
        gxe.ExpectColumnValuesToBeInSet(column="chk_likes_ascending", value_set=one),
        gxe.ExpectColumnValuesToBeInSet(column="chk_exposure_descending", value_set=one),
        gxe.ExpectColumnValuesToBeBetween(column="chk_author_splits", min_value=1, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="chk_group_sources", min_value=1, max_value=1),
    ]


def with_checks(labels: pd.DataFrame, group_size: int) -> pd.DataFrame:
    """``labels`` plus the group- and author-level check columns (vectorized, one per row)."""
    df = labels.copy()
    by_group = df.groupby("group_id", dropna=True)
    df["chk_group_rows"] = by_group["post_id"].transform("size")
    df["chk_group_positives"] = by_group["label"].transform("sum")
    df["chk_group_ranks"] = by_group["rank_in_group"].transform("nunique")
    df["chk_group_sources"] = by_group["source"].transform("nunique")  # groups never mix sources
    df["chk_label_matches_rank"] = df["label"] == (2 * df["rank_in_group"] > group_size).astype("int64")
    df["chk_author_splits"] = df.groupby("author_key", dropna=True)["split"].transform("nunique")

    # Within a group, rank order must be likes ascending, ties post_id ascending.
    s = df.sort_values(["group_id", "rank_in_group"], kind="stable")
    same_group = s["group_id"].eq(s["group_id"].shift())
    prev_likes, prev_id = s["likes"].shift(), s["post_id"].shift()
    ordered = (s["likes"] > prev_likes) | ((s["likes"] == prev_likes) & (s["post_id"] > prev_id))
    df["chk_likes_ascending"] = (~same_group | ordered).reindex(df.index)

    # Group g's lowest exposure is at least group g+1's highest, where g+1 is of the same source.
    stats = by_group.agg(min=("exposure", "min"), max=("exposure", "max"), source=("source", "first")).sort_index()
    next_max = stats["max"].shift(-1).where(stats["source"].shift(-1) == stats["source"])
    ok = next_max.isna() | (stats["min"] >= next_max)
    df["chk_exposure_descending"] = df["group_id"].map(ok).fillna(False).astype(bool)
    return df


# --------------------------------------------------------------------------- running


def read_labels_frame(storage: Storage, run_id: str) -> pd.DataFrame:
    """The labels partition of a run as written (no schema enforcement: validation is the check)."""
    return read_labels_file(storage, run_id)[0]


def read_labels_file(storage: Storage, run_id: str) -> tuple[pd.DataFrame, str]:
    """The labels partition of a run and the sha256 of exactly the bytes it was read from."""
    from pipeline.core.tables import read_partition_exact

    rows, sha256 = read_partition_exact(storage, "labels", run_id)
    return rows.to_pandas(), sha256


def _table_frame(storage: Storage, table: str) -> pd.DataFrame | None:
    from pipeline.core.tables import list_partitions, read_table

    if not list_partitions(storage, table):
        return None
    return read_table(storage, table).to_pandas()


def run_checkpoints(frames: dict[str, tuple[pd.DataFrame, list]], run_name: str,
                    run_time: datetime | None = None) -> dict[str, Any]:
    """Validate each frame against its expectations, one GX checkpoint per table.

    Each frame is the data asset named after its table; ``run_name`` (the labels run id) names
    the GX run. Returns {table: {"success", "rows", "statistics", "data_asset", "suite",
    "run_name", "failures": [...], "result": describe_dict}}.
    """
    gx = great_expectations()
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("likerank")
    run_id = RunIdentifier(run_name=run_name, run_time=run_time or datetime.now(UTC))
    out: dict[str, Any] = {}
    for table, (frame, expectations) in frames.items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("run")
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"likerank_{table}", expectations=expectations))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"likerank_{table}", data=batch, suite=suite))
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(
            name=f"likerank_{table}", validation_definitions=[vd], actions=[],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5}))
        result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
        (vr,) = result.run_results.values()
        out[table] = {"success": bool(result.success), "rows": len(frame),
                      "statistics": dict(vr.statistics),
                      "data_asset": _asset_name(vr.meta) or table, "suite": vr.suite_name,
                      "run_name": result.run_id.run_name,
                      "failures": [_failure(table, frame, er) for er in vr.results if not er.success],
                      "result": result.describe_dict()}
    return out


def _asset_name(meta: dict[str, Any]) -> str | None:
    batch = meta.get("active_batch_definition")
    if isinstance(batch, dict):
        return batch.get("data_asset_name")
    return getattr(batch, "data_asset_name", None)


def _failure(table: str, frame: pd.DataFrame, er: Any) -> dict[str, Any]:
    cfg = er.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",)}
    res = er.result or {}
    rows: list[dict] = []
    index = res.get("partial_unexpected_index_list") or []
    if index:
        shown = [c for c in _SHOWN.get(table, []) if c in frame.columns] + \
                [c for c in (kwargs.get("column"),) if c and c in frame.columns and c not in _SHOWN.get(table, [])]
        rows = frame.loc[[i for i in index if i in frame.index], shown].head(5).to_dict("records")
    return {"table": table, "expectation": cfg.type, "kwargs": kwargs,
            "unexpected_count": res.get("unexpected_count"), "observed_value": res.get("observed_value"),
            "rows": rows}


def format_failures(report: dict[str, Any]) -> str:
    """A readable summary: which expectations failed, how many rows, a few offending rows."""
    lines = [f"validation of labels run {report.get('run_id')} failed "
             f"({report.get('failed_expectations', 0)} expectation(s)); details: {report.get('validation_uri', '-')}"]
    for f in report.get("failures", []):
        what = ", ".join(f"{k}={v!r}" for k, v in f["kwargs"].items())
        count = f"{f['unexpected_count']} unexpected row(s)" if f["unexpected_count"] is not None \
            else f"observed {f['observed_value']!r}"
        lines.append(f"- {f['table']}: {f['expectation']}({what}): {count}")
        lines += [f"    {row}" for row in f["rows"][:3]]
    dropped = {k: v for k, v in (report.get("dropped") or {}).items() if v}
    if dropped:
        lines.append("posts dropped before labeling, by reason: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


def validate_run(cfg: Config, run_id: str, storage: Storage | None = None, *,
                 inputs: bool = True, raise_on_failure: bool = True) -> dict[str, Any]:
    """Validate labels run ``run_id`` (and, with ``inputs``, the posts and faces tables it read).

    Writes ``validation/run=<run_id>/result.json`` and, when ``validation.data_docs``, the run's
    Data Docs page ``validation/run=<run_id>/data_docs/index.html`` and the index of every
    stored run, ``validation/index.html`` (both offline, no script). Returns the report
    (success, statistics per table, failures, keys); raises :class:`ValidationFailed` on failure.
    """
    from pipeline.core.tables import get_json, location, put_json

    storage = storage or open_storage(cfg.storage)
    run = read_labels_run(storage, run_id)
    labels, labels_sha256 = read_labels_file(storage, run_id)
    if labels_sha256 != run.labels_sha256:
        raise LabelsChanged(f"labels run {run_id}: run={run_id} of {location(storage, 'labels')[0]} is not what the "
                            f"labeler wrote (sha256 {labels_sha256[:12]}, recorded {run.labels_sha256[:12]}); "
                            "label the run again")
    frames = {"labels": (with_checks(labels, run.group_size), labels_suite(cfg, run))}
    if inputs:
        for table, suite in (("posts", posts_suite), ("faces", faces_suite)):
            frame = _table_frame(storage, table)
            if frame is not None:
                frames[table] = (frame, suite())

    now = datetime.now(UTC)
    results = run_checkpoints(frames, run_name=run_id, run_time=now)
    failures = [f for r in results.values() for f in r["failures"]]
    report = {
        "run_id": run_id,
        "success": all(r["success"] for r in results.values()),
        "labeler": run.labeler,
        "group_size": run.group_size,
        "dropped": run.record.get("dropped", {}),  # the labels run's drop counts, for the failure message
        "labels_sha256": labels_sha256,  # what this result vouches for: publishing and training check it
        "tables": {t: {k: r[k] for k in ("success", "rows", "statistics", "data_asset", "suite", "run_name")}
                   for t, r in results.items()},
        "failed_expectations": len(failures),
        "failures": failures,
        "validation_key": keys.validation_result(run_id),
        "validation_uri": storage.uri(keys.validation_result(run_id)),
        "validated_at": now.isoformat(timespec="seconds"),
        "docs_key": keys.validation_page(run_id) if cfg.validation.data_docs else None,
    }
    storage.delete_prefix(f"{keys.validation_docs(run_id)}/")  # a rerun replaces, never mixes, old pages
    put_json(storage, report["validation_key"], {**report, "results": {t: r["result"] for t, r in results.items()}})
    if cfg.validation.data_docs:  # rendered from the result as stored: this run's page, then the index of all
        write_data_docs(storage, get_json(storage, report["validation_key"]))
    log.info("validation of labels run %s: %s (%d failed expectation(s))", run_id,
             "passed" if report["success"] else "FAILED", len(failures))
    if not report["success"] and raise_on_failure:
        raise ValidationFailed(report)
    return report

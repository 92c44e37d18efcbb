"""The report's inputs: the chosen labels and model runs, their predictions, validation
results and metrics, read once into a :class:`ReportContext` that every section reads; the
model run itself is loaded on first use (:meth:`ReportContext.need_model`)."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core import keys
from pipeline.core.published import published_run_id
from pipeline.core.storage import LocalStorage, Storage
from pipeline.core.tables import get_json, list_partitions, read_table

log = logging.getLogger(__name__)

METRIC_ORDER = ("n", "accuracy", "roc_auc", "log_loss", "pearson_r", "spearman_r", "mae", "rmse")


class NotAvailable(Exception):
    """A section's input does not exist yet; the message says why, for the reader."""

@dataclass
class Section:
    id: str
    title: str
    body: dict[str, Any] = field(default_factory=dict)
    na: str = ""  # "not available" reason
    error: str = ""  # the section failed on its input

@dataclass
class ReportContext:
    """What every section reads: the storage, the chosen runs and the folder being written."""

    storage: Storage
    out: Path
    labels_run: str | None
    labels: pd.DataFrame | None
    labels_why: str  # why labels is None
    published_run: str | None
    model_run: str | None
    model_why: str
    metrics: dict[str, Any] | None
    predictions: pd.DataFrame | None = None
    predictions_why: str = ""
    truth_file: str = ""  # ground truth (post_id, quality) beside the findings; "" = none
    charts: list[str] = field(default_factory=list)
    _con: Any = None
    _model: Any = None  # scoring.torch_model.TorchModel, loaded once by need_model()
    _model_unavailable: str = ""  # why need_model() could not load it

    def con(self):
        if self._con is None:
            from pipeline.core.query import connect

            self._con = connect(self.storage)
        return self._con

    def sql(self, query: str) -> pd.DataFrame:
        return self.con().sql(query).df()

    def need_model(self) -> Any:
        """The model run's network (:class:`scoring.torch_model.TorchModel`), loaded once for every
        section that runs it; raises :class:`NotAvailable` when there is none to load."""
        if self._model is None and not self._model_unavailable:
            if self.model_run is None:
                self._model_unavailable = self.model_why
            else:
                from scoring.model import ModelUnavailable
                from scoring.torch_model import load_registry_model

                try:
                    self._model = load_registry_model(self.storage, self.model_run)
                except ModelUnavailable as exc:
                    self._model_unavailable = str(exc)
        if self._model is None:
            raise NotAvailable(f"no model to run: {self._model_unavailable}")
        return self._model

    def need_labels(self) -> pd.DataFrame:
        if self.labels is None:
            raise NotAvailable(self.labels_why)
        if self.labels.empty:
            raise NotAvailable(f"labels run {self.labels_run!r} has no rows")
        return self.labels


def default_out_dir(storage: Storage, labels_run: str | None) -> Path:
    """``<storage root>/reports/<run>/`` on local storage, else ``./reports/<run>/``."""
    name = labels_run or "no-labels"
    if isinstance(storage, LocalStorage):
        return storage.path / keys.report_run(name)
    return Path(keys.report_run(name))

def load_context(storage: Storage, labels_run: str | None, model_run: str | None,
                  out: str | Path | None) -> ReportContext:
    published = published_run_id(storage)
    runs = list_partitions(storage, "labels")
    labels, why = None, ""
    run = labels_run or published or (runs[-1] if runs else None)
    if run is None:
        why = f"no labels run found under {storage.uri('labels/')} (run the labeler first)"
    elif run not in runs:
        why = f"labels run {run!r} has no partition at {storage.uri(keys.labels_run(run) + '/')}"
    else:
        labels = read_table(storage, "labels", [run]).to_pandas()

    metrics, model_why = None, ""
    latest = get_json(storage, keys.LATEST_MODEL) or {}
    mrun = model_run or latest.get("run_id")
    if mrun is None:
        model_why = f"no trained model: {storage.uri(keys.LATEST_MODEL)} does not exist (train first)"
    else:
        key = latest.get("metrics_key") if (not model_run and latest.get("metrics_key")) else keys.model_metrics(mrun)
        metrics = get_json(storage, key)
        if metrics is None:
            model_why = f"model run {mrun!r}: {storage.uri(key)} does not exist (not trained, still training, or failed)"

    ctx = ReportContext(storage=storage, out=Path(out) if out else default_out_dir(storage, run), labels_run=run,
                   labels=labels, labels_why=why, published_run=published, model_run=mrun,
                   model_why=model_why, metrics=metrics)
    ctx.out = ctx.out.resolve()
    if metrics is not None:
        try:
            ctx.predictions, ctx.predictions_why = load_predictions(storage, mrun, labels)
        except Exception as exc:  # noqa: BLE001 - a bad predictions file must not sink the report
            log.exception("report: reading predictions of model run %s", mrun)
            ctx.predictions_why = f"predictions of model run {mrun!r} could not be read: {exc}"
    else:
        ctx.predictions_why = model_why
    return ctx


def load_predictions(storage: Storage, run: str, labels: pd.DataFrame | None) -> tuple[pd.DataFrame | None, str]:
    """The model run's readable test predictions (the ``predictions`` schema), with each post's
    label score joined from the labels run, or (None, why)."""
    import pyarrow.parquet as pq

    from pipeline.core.schemas import conform

    key = keys.model_predictions(run)
    if not storage.exists(key):
        return None, f"no predictions file: model run {run!r} has no {storage.uri(key)}"
    frame = conform("predictions", pq.read_table(io.BytesIO(storage.get_bytes(key)))).to_pandas()
    frame = frame[(frame["split"] == "test") & (frame["weight"] > 0)]  # weight 0: unreadable image
    if labels is not None:
        frame = frame.merge(labels[["post_id", "score"]], on="post_id", how="left")
    keep = ["post_id", "prob", "label", "pred_score"] + (["score"] if "score" in frame else [])
    frame = frame[keep].drop_duplicates("post_id")
    return frame.reset_index(drop=True), f"{len(frame):,} test predictions from {storage.uri(key)}"


def validation_results(obj: Any, depth: int = 0, name: str = "") -> Iterable[dict[str, Any]]:
    """Every GX validation result inside a JSON document (a result, a checkpoint result, a list).

    ``name`` is the nearest enclosing key that names something (e.g. the table), used as the
    suite's name where the result carries none.
    """
    if depth > 6:
        return
    if isinstance(obj, dict):
        if isinstance(obj.get("results"), list) and ("statistics" in obj or "success" in obj):
            yield {"suite_name": name, **obj}
            return
        if isinstance(obj.get("expectations"), list) and "success" in obj:
            # GX 1.x's describe_dict() form (what `labeling.validate` stores): flat expectations
            yield {"suite_name": name, **obj, "results": obj["expectations"]}
            return
        for k, v in obj.items():
            generic = k in ("results", "validation_results", "run_results", "tables")
            yield from validation_results(v, depth + 1, name if generic else str(k))
    elif isinstance(obj, list):
        for v in obj:
            yield from validation_results(v, depth + 1, name)

def expectation_row(r: dict[str, Any]) -> dict[str, Any]:
    conf = r.get("expectation_config") or r  # full result form, or describe_dict()'s flat one
    kwargs = {k: v for k, v in (conf.get("kwargs") or {}).items() if k != "batch_id"}
    result = r.get("result") or {}
    detail = {k: result[k] for k in ("observed_value", "element_count", "unexpected_count",
                                     "unexpected_percent", "partial_unexpected_list") if k in result}
    if "partial_unexpected_list" in detail:
        detail["partial_unexpected_list"] = detail["partial_unexpected_list"][:10]
    exc = r.get("exception_info") or {}
    if isinstance(exc, dict) and exc.get("raised_exception"):
        detail["exception"] = exc.get("exception_message")
    return {"type": conf.get("type") or conf.get("expectation_type") or "?",
            "column": kwargs.pop("column", ""), "kwargs": kwargs, "success": r.get("success"),
            "detail": detail}

def data_docs(ctx: ReportContext, html_keys: list[str]) -> dict[str, str] | None:
    if not html_keys:
        return None
    key = sorted(html_keys, key=lambda k: (not k.endswith("index.html"), k.count("/"), k))[0]
    docs = {"uri": ctx.storage.uri(key), "href": ""}
    if isinstance(ctx.storage, LocalStorage):
        docs["href"] = Path(os.path.relpath(ctx.storage.path / key, ctx.out)).as_posix()
    return docs

def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)

def metrics_table(m: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Rows of metrics (``val``, ``test``, ``truth.test``, ...) and everything else worth showing.

    A dict is a row when it names at least one known metric (accuracy, roc_auc, ...), so
    counts such as ``rows: {train, val, test}`` stay details rather than becoming columns.
    """
    known = set(METRIC_ORDER) - {"n"}

    def row(d: Any) -> dict[str, Any] | None:
        if isinstance(d, dict) and known & {k for k, v in d.items() if is_number(v)}:
            return {k: v for k, v in d.items() if is_number(v)}
        return None

    table: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    for k, v in m.items():
        if k in ("predictions", "test_predictions", "history", "config"):
            continue
        subs = {f"{k}.{sk}": row(sv) for sk, sv in v.items()} if isinstance(v, dict) else {}
        subs = {sk: r for sk, r in subs.items() if r}
        if row(v):
            table[k] = row(v)
        table.update(subs)
        if not row(v) and not subs and (not isinstance(v, list) or len(v) <= 20):
            extra[k] = v
    first = [k for k in ("train", "val", "test") if k in table]
    return {k: table[k] for k in first + [k for k in table if k not in first]}, extra

def metric_columns(table: dict[str, dict[str, Any]]) -> list[str]:
    names = {c for row in table.values() for c in row}
    return [c for c in METRIC_ORDER if c in names] + sorted(names - set(METRIC_ORDER))

"""The HTML report: one static folder per labels run, readable offline.

``build_report`` writes ``index.html`` with its charts (PNG, matplotlib's Agg renderer through
``matplotlib.figure.Figure``, so no pyplot state and no display) and downscaled JPEG thumbnails
(``thumbs/``) beside it; nothing is fetched from the network when it is opened.

Sections, each an element id in the page (tests and links rely on them):

=====================  =====================================================================
id                     what it shows, and what it reads
=====================  =====================================================================
``funnel``             counts per stage: posts, downloads by status, images, faces (0 / 1 /
                       many / errors), label rows; the labeler's drop reasons
                       (``labels/run=<id>/_summary.json``, rendered generically)
``distributions``      log-scale histograms of followers and likes (labels run; all posts)
``likes-vs-followers`` log-log scatter coloured by label, with each group's lowest exposure
``label-balance``      positive share per ``group_id`` (the rule makes it exactly 0.5)
``validation``         the Great Expectations result JSON under ``validation/run=<id>/``
                       (success, statistics, failed expectations) and a link to Data Docs
``model``              ``models/latest.json`` -> ``models/<run>/metrics.json``: the metrics
                       table; a ROC curve and a calibration plot when per-post test
                       predictions exist (``predictions`` in metrics.json or a
                       ``models/<run>/predictions.{parquet,csv,json,jsonl}`` file)
``contact-sheets``     the test split's photos ordered best to worst (by predicted
                       probability, else by label score): a continuum, the top and bottom N
=====================  =====================================================================

A missing input (no model yet, no validation yet, no posts table) renders as
"not available: <why>" in its section and never stops the rest of the report. A section that
fails on malformed input is logged with its traceback and rendered as an error in place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.storage import ImageStore, LocalStorage, Storage, StorageError
from pipeline.tables import get_json, list_partitions, read_table

log = logging.getLogger(__name__)

PUBLISHED_KEY = "labels/_published.json"
MODELS_LATEST_KEY = "models/latest.json"
TEMPLATE = Path(__file__).with_name("templates") / "report.html.j2"

#: Thumbnail edge, pixels (square crops, JPEG). Karpathy's sheets used ~100 px tiles.
THUMB_PX = 112
THUMB_QUALITY = 82
#: Tiles in the best-to-worst continuum (sampled evenly along the order) and in each top/bottom grid.
CONTINUUM_N = 160
EDGE_N = 24
#: Scatter points drawn (a uniform subsample beyond this) and group boundary lines drawn.
MAX_POINTS = 20_000
MAX_GROUP_LINES = 40

#: Column names a predictions table may use, in order of preference.
PROB_COLUMNS = ("prob", "p", "prob_pos", "probability", "pred_prob", "y_prob", "p_label", "pred")
PRED_SCORE_COLUMNS = ("pred_score", "score_pred", "score_hat", "y_score")
LABEL_COLUMNS = ("label", "y", "y_true")
METRIC_ORDER = ("n", "accuracy", "roc_auc", "log_loss", "pearson_r", "spearman_r", "mae", "rmse")

COLORS = {"neg": "#4c72b0", "pos": "#dd8452", "posts": "#8c8c8c", "labels": "#4c72b0", "line": "#c44e52"}


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
class _Context:
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
    charts: list[str] = field(default_factory=list)
    _con: Any = None

    def con(self):
        if self._con is None:
            from pipeline.query import connect

            self._con = connect(self.storage)
        return self._con

    def sql(self, query: str) -> pd.DataFrame:
        return self.con().sql(query).df()

    def need_labels(self) -> pd.DataFrame:
        if self.labels is None:
            raise NotAvailable(self.labels_why)
        if self.labels.empty:
            raise NotAvailable(f"labels run {self.labels_run!r} has no rows")
        return self.labels


# ---------------------------------------------------------------------------------- entry point


def default_out_dir(storage: Storage, labels_run: str | None) -> Path:
    """``<storage root>/reports/<run>/`` on local storage, else ``./reports/<run>/``."""
    name = labels_run or "no-labels"
    if isinstance(storage, LocalStorage):
        return storage.path / "reports" / name
    return Path("reports") / name


def build_report(
    cfg: Config,
    storage: Storage | None = None,
    labels_run: str | None = None,
    model_run: str | None = None,
    out: str | Path | None = None,
) -> Path:
    """Write the report folder and return the path of its ``index.html``.

    ``labels_run`` defaults to the published run (``labels/_published.json``), else the newest
    labels partition; ``model_run`` to ``models/latest.json``'s run; ``out`` to
    :func:`default_out_dir`. Files the report owns (``index.html``, ``*.png``, ``thumbs/``) are
    replaced on a rerun; ``index.html`` is written last and atomically.
    """
    if storage is None:
        from pipeline.storage import open_storage

        storage = open_storage(cfg.storage)
    ctx = _load_context(storage, labels_run, model_run, out)
    ctx.out.mkdir(parents=True, exist_ok=True)
    # Only what this module writes is cleared: --out may be a folder holding other things.
    for old in ctx.out.glob("*.png"):
        old.unlink()
    shutil.rmtree(ctx.out / "thumbs", ignore_errors=True)

    sections = [_section(ctx, sid, title, build) for sid, title, build in SECTIONS]
    if ctx._con is not None:
        ctx._con.close()
    html = _render(ctx, sections, cfg)
    index = ctx.out / "index.html"
    with tempfile.NamedTemporaryFile("w", dir=ctx.out, prefix=".tmp-", suffix=".html", delete=False,
                                     encoding="utf-8") as fh:
        fh.write(html)
    os.replace(fh.name, index)
    log.info("report: %s", index)
    return index


def _load_context(storage: Storage, labels_run: str | None, model_run: str | None,
                  out: str | Path | None) -> _Context:
    pointer = get_json(storage, PUBLISHED_KEY) or {}
    published = pointer.get("run_id")
    runs = list_partitions(storage, "labels")
    labels, why = None, ""
    run = labels_run or published or (runs[-1] if runs else None)
    if run is None:
        why = f"no labels run found under {storage.uri('labels/')} (run the labeler first)"
    elif run not in runs:
        why = f"labels run {run!r} has no partition at {storage.uri(f'labels/run={run}/')}"
    else:
        labels = read_table(storage, "labels", [run]).to_pandas()

    metrics, model_why = None, ""
    latest = get_json(storage, MODELS_LATEST_KEY) or {}
    mrun = model_run or latest.get("run_id")
    if mrun is None:
        model_why = f"no trained model: {storage.uri(MODELS_LATEST_KEY)} does not exist (train first)"
    else:
        key = latest.get("metrics_key") if (not model_run and latest.get("metrics_key")) else f"models/{mrun}/metrics.json"
        metrics = get_json(storage, key)
        if metrics is None:
            model_why = f"model run {mrun!r}: {storage.uri(key)} does not exist (not trained, still training, or failed)"

    ctx = _Context(storage=storage, out=Path(out) if out else default_out_dir(storage, run), labels_run=run,
                   labels=labels, labels_why=why, published_run=published, model_run=mrun,
                   model_why=model_why, metrics=metrics)
    ctx.out = ctx.out.resolve()
    if metrics is not None:
        try:
            ctx.predictions, ctx.predictions_why = _load_predictions(storage, mrun, metrics, labels)
        except Exception as exc:  # noqa: BLE001 - a bad predictions file must not sink the report
            log.exception("report: reading predictions of model run %s", mrun)
            ctx.predictions_why = f"predictions of model run {mrun!r} could not be read: {exc}"
    else:
        ctx.predictions_why = model_why
    return ctx


def _section(ctx: _Context, sid: str, title: str, build: Callable[[_Context], dict[str, Any]]) -> Section:
    try:
        return Section(sid, title, body=build(ctx))
    except NotAvailable as exc:
        return Section(sid, title, na=str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad input must not hide the other sections
        log.exception("report: section %s failed", sid)
        return Section(sid, title, error=f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------- sections


def funnel_section(ctx: _Context) -> dict[str, Any]:
    """Counts per stage, plus the labeler's drop reasons."""
    stages: list[dict[str, Any]] = []

    def scalar(q: str) -> int:
        return int(ctx.sql(q).iloc[0, 0] or 0)

    posts = scalar("select count(distinct (instance, post_id)) from posts")
    stages.append({"stage": "posts scraped", "count": posts, "detail": {}})
    dl = ctx.sql("select status, count(*) n from downloads group by 1 order by 2 desc, 1")
    stages.append({"stage": "downloads attempted", "count": int(dl.n.sum()) if len(dl) else 0,
                   "detail": {r.status: int(r.n) for r in dl.itertuples()}})
    stages.append({"stage": "images stored", "count": scalar("select count(distinct sha256) from images"),
                   "detail": {}})
    # One row per image: its newest detection (a rerun with another detector adds rows).
    faces = ctx.sql("""
        with latest as (select * from faces qualify row_number() over (partition by sha256 order by detected_at desc) = 1)
        select count(*) filter (where status <> 'ok') as errors,
               count(*) filter (where status = 'ok' and n_faces = 0) as "0 faces",
               count(*) filter (where status = 'ok' and n_faces = 1) as "1 face",
               count(*) filter (where status = 'ok' and n_faces > 1) as "2+ faces",
               count(*) as total
        from latest""").iloc[0]
    stages.append({"stage": "images through face detection", "count": int(faces["total"] or 0),
                   "detail": {k: int(faces[k] or 0) for k in ("0 faces", "1 face", "2+ faces", "errors")}})
    if ctx.labels is not None:
        lab = ctx.labels
        detail = {f"split {k}": int(v) for k, v in lab["split"].value_counts().sort_index().items()}
        detail.update({f"label {k}": int(v) for k, v in lab["label"].value_counts().sort_index().items()})
        detail["groups"] = int(lab["group_id"].nunique())
        stages.append({"stage": f"label rows (run {ctx.labels_run})", "count": len(lab), "detail": detail})
    else:
        stages.append({"stage": "label rows", "count": 0, "detail": {"not available": ctx.labels_why}})

    chart = None
    if any(s["count"] for s in stages):
        bars = [("posts", posts), ("downloads ok", stages[1]["detail"].get("ok", 0)),
                ("images", stages[2]["count"]),
                ("with >= 1 face", stages[3]["detail"]["1 face"] + stages[3]["detail"]["2+ faces"]),
                ("labeled", len(ctx.labels) if ctx.labels is not None else 0)]
        chart = _funnel_chart(ctx, bars)

    summary, summary_why = None, ""
    if ctx.labels_run is None:
        summary_why = ctx.labels_why
    else:
        key = f"labels/run={ctx.labels_run}/_summary.json"
        summary = get_json(ctx.storage, key)
        if summary is None:
            summary_why = f"{ctx.storage.uri(key)} does not exist"
    return {"stages": stages, "chart": chart, "summary": summary, "summary_why": summary_why}


def distributions_section(ctx: _Context) -> dict[str, Any]:
    series: dict[str, dict[str, np.ndarray]] = {}
    if ctx.labels is not None and not ctx.labels.empty:
        series[f"labels run {ctx.labels_run}"] = {"followers": ctx.labels["followers"].to_numpy(),
                                                   "likes": ctx.labels["likes"].to_numpy()}
    posts = ctx.sql("""select any_value(author_followers) followers, any_value(likes) likes
                       from posts group by instance, post_id""")
    if len(posts):
        series["all posts (as scraped)"] = {"followers": posts["followers"].to_numpy(),
                                            "likes": posts["likes"].to_numpy()}
    if not series:
        raise NotAvailable(f"no labels and no posts yet ({ctx.labels_why or 'empty labels run'})")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    stats = []
    for ax, col in zip(fig.subplots(1, 2), ("followers", "likes"), strict=True):
        top = max(float(np.max(s[col])) for s in series.values() if len(s[col]))
        bins = np.logspace(0, math.log10(top + 1) + 0.05, 40)
        for name, s in sorted(series.items(), key=lambda kv: not kv[0].startswith("all posts")):
            is_posts = name.startswith("all posts")
            ax.hist(s[col] + 1, bins=bins, histtype="stepfilled" if is_posts else "step",
                    linewidth=0 if is_posts else 1.8, alpha=0.45 if is_posts else 1.0,
                    color=COLORS["posts" if is_posts else "labels"], label=f"{name} (n={len(s[col]):,})")
            stats.append({"table": name, "column": col, "n": len(s[col]), "zeros": int((s[col] == 0).sum()),
                          "median": float(np.median(s[col])), "p90": float(np.percentile(s[col], 90)),
                          "max": int(np.max(s[col]))})
        ax.set_xscale("log")
        ax.set_xlabel(f"{col} + 1 (log scale)")
        ax.set_ylabel("posts")
        ax.legend(fontsize=8, frameon=False)
    return {"chart": _save(ctx, fig, "distributions.png"), "stats": stats}


def scatter_section(ctx: _Context) -> dict[str, Any]:
    lab = ctx.need_labels()
    from matplotlib.figure import Figure

    pts = lab.sample(MAX_POINTS, random_state=0) if len(lab) > MAX_POINTS else lab
    marker = float(np.clip(3000 / max(len(pts), 1), 3, 24))  # points^2: big when few, small when many
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    bounds = lab.groupby("group_id")["exposure"].min().sort_index()
    shown = bounds
    if len(bounds) > MAX_GROUP_LINES:
        shown = bounds.iloc[np.unique(np.linspace(0, len(bounds) - 1, MAX_GROUP_LINES).round().astype(int))]
    for i, x in enumerate(shown.to_numpy()):
        ax.axvline(max(x, 1.0), color="#999999", linewidth=0.6, alpha=0.6, zorder=0,
                   label="lowest exposure of a group" if i == 0 else None)
    for value, name, color in ((0, "label 0", COLORS["neg"]), (1, "label 1", COLORS["pos"])):
        sub = pts[pts["label"] == value]
        ax.scatter(sub["followers"].clip(lower=1), sub["likes"] + 1, s=marker, alpha=0.6, color=color,
                   label=f"{name} (n={int((lab['label'] == value).sum()):,})", linewidths=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("author followers (log)")
    ax.set_ylabel("likes + 1 (log)")
    ax.legend(fontsize=8, frameon=False, loc="upper left", markerscale=max(1.0, 24 / marker) ** 0.5)
    return {"chart": _save(ctx, fig, "likes_vs_followers.png"), "n": len(lab), "drawn": len(pts),
            "groups": len(bounds), "lines": len(shown)}


def balance_section(ctx: _Context) -> dict[str, Any]:
    lab = ctx.need_labels()
    g = lab.groupby("group_id").agg(n=("label", "size"), positives=("label", "sum")).sort_index()
    g["share"] = g["positives"] / g["n"]
    off = g[(g["share"] - 0.5).abs() > 1e-12]
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 3), layout="constrained")
    ax = fig.subplots()
    ax.axhline(0.5, color=COLORS["line"], linewidth=1, label="0.5")
    ax.plot(g.index, g["share"], "o", markersize=3, color=COLORS["neg"], label="positive share")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("group_id (0 = highest exposure)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("share label = 1")
    ax.legend(fontsize=8, frameon=False)
    return {
        "chart": _save(ctx, fig, "label_balance.png"),
        "ok": off.empty,
        "groups": len(g),
        "sizes": sorted({int(x) for x in g["n"]}),
        "share_min": float(g["share"].min()),
        "share_max": float(g["share"].max()),
        "off": [{"group_id": int(i), "n": int(r.n), "positives": int(r.positives), "share": float(r.share)}
                for i, r in off.head(50).iterrows()],
        "off_count": len(off),
    }


def validation_section(ctx: _Context) -> dict[str, Any]:
    if ctx.labels_run is None:
        raise NotAvailable(ctx.labels_why)
    prefix = f"validation/run={ctx.labels_run}/"
    keys = ctx.storage.list(prefix)
    if not keys:
        raise NotAvailable(f"nothing under {ctx.storage.uri(prefix)} (the run was not validated yet)")
    results, sources = [], []
    for key in (k for k in keys if k.endswith(".json")):
        with contextlib.suppress(ValueError, StorageError):
            found = list(_validation_results(get_json(ctx.storage, key)))
            if found:
                results += found
                sources.append(key)
    docs = _data_docs(ctx, [k for k in keys if k.endswith(".html")])
    if not results:
        raise NotAvailable(f"no Great Expectations result JSON under {ctx.storage.uri(prefix)}"
                           + (f" (Data Docs: {docs['uri']})" if docs else ""))
    suites = []
    for res in results:
        rows = [_expectation_row(r) for r in res.get("results") or []]
        suites.append({
            "name": res.get("suite_name") or (res.get("meta") or {}).get("expectation_suite_name") or "",
            "success": res.get("success"),
            "statistics": res.get("statistics") or {},
            "failed": [r for r in rows if r["success"] is False],
            "rows": rows,
        })
    return {"success": all(s["success"] is True for s in suites), "suites": suites,
            "sources": [ctx.storage.uri(k) for k in sources], "docs": docs,
            "published": ctx.published_run == ctx.labels_run}


def model_section(ctx: _Context) -> dict[str, Any]:
    if ctx.metrics is None:
        raise NotAvailable(ctx.model_why)
    m = ctx.metrics
    table, extra = _metrics_table(m)
    history = m.get("history") if isinstance(m.get("history"), list) else None
    body: dict[str, Any] = {
        "run": ctx.model_run, "table": table, "columns": _metric_columns(table), "extra": extra,
        "labels_run": m.get("labels_run"), "history": history,
        "mismatch": bool(m.get("labels_run") and ctx.labels_run and m.get("labels_run") != ctx.labels_run),
        "predictions_why": ctx.predictions_why, "roc": None, "roc_why": "", "calibration": None,
        "history_chart": None,
    }
    if history:
        body["history_chart"] = _history_chart(ctx, history)
    pred = ctx.predictions
    if pred is not None and "label" in pred and pred["label"].notna().any():
        p = pred.dropna(subset=["label", "prob"])
        y, prob = p["label"].to_numpy().astype(int), p["prob"].to_numpy().astype(float)
        if len(np.unique(y)) == 2:
            body["roc"] = _roc_chart(ctx, y, prob)
        else:
            body["roc_why"] = "the test predictions hold a single class"
        body["calibration"] = _calibration_chart(ctx, y, prob)
        body["n_pred"] = len(p)
    elif pred is not None:
        body["predictions_why"] = "the predictions have no labels to compare with (no post_id match)"
    return body


def contact_sheets_section(ctx: _Context) -> dict[str, Any]:
    lab = ctx.need_labels()
    rows = lab[lab["split"] == "test"]
    scope = "test split"
    if rows.empty:
        rows, scope = lab, "all rows (this run has no test split)"
    rows = rows.copy()
    pred = ctx.predictions
    if pred is not None and len(pred):
        rows = rows.merge(pred[["post_id", "prob"]], on="post_id", how="inner")
        if rows.empty:
            raise NotAvailable("no predicted post matches a labeled post of this run")
        rows = rows.sort_values(["prob", "post_id"], ascending=[False, True])
        order = "predicted probability of label 1 (the model's test predictions)"
    else:
        # Within-group score ties across groups; more likes per exposure breaks them.
        rows["_ratio"] = rows["likes"] / rows["exposure"].clip(lower=1)
        rows = rows.sort_values(["score", "_ratio", "post_id"], ascending=[False, False, True])
        order = "label score (" + ("no model yet" if ctx.metrics is None else "the model has no per-post predictions") + ")"
    rows = rows.reset_index(drop=True)
    thumbs = _Thumbnailer(ctx, rows["image_sha256"].unique().tolist())
    idx = np.unique(np.linspace(0, len(rows) - 1, min(CONTINUUM_N, len(rows))).round().astype(int))
    n_edge = min(EDGE_N, len(rows) // 2) or len(rows)

    def tiles(index: Iterable[int]) -> list[dict[str, Any]]:
        out = []
        for i in index:
            r = rows.iloc[int(i)]
            value = f"p {r['prob']:.2f}" if "prob" in rows else f"s {r['score']:.2f}"
            out.append({"src": thumbs.get(r["image_sha256"]), "caption": value, "rank": int(i) + 1,
                        "label": int(r["label"]),
                        "title": f"#{int(i) + 1} post {r['post_id']} · {value} · label {int(r['label'])} · "
                                 f"likes {int(r['likes']):,} · followers {int(r['followers']):,} · group {int(r['group_id'])}"})
        return out

    return {"scope": scope, "order": order, "n": len(rows), "continuum": tiles(idx),
            "top": tiles(range(n_edge)), "bottom": tiles(range(len(rows) - n_edge, len(rows))),
            "missing": thumbs.missing, "thumb_px": THUMB_PX}


#: The page's sections, in order: element id, heading, builder.
SECTIONS: list[tuple[str, str, Callable[[_Context], dict[str, Any]]]] = [
    ("funnel", "Funnel", funnel_section),
    ("distributions", "Followers and likes", distributions_section),
    ("likes-vs-followers", "Likes against followers", scatter_section),
    ("label-balance", "Label balance per group", balance_section),
    ("validation", "Validation", validation_section),
    ("model", "Model", model_section),
    ("contact-sheets", "Contact sheets", contact_sheets_section),
]
SECTION_IDS = [sid for sid, _, _ in SECTIONS]


# ---------------------------------------------------------------------------------- inputs


def _load_predictions(storage: Storage, run: str, metrics: dict[str, Any],
                      labels: pd.DataFrame | None) -> tuple[pd.DataFrame | None, str]:
    """Per-post test predictions as columns post_id, prob (+ label, score) or (None, why)."""
    raw, source = None, ""
    for holder, name in ((metrics, "predictions"), (metrics, "test_predictions"),
                         (metrics.get("test") or {}, "predictions")):
        if isinstance(holder, dict) and holder.get(name):
            raw, source = holder[name], f"metrics.json {name}"
            break
    if raw is not None:
        frame = pd.DataFrame(raw)
    else:
        files = [k for k in storage.list(f"models/{run}/") if "pred" in k.rsplit("/", 1)[-1]
                 and k.endswith((".parquet", ".csv", ".json", ".jsonl"))]
        if not files:
            return None, (f"no predictions file: model run {run!r} has no per-post predictions "
                          f"(neither 'predictions' in metrics.json nor models/{run}/predictions.*)")
        source = files[0]
        data = storage.get_bytes(files[0])
        if source.endswith(".parquet"):
            frame = pd.read_parquet(io.BytesIO(data))
        elif source.endswith(".csv"):
            frame = pd.read_csv(io.BytesIO(data), dtype={"post_id": str})
        else:
            frame = pd.read_json(io.BytesIO(data), lines=source.endswith(".jsonl"), dtype={"post_id": str})
    prob = next((c for c in PROB_COLUMNS if c in frame), None)
    if prob is None:
        return None, f"{source}: no probability column (looked for {', '.join(PROB_COLUMNS)})"
    frame = frame.rename(columns={prob: "prob"})
    if "split" in frame and (frame["split"] == "test").any():
        frame = frame[frame["split"] == "test"]
    if "weight" in frame:  # the trainer marks unreadable images with weight 0
        frame = frame[frame["weight"] > 0]
    if "post_id" not in frame:
        sha = next((c for c in ("image_sha256", "sha256") if c in frame), None)
        if sha is None or labels is None:
            return None, f"{source}: no post_id (or image_sha256) column to join on"
        frame = frame.merge(labels[["image_sha256", "post_id"]], left_on=sha, right_on="image_sha256", how="inner")
    frame["post_id"] = frame["post_id"].astype(str)
    lab_col = next((c for c in LABEL_COLUMNS if c in frame), None)
    if lab_col and lab_col != "label":
        frame = frame.rename(columns={lab_col: "label"})
    if labels is not None:
        join = labels[["post_id", "label", "score"]].rename(columns={"label": "_label", "score": "_score"})
        frame = frame.merge(join, on="post_id", how="left")
        frame["label"] = frame["label"] if "label" in frame else frame["_label"]
        frame["label"] = frame["label"].fillna(frame["_label"])
        frame["score"] = frame["score"] if "score" in frame else frame["_score"]
    keep = ["post_id", "prob"] + [c for c in ("label", "score") if c in frame]
    keep += [c for c in PRED_SCORE_COLUMNS if c in frame][:1]
    frame = frame[keep].drop_duplicates("post_id")
    return frame.reset_index(drop=True), f"{len(frame):,} test predictions from {source}"


def _validation_results(obj: Any, depth: int = 0, name: str = "") -> Iterable[dict[str, Any]]:
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
            yield from _validation_results(v, depth + 1, name if generic else str(k))
    elif isinstance(obj, list):
        for v in obj:
            yield from _validation_results(v, depth + 1, name)


def _expectation_row(r: dict[str, Any]) -> dict[str, Any]:
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


def _data_docs(ctx: _Context, html_keys: list[str]) -> dict[str, str] | None:
    if not html_keys:
        return None
    key = sorted(html_keys, key=lambda k: (not k.endswith("index.html"), k.count("/"), k))[0]
    docs = {"uri": ctx.storage.uri(key), "href": ""}
    if isinstance(ctx.storage, LocalStorage):
        docs["href"] = Path(os.path.relpath(ctx.storage.path / key, ctx.out)).as_posix()
    return docs


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _metrics_table(m: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Rows of metrics (``val``, ``test``, ``truth.test``, ...) and everything else worth showing.

    A dict is a row when it names at least one known metric (accuracy, roc_auc, ...), so
    counts such as ``rows: {train, val, test}`` stay details rather than becoming columns.
    """
    known = set(METRIC_ORDER) - {"n"}

    def row(d: Any) -> dict[str, Any] | None:
        if isinstance(d, dict) and known & {k for k, v in d.items() if _is_number(v)}:
            return {k: v for k, v in d.items() if _is_number(v)}
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


def _metric_columns(table: dict[str, dict[str, Any]]) -> list[str]:
    names = {c for row in table.values() for c in row}
    return [c for c in METRIC_ORDER if c in names] + sorted(names - set(METRIC_ORDER))


# ---------------------------------------------------------------------------------- charts


def _save(ctx: _Context, fig, name: str) -> str:
    fig.savefig(ctx.out / name, dpi=100, metadata={"Software": None})
    ctx.charts.append(name)
    return name


def _funnel_chart(ctx: _Context, bars: list[tuple[str, int]]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.6), layout="constrained")
    ax = fig.subplots()
    names, counts = [b[0] for b in bars][::-1], [b[1] for b in bars][::-1]
    ax.barh(names, counts, color=COLORS["labels"])
    top = max(counts) or 1
    for y, c in enumerate(counts):
        ax.text(c + top * 0.01, y, f"{c:,}", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel("count")
    return _save(ctx, fig, "funnel.png")


def roc_points(y: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold (ties move together)."""
    order = np.argsort(-prob, kind="mergesort")
    y, prob = y[order], prob[order]
    last = np.r_[np.flatnonzero(np.diff(prob)), len(prob) - 1]  # last index of each tied run
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def _roc_chart(ctx: _Context, y: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    from matplotlib.figure import Figure

    fpr, tpr = roc_points(y, prob)
    auc = float(np.trapezoid(tpr, fpr))
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#aaaaaa", linewidth=1, linestyle="--", label="chance")
    ax.plot(fpr, tpr, color=COLORS["pos"], linewidth=2, label=f"model (AUC {auc:.3f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return {"chart": _save(ctx, fig, "roc.png"), "auc": auc, "n": len(y)}


def _calibration_chart(ctx: _Context, y: np.ndarray, prob: np.ndarray, bins: int = 10) -> dict[str, Any]:
    from matplotlib.figure import Figure

    which = np.clip((prob * bins).astype(int), 0, bins - 1)
    rows = []
    for b in range(bins):
        sel = which == b
        if sel.any():
            rows.append({"bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}", "n": int(sel.sum()),
                         "mean_prob": float(prob[sel].mean()), "positive_rate": float(y[sel].mean())})
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#aaaaaa", linewidth=1, linestyle="--", label="perfectly calibrated")
    sizes = np.array([r["n"] for r in rows], dtype=float)
    ax.plot([r["mean_prob"] for r in rows], [r["positive_rate"] for r in rows], color=COLORS["pos"], linewidth=1.5)
    ax.scatter([r["mean_prob"] for r in rows], [r["positive_rate"] for r in rows],
               s=20 + 180 * sizes / sizes.max(), color=COLORS["pos"], label="model (dot area = posts)", zorder=3)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("share with label 1")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    return {"chart": _save(ctx, fig, "calibration.png"), "bins": rows}


def _history_chart(ctx: _Context, history: list[Any]) -> str | None:
    """Per-epoch numbers (loss, val metrics) if the history is a list of flat dicts."""
    rows = [h for h in history if isinstance(h, dict)]
    keys = [k for k in ("train_loss", "train_bce", "loss", "val_loss", "val_roc_auc", "val_accuracy")
            if any(_is_number(r.get(k)) for r in rows)]
    if not rows or not keys:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.subplots()
    x = [r.get("epoch", i) for i, r in enumerate(rows)]
    for k in keys:
        ax.plot(x, [r.get(k, np.nan) if _is_number(r.get(k)) else np.nan for r in rows], marker="o", label=k)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, frameon=False)
    return _save(ctx, fig, "history.png")


# ---------------------------------------------------------------------------------- thumbnails


class _Thumbnailer:
    """Square JPEG thumbnails in ``thumbs/``, centred on the largest face where faces/ knows it."""

    def __init__(self, ctx: _Context, shas: list[str]):
        self.ctx, self.images = ctx, ImageStore(ctx.storage)
        self.dir = ctx.out / "thumbs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, str | None] = {}
        self.missing = 0
        self.centres = self._face_centres(shas)

    def _face_centres(self, shas: list[str]) -> dict[str, tuple[float, float]]:
        import pyarrow.compute as pc

        if not list_partitions(self.ctx.storage, "faces"):
            return {}
        try:
            t = read_table(self.ctx.storage, "faces", columns=["sha256", "largest_face_cx", "largest_face_cy"],
                           filter=pc.field("sha256").isin(shas) & pc.field("largest_face_cx").is_valid())
        except Exception:  # noqa: BLE001 - centring is cosmetic; plain centre crops are fine
            log.warning("report: could not read face centres", exc_info=True)
            return {}
        return {r["sha256"]: (r["largest_face_cx"], r["largest_face_cy"]) for r in t.to_pylist()}

    def get(self, sha: str) -> str | None:
        if sha not in self.done:
            self.done[sha] = self._make(sha)
            self.missing += self.done[sha] is None
        return self.done[sha]

    def _make(self, sha: str) -> str | None:
        from PIL import Image, ImageOps

        try:
            data = self.images.get(sha)
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))  # JPEG: decode at reduced scale
                im = ImageOps.exif_transpose(im).convert("RGB")
                centre = self.centres.get(sha, (0.5, 0.5))
                thumb = ImageOps.fit(im, (THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS, centering=centre)
        except (StorageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("report: no thumbnail for image %s: %s", sha, exc)
            return None
        name = f"thumbs/{sha[:20]}.jpg"
        thumb.save(self.ctx.out / name, "JPEG", quality=THUMB_QUALITY, optimize=True)
        return name


# ---------------------------------------------------------------------------------- HTML


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer):
        return f"{int(v):,}"
    if isinstance(v, float | np.floating):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:,.4f}".rstrip("0").rstrip(".") if not v.is_integer() else f"{int(v):,}"
    return str(v)


def _render(ctx: _Context, sections: list[Section], cfg: Config) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE.parent), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.tests["mapping"] = lambda v: isinstance(v, dict)
    env.tests["records"] = lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)
    return env.get_template(TEMPLATE.name).render(
        sections=sections,
        s={sec.id: sec for sec in sections},
        labels_run=ctx.labels_run,
        published=ctx.published_run,
        model_run=ctx.model_run,
        storage_root=ctx.storage.root,
        params_hashes=sorted(ctx.labels["params_hash"].unique()) if ctx.labels is not None else [],
        generated=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )

"""The report's sections: one builder each, from a :class:`ReportContext` to the values its
part of the template shows. A builder raises :class:`NotAvailable` when its input does not
exist yet."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd

from labeling.rank_groups import WIDE_GROUP_WARNING, group_spans
from likerank.report.charts import (
    COLORS,
    MAP_THUMB_PX,
    THUMB_PX,
    Thumbnailer,
    best_crops_chart,
    calibration_chart,
    findings_chart,
    funnel_chart,
    history_chart,
    map_pictures,
    roc_chart,
    save_chart,
    span_chart,
)
from likerank.report.load import (
    NotAvailable,
    ReportContext,
    data_docs,
    expectation_row,
    metric_columns,
    metrics_table,
    validation_results,
)
from likerank.report.photos import (
    labeled_test_examples,
    score_photos,
    search_best_crops,
    tsne_2d,
    with_face,
)
from pipeline.core import keys
from pipeline.core.labels_run import LabelsRunMissing, read_labels_run
from pipeline.core.storage import StorageError
from pipeline.core.tables import get_json

#: Tiles in the best-to-worst continuum (sampled evenly along the order).
CONTINUUM_N = 160

#: Tiles in the top grid (the best of the order) and at most as many in the bottom grid (the
#: worst of the rows the top grid left out, so no photo is in both). With the continuum that
#: is at most 360 thumbnails of THUMB_PX, a few KB each, loaded lazily.
EDGE_N = 100

#: Scatter points drawn (a uniform subsample beyond this) and group boundary lines drawn.
MAX_POINTS = 20_000

MAX_GROUP_LINES = 40

#: Test photos placed on the map (spread evenly along post_id order beyond this): t-SNE and
#: the model's forward pass stay within about a minute on two CPU cores.
MAP_MAX = 600

#: Fewest points t-SNE is run on (fewer make no picture worth reading).
TSNE_MIN = 5

#: Test photos whose best crop is searched (each is one batch of ~60 crops through the model).
BEST_CROPS_N = 6


def funnel_section(ctx: ReportContext) -> dict[str, Any]:
    """Counts per stage, plus the labeler's drop reasons."""
    stages: list[dict[str, Any]] = []

    def scalar(q: str) -> int:
        return int(ctx.sql(q).iloc[0, 0] or 0)

    posts = scalar("select count(distinct (instance, post_id)) from posts")
    per_source = ctx.sql("select source, count(distinct (instance, post_id)) n from posts group by 1 order by 1")
    stages.append({"stage": "posts scraped", "count": posts,
                   "detail": {r.source: int(r.n) for r in per_source.itertuples()}})
    dl = ctx.sql("select status, count(*) n from downloads group by 1 order by 2 desc, 1")
    stages.append({"stage": "downloads attempted", "count": int(dl.n.sum()) if len(dl) else 0,
                   "detail": {r.status: int(r.n) for r in dl.itertuples()}})
    refused = ctx.sql("select opt_out_reason, count(*) n from downloads where opt_out_reason is not null "
                      "group by 1 order by 2 desc, 1")
    stages.append({"stage": "images the host refused (noai, robots.txt, TDM)",
                   "count": int(refused.n.sum()) if len(refused) else 0,
                   "detail": {r.opt_out_reason: int(r.n) for r in refused.itertuples()}})
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
        if "source" in lab:  # groups never mix sources
            detail.update({f"{k} groups": int(v) for k, v in lab.groupby("source")["group_id"].nunique().items()})
        stages.append({"stage": f"label rows (run {ctx.labels_run})", "count": len(lab), "detail": detail})
    else:
        stages.append({"stage": "label rows", "count": 0, "detail": {"not available": ctx.labels_why}})

    chart = None
    if any(s["count"] for s in stages):
        bars = [("posts", posts), ("downloads ok", stages[1]["detail"].get("ok", 0)),
                ("images", stages[3]["count"]),
                ("with >= 1 face", stages[4]["detail"]["1 face"] + stages[4]["detail"]["2+ faces"]),
                ("labeled", len(ctx.labels) if ctx.labels is not None else 0)]
        chart = funnel_chart(ctx, bars)

    summary, summary_why = None, ""
    if ctx.labels_run is None:
        summary_why = ctx.labels_why
    else:
        try:
            summary = read_labels_run(ctx.storage, ctx.labels_run).record
        except LabelsRunMissing as exc:
            summary_why = str(exc)
    return {"stages": stages, "chart": chart, "summary": summary, "summary_why": summary_why}

def distributions_section(ctx: ReportContext) -> dict[str, Any]:
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
    return {"chart": save_chart(ctx, fig, "distributions.png"), "stats": stats}

def scatter_section(ctx: ReportContext) -> dict[str, Any]:
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
    return {"chart": save_chart(ctx, fig, "likes_vs_followers.png"), "n": len(lab), "drawn": len(pts),
            "groups": len(bounds), "lines": len(shown)}

def balance_section(ctx: ReportContext) -> dict[str, Any]:
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
    ax.set_xlabel("group_id (ids run on across sources; within one, a lower id is a higher exposure)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("share label = 1")
    ax.legend(fontsize=8, frameon=False)
    spans = group_exposure_spans(lab)
    return {
        "chart": save_chart(ctx, fig, "label_balance.png"),
        "span_chart": span_chart(ctx, spans, max_group_exposure_ratio(ctx)),
        "wide": [{"group_id": int(i), "source": r.source, "lowest exposure": round(float(r.low), 1),
                  "highest exposure": round(float(r.high), 1), "span": round(float(r.span), 1)}
                 for i, r in spans[spans["span"] > WIDE_GROUP_WARNING].head(50).iterrows()],
        "wide_count": int((spans["span"] > WIDE_GROUP_WARNING).sum()),
        "wide_limit": WIDE_GROUP_WARNING,
        "ok": off.empty,
        "groups": len(g),
        "sizes": sorted({int(x) for x in g["n"]}),
        "share_min": float(g["share"].min()),
        "share_max": float(g["share"].max()),
        "off": [{"group_id": int(i), "n": int(r.n), "positives": int(r.positives), "share": float(r.share)}
                for i, r in off.head(50).iterrows()],
        "off_count": len(off),
    }

def group_exposure_spans(lab: pd.DataFrame) -> pd.DataFrame:
    """Per group of the labels (index ``group_id``): its source, lowest and highest exposure, and
    span (max / min), measured by the labeler's :func:`~labeling.rank_groups.group_spans`, so the
    report and the run's summary and warning agree."""
    codes, names = pd.factorize(lab["source"], sort=True)
    group_id = lab["group_id"].to_numpy(np.int64)
    spans = group_spans(group_id, lab["exposure"].to_numpy(np.float64), codes)
    ids = np.unique(group_id[group_id >= 0])  # ids a dropped wide group left out are absent
    return pd.DataFrame({"source": np.asarray(names)[spans.source[ids]], "low": spans.low[ids],
                         "high": spans.high[ids], "span": spans.ratio[ids]}, index=pd.Index(ids, name="group_id"))


def max_group_exposure_ratio(ctx: ReportContext) -> float | None:
    """``labeling.max_group_exposure_ratio`` the run was labeled with; None when off or unknown."""
    try:
        record = read_labels_run(ctx.storage, ctx.labels_run).record if ctx.labels_run else {}
    except LabelsRunMissing:
        return None
    return ((record.get("params") or {}).get("max_group_exposure_ratio") or None)


def validation_section(ctx: ReportContext) -> dict[str, Any]:
    if ctx.labels_run is None:
        raise NotAvailable(ctx.labels_why)
    prefix = keys.validation_run(ctx.labels_run) + "/"
    stored = ctx.storage.list(prefix)
    if not stored:
        raise NotAvailable(f"nothing under {ctx.storage.uri(prefix)} (the run was not validated yet)")
    results, sources = [], []
    for key in (k for k in stored if k.endswith(".json")):
        with contextlib.suppress(ValueError, StorageError):
            found = list(validation_results(get_json(ctx.storage, key)))
            if found:
                results += found
                sources.append(key)
    docs = data_docs(ctx, [k for k in stored if k.endswith(".html")])
    if not results:
        raise NotAvailable(f"no Great Expectations result JSON under {ctx.storage.uri(prefix)}"
                           + (f" (Data Docs: {docs['uri']})" if docs else ""))
    suites = []
    for res in results:
        rows = [expectation_row(r) for r in res.get("results") or []]
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

def model_section(ctx: ReportContext) -> dict[str, Any]:
    if ctx.metrics is None:
        raise NotAvailable(ctx.model_why)
    m = ctx.metrics
    table, extra = metrics_table(m)
    history = m.get("history") if isinstance(m.get("history"), list) else None
    body: dict[str, Any] = {
        "run": ctx.model_run, "table": table, "columns": metric_columns(table), "extra": extra,
        "labels_run": m.get("labels_run"), "history": history,
        "mismatch": bool(m.get("labels_run") and ctx.labels_run and m.get("labels_run") != ctx.labels_run),
        "predictions_why": ctx.predictions_why, "roc": None, "roc_why": "", "calibration": None,
        "history_chart": None,
    }
    if history:
        body["history_chart"] = history_chart(ctx, history)
    pred = ctx.predictions
    if pred is not None and "label" in pred and pred["label"].notna().any():
        p = pred.dropna(subset=["label", "prob"])
        y, prob = p["label"].to_numpy().astype(int), p["prob"].to_numpy().astype(float)
        if len(np.unique(y)) == 2:
            body["roc"] = roc_chart(ctx, y, prob)
        else:
            body["roc_why"] = "the test predictions hold a single class"
        body["calibration"] = calibration_chart(ctx, y, prob)
        body["n_pred"] = len(p)
    elif pred is not None:
        body["predictions_why"] = "the predictions have no labels to compare with (no post_id match)"
    return body

def contact_sheets_section(ctx: ReportContext) -> dict[str, Any]:
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
    thumbs = Thumbnailer(ctx, rows["image_sha256"].unique().tolist())
    idx = np.unique(np.linspace(0, len(rows) - 1, min(CONTINUUM_N, len(rows))).round().astype(int))
    n_top = min(EDGE_N, len(rows))
    n_bottom = min(EDGE_N, len(rows) - n_top)

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
            "top": tiles(range(n_top)), "bottom": tiles(range(len(rows) - n_bottom, len(rows))),
            "edge_n": EDGE_N, "missing": thumbs.missing, "thumb_px": THUMB_PX}


def map_section(ctx: ReportContext) -> dict[str, Any]:
    test = labeled_test_examples(ctx)
    model = ctx.need_model()
    idx = with_face(test, MAP_MAX)
    if not len(idx):
        raise NotAvailable(f"none of the {len(test):,} test photos has a face box in faces/")
    scored = score_photos(ctx, model, test, idx, MAP_THUMB_PX)
    if len(scored.prob) < TSNE_MIN:
        raise NotAvailable(f"t-SNE needs at least {TSNE_MIN} photos; {len(scored.prob)} test photo(s) "
                           f"could be read and cropped ({scored.unreadable} unreadable)")
    xy, perplexity = tsne_2d(np.stack(scored.features))
    return {"n": len(scored.prob), "test_rows": len(test), "with_face": int(np.isfinite(test.box).all(axis=1).sum()),
            "sampled": len(idx), "unreadable": scored.unreadable, "perplexity": perplexity,
            "run": model.spec.run_id, "features": int(scored.features[0].shape[0]), "map_max": MAP_MAX,
            **map_pictures(ctx, xy, scored.thumbs, scored.label, scored.prob)}


def best_crops_section(ctx: ReportContext) -> dict[str, Any]:
    test = labeled_test_examples(ctx)
    model = ctx.need_model()
    idx = with_face(test, BEST_CROPS_N)
    if not len(idx):
        raise NotAvailable(f"none of the {len(test):,} test photos has a face box in faces/")
    pairs, unreadable = search_best_crops(ctx, model, test, idx)
    if not pairs:
        raise NotAvailable(f"none of the {len(idx)} chosen test photos could be read")
    rows = [{k: v for k, v in p.items() if k not in ("original", "best")} for p in pairs]
    return {"chart": best_crops_chart(ctx, pairs), "pairs": rows, "tried": len(idx), "unreadable": unreadable,
            "run": model.spec.run_id}

def findings_section(ctx: ReportContext) -> dict[str, Any]:
    """Each visual attribute's bins against the label rate (:mod:`likerank.report.findings`)."""
    from likerank.report.findings import ASSOCIATION_NOTE, findings_for_labels, load_truth_qualities

    lab = ctx.need_labels()
    truth, truth_why = None, ""
    if ctx.truth_file:
        try:
            truth = load_truth_qualities(ctx.truth_file)
        except (OSError, ValueError) as exc:  # the findings stand without the truth beside them
            truth_why = str(exc)
    found = findings_for_labels(ctx.storage, lab, labels_run=ctx.labels_run, predictions=ctx.predictions,
                                model_run=ctx.model_run if ctx.predictions is not None else None,
                                truth=truth, truth_name=ctx.truth_file)
    if truth_why:
        found.notes.append(f"no true effects shown: {truth_why}")
    return {"f": found, "chart": findings_chart(ctx, found), "note": ASSOCIATION_NOTE}

#: The page's sections, in order: element id, heading, builder.
SECTIONS: list[tuple[str, str, Callable[[ReportContext], dict[str, Any]]]] = [
    ("funnel", "Funnel", funnel_section),
    ("distributions", "Followers and likes", distributions_section),
    ("likes-vs-followers", "Likes against followers", scatter_section),
    ("label-balance", "Label balance per group", balance_section),
    ("validation", "Validation", validation_section),
    ("model", "Model", model_section),
    ("findings", "What makes a good photo", findings_section),
    ("map", "Map", map_section),
    ("best-crops", "Best crops", best_crops_section),
    ("contact-sheets", "Contact sheets", contact_sheets_section),
]

SECTION_IDS = [sid for sid, _, _ in SECTIONS]

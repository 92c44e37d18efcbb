"""The HTML report: one static folder per labels run, readable offline.

The package, one verb per module: :mod:`~likerank.report.load` reads the inputs,
:mod:`~likerank.report.photos` runs the test photos through the model run,
:mod:`~likerank.report.sections` builds each section, :mod:`~likerank.report.charts` draws,
this module renders ``templates/report.html.j2``; :mod:`~likerank.report.summary` is the
one-screen text summary ``make run`` ends with.

``build_report`` writes ``index.html`` with its charts (PNG, matplotlib's Agg renderer through
``matplotlib.figure.Figure``, so no pyplot state and no display) and downscaled JPEG thumbnails
(``thumbs/``) beside it; nothing is fetched from the network when it is opened. Every folder
a report is written to is recorded in storage (:mod:`pipeline.core.report_files`), so
``likerank forget`` deletes each copy that shows a forgotten person, wherever ``--out`` put it.

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
                       table; a ROC curve and a calibration plot from the run's per-post
                       test predictions (``models/<run>/predictions.parquet``, the
                       ``predictions`` schema)
``findings``           "what makes a good photo": each visual attribute of the labeled photos
                       (face size, position and tilt, faces, brightness, contrast,
                       saturation, black and white, border, sharpness) binned against the
                       label rate and the model's mean probability, with 95 % intervals, a
                       chi-square test per attribute (Holm-corrected) and one sentence each
                       (``likerank/report/findings.py``; ``findings.png``); beside them the
                       planted effect and the true quality per bin where
                       ``training.truth_file`` is set
``map``                the test photos (at most ``MAP_MAX``, spread along post_id order) placed
                       by the model's penultimate-layer features, reduced to 2-D with t-SNE:
                       face thumbnails bordered by label (``map_label.png``) and by predicted
                       probability (``map_prob.png``), each 2400 px square, shown scaled down
                       and linked full size; needs the run's checkpoint
                       (``models/<run>/checkpoint.pt``) and >= 5 readable test photos
``best-crops``         up to 6 test photos: the training-style face crop beside the crop the
                       model scores highest (``scoring.best_crop``), with both probabilities
                       (``best_crops.png`` and a table)
``contact-sheets``     the test split's photos ordered best to worst (by predicted
                       probability, else by label score): a continuum, the top ``EDGE_N``
                       (100; all of them when fewer) and the bottom ``EDGE_N`` of the rest
=====================  =====================================================================

A missing input (no model yet, no validation yet, no posts table) renders as
"not available: <why>" in its section and never stops the rest of the report. A section that
fails on malformed input is logged with its traceback and rendered as an error in place.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from likerank.report.load import NotAvailable, ReportContext, Section, load_context
from likerank.report.sections import SECTIONS
from pipeline.core.config import Config
from pipeline.core.report_files import record_report
from pipeline.core.storage import Storage

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("templates") / "report.html.j2"


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
        from pipeline.core.storage import open_storage

        storage = open_storage(cfg.storage)
    ctx = load_context(storage, labels_run, model_run, out)
    ctx.truth_file = cfg.training.truth_file  # the findings show the planted effects beside the measured
    ctx.out.mkdir(parents=True, exist_ok=True)
    # Only what this module writes is cleared: --out may be a folder holding other things.
    for old in ctx.out.glob("*.png"):
        old.unlink()
    shutil.rmtree(ctx.out / "thumbs", ignore_errors=True)

    sections = [run_section(ctx, sid, title, build) for sid, title, build in SECTIONS]
    if ctx._con is not None:
        ctx._con.close()
    html = _render(ctx, sections, cfg)
    index = ctx.out / "index.html"
    with tempfile.NamedTemporaryFile("w", dir=ctx.out, prefix=".tmp-", suffix=".html", delete=False,
                                     encoding="utf-8") as fh:
        fh.write(html)
    os.replace(fh.name, index)
    if ctx.labels_run is not None:  # where its thumbnails are, so a forget reaches this copy too
        record_report(ctx.storage, ctx.labels_run, ctx.out)
    log.info("report: %s", index)
    return index

def run_section(ctx: ReportContext, sid: str, title: str, build: Callable[[ReportContext], dict[str, Any]]) -> Section:
    try:
        return Section(sid, title, body=build(ctx))
    except NotAvailable as exc:
        return Section(sid, title, na=str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad input must not hide the other sections
        log.exception("report: section %s failed", sid)
        return Section(sid, title, error=f"{type(exc).__name__}: {exc}")

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

def _breakable(name: Any) -> Any:
    """A column name that may wrap after each underscore (``visual_quality_roc_auc`` would
    otherwise set the width of its column), escaped."""
    from markupsafe import Markup, escape

    return Markup("_<wbr>").join(escape(str(name)).split("_"))

def _render(ctx: ReportContext, sections: list[Section], cfg: Config) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE.parent), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["breakable"] = _breakable
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

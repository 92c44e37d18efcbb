"""``models/<run>/MODEL_CARD.md``: what a completed training run learned from, how well, and its limits.

:func:`render_model_card` is pure (dicts in, Markdown out); :func:`write_model_card` gathers its
inputs from storage and the shipped files and writes the card beside ``metrics.json``.

The card is aggregate only: run ids, counts, dates by day, metrics and licenses. It never
names a post, an author (not even by pseudonym) or a local file path.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

import pipeline
from pipeline.core import keys
from pipeline.core.config import Config
from pipeline.core.labels_run import LabelsRunMissing, read_labels_run
from pipeline.core.storage import Storage
from pipeline.core.tables import list_partitions, read_table
from pipeline.core.truth import coverage_line

log = logging.getLogger(__name__)

#: The folder holding the ``pipeline`` package (the repository root in a checkout); card paths are relative to it.
PACKAGE_ROOT = Path(pipeline.__file__).resolve().parents[1]
#: The shipped face detector and the files that state its license.
DETECTOR_DIR = PACKAGE_ROOT / "pipeline" / "faces" / "models"
#: Metrics shown first, in this order; any others follow alphabetically.
METRIC_ORDER = ("n", "accuracy", "roc_auc", "log_loss", "pearson_r", "mae", "rmse", "spearman_r", "unreadable_images")
#: The card's Markdown template.
TEMPLATE = Path(__file__).with_name("templates") / "model_card.md.j2"
IMAGENET_LICENSE = ("ImageNet-pretrained torchvision weights: see torchvision's model documentation; "
                    "the ImageNet data is for non-commercial research")
NO_WEIGHTS = "none (trained from scratch)"


# ---------------------------------------------------------------- formatting


def fmt(value: Any) -> str:
    """A metric for a table cell: floats to 3 decimals, counts as integers, NaN or missing as n/a."""
    if value is None or isinstance(value, bool):
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else "n/a"
    return str(value)


def metric_names(*splits: dict[str, Any]) -> list[str]:
    present = set().union(*(s.keys() for s in splits))
    return [k for k in METRIC_ORDER if k in present] + sorted(present - set(METRIC_ORDER))


def run_ids(metrics: dict[str, Any]) -> list[str]:
    """The labels run id(s) the model was trained on (a string, or a list of them)."""
    runs = metrics.get("labels_run")
    if not runs:
        return []
    return [runs] if isinstance(runs, str) else [str(r) for r in runs]


def weights_used(metrics: dict[str, Any]) -> str:
    """What initialized the backbone, without a local path (only a state-dict file's name)."""
    model = metrics.get("model") or {}
    used = str(model.get("weights") or "none")
    requested = str((metrics.get("config") or {}).get("training", {}).get("weights") or used)
    if used == "imagenet":
        return "ImageNet (torchvision)"
    if used == "none":
        if requested == "imagenet":
            return "none: trained from scratch (ImageNet weights were requested but not available offline)"
        return NO_WEIGHTS
    return f"state-dict file `{Path(used).name}`"


# ---------------------------------------------------------------- the card's values


@dataclass(frozen=True)
class MetricRow:
    """One metric against the val and test splits (unformatted; the template applies ``fmt``)."""

    name: str
    val: Any
    test: Any


@dataclass(frozen=True)
class EpochRow:
    """One epoch of the training history: the training loss and the validation curve (None: not measured)."""

    epoch: Any
    train_loss: Any
    val_log_loss: Any
    val_roc_auc: Any
    val_accuracy: Any


@dataclass(frozen=True)
class SourceRow:
    """One source of the labels run: labeled posts, groups, and the first and last day a post was created."""

    name: str
    labeled: Any
    groups: Any
    first_post: str | None
    last_post: str | None


@dataclass(frozen=True)
class DetectorRef:
    """A face detector the faces were found with, by its id's first 12 hex digits."""

    short_id: str
    shipped: bool
    shipped_as: Any = None  #: the shipped model's file name, when ``shipped``


@dataclass(frozen=True)
class DetectorLicense:
    """A license stated beside the shipped detector."""

    model: str
    license: Any
    path: Any


@dataclass(frozen=True)
class CardContext:
    """Everything the template shows, unformatted: counts and metrics pass through ``fmt`` there (None as n/a)."""

    run_id: Any
    backbone: Any
    norm: Any
    finished_at: Any
    status: Any
    labels_runs: list[str]
    split_rows: list[tuple[str, Any]]
    dates: str
    params_hash: Any
    group_size: Any
    labeler: Any
    detectors: list[DetectorRef]
    weights: str
    epochs: Any
    steps: Any
    global_batch: Any
    image_size: Any
    crop: Any
    code_version: Any
    sources: list[SourceRow]
    has_summary: bool
    metrics: list[MetricRow]
    history: list[EpochRow]
    truth: list[MetricRow] | None
    truth_coverage: str | None
    detector_licenses: list[DetectorLicense]
    other_detectors: list[str]
    weights_license: Any


#: Keys of a split's truth metrics that count rows rather than measure the model.
COVERAGE_KEYS = ("of",)


def truth_coverage(truth: dict[str, Any]) -> str | None:
    """How many posts of each split the truth covered, e.g. "val: truth matched 137 of 137 posts"."""
    parts = [f"{s}: {coverage_line(m['n'], m['of'], 'posts')}"
             for s in ("val", "test") if isinstance(m := truth.get(s), dict) and "of" in m and "n" in m]
    return "; ".join(parts) or None


def metric_rows(by_split: dict[str, Any]) -> list[MetricRow]:
    """The rows of a metrics table: every metric either split has, in :data:`METRIC_ORDER` first."""
    val, test = (by_split.get(s) or {} for s in ("val", "test"))
    return [MetricRow(name, val.get(name), test.get(name)) for name in metric_names(val, test)]


def epoch_rows(history: Any) -> list[EpochRow]:
    """metrics.json's per-epoch history; runs trained before the validation curve have no val_* keys."""
    rows = [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
    return [EpochRow(h.get("epoch"), h.get("train_loss"), h.get("val_log_loss"), h.get("val_roc_auc"),
                     h.get("val_accuracy")) for h in rows]


def split_rows(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """Rows trained on, validated and tested against, for the splits the run reports."""
    rows = metrics.get("rows") or {}
    return [(s, rows[s]) for s in ("train", "val", "test") if s in rows]


def posts_created(sources: dict[str, Any]) -> str:
    """The span of days the labeled posts were created in, or why it is unknown."""
    per_source: dict[str, dict[str, Any]] = sources.get("per_source") or {}
    firsts = [s["first_post"] for s in per_source.values() if s.get("first_post")]
    lasts = [s["last_post"] for s in per_source.values() if s.get("last_post")]
    if firsts and lasts:
        return f"{min(firsts)} to {max(lasts)} (UTC days)"
    return f"unknown: {sources.get('dates_note') or 'no dates were gathered'}"


def shipped_detectors(licenses: dict[str, Any]) -> dict[str, Any]:
    """The shipped detector's model file name by its sha256, from its stated licenses."""
    return {d.get("sha256"): d.get("model") for d in licenses.get("detector") or [] if d.get("sha256")}


def detector_refs(metrics: dict[str, Any], shipped: dict[str, Any]) -> list[DetectorRef]:
    return [DetectorRef(d[:12], True, shipped[d]) if d in shipped else DetectorRef(d[:12], False)
            for d in metrics.get("detector_ids") or []]


def source_rows(summary: dict[str, Any], sources: dict[str, Any]) -> list[SourceRow]:
    """Per source, by name: counts from the labels run's summary, else the rows read; days from the posts."""
    per_source: dict[str, dict[str, Any]] = sources.get("per_source") or {}
    summary_sources: dict[str, dict[str, Any]] = summary.get("sources") or {}
    rows = []
    for name in sorted(set(per_source) | set(summary_sources)):
        s, c = summary_sources.get(name, {}), per_source.get(name, {})
        rows.append(SourceRow(name, s.get("rows_out", c.get("rows")), s.get("groups"),
                              c.get("first_post"), c.get("last_post")))
    return rows


def detector_license_lines(licenses: dict[str, Any]) -> list[DetectorLicense]:
    return [DetectorLicense(d.get("model") or "", d.get("license", "n/a"), d.get("path", "n/a"))
            for d in licenses.get("detector") or []]


def card_context(metrics: dict[str, Any], labels_summary: dict[str, Any] | None, sources: dict[str, Any],
                 licenses: dict[str, Any]) -> CardContext:
    """The template's values from the card's inputs (see :func:`render_model_card`)."""
    summary = labels_summary or {}
    model = metrics.get("model") or {}
    training_cfg = (metrics.get("config") or {}).get("training", {})
    published = metrics.get("labels_published") or {}
    shipped = shipped_detectors(licenses)
    truth = metrics.get("truth")
    return CardContext(
        run_id=metrics.get("run_id", "unknown run"),
        backbone=model.get("backbone", "n/a"),
        norm=model.get("norm", "n/a"),
        finished_at=metrics.get("finished_at", "n/a"),
        status=metrics.get("status", "n/a"),
        labels_runs=run_ids(metrics),
        split_rows=split_rows(metrics),
        dates=posts_created(sources),
        params_hash=summary.get("params_hash") or published.get("params_hash"),
        group_size=summary.get("group_size"),
        labeler=summary.get("labeler") or published.get("labeler"),
        detectors=detector_refs(metrics, shipped),
        weights=weights_used(metrics),
        epochs=metrics.get("epochs"),
        steps=metrics.get("steps"),
        global_batch=metrics.get("global_batch"),
        image_size=training_cfg.get("image_size"),
        crop=training_cfg.get("crop", "n/a"),
        code_version=metrics.get("code_version") or "unknown",
        sources=source_rows(summary, sources),
        has_summary=bool(summary),
        metrics=metric_rows(metrics),
        history=epoch_rows(metrics.get("history")),
        truth=metric_rows({s: {k: v for k, v in (m or {}).items() if k not in COVERAGE_KEYS}
                           for s, m in truth.items()}) if truth else None,
        truth_coverage=truth_coverage(truth) if truth else None,
        detector_licenses=detector_license_lines(licenses),
        other_detectors=[d[:12] for d in metrics.get("detector_ids") or [] if d not in shipped],
        weights_license=licenses.get("weights") or "n/a",
    )


# ---------------------------------------------------------------- the card


@functools.cache
def card_template() -> jinja2.Template:
    """``templates/model_card.md.j2``: Markdown, so no autoescape; a missing value is an error, not a blank."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE.parent), autoescape=False,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    return env.get_template(TEMPLATE.name)


def render_model_card(metrics: dict[str, Any], labels_summary: dict[str, Any] | None, sources: dict[str, Any],
                      licenses: dict[str, Any]) -> str:
    """The card as Markdown.

    ``metrics``: the run's ``metrics.json``. ``labels_summary``: the labels run's ``_summary.json``
    (None when it is missing). ``sources``: ``{"per_source": {name: {"rows", "first_post",
    "last_post"}}, "dates_note": why dates are unknown or ""}`` from the labels partition and the
    posts table (dates as ``YYYY-MM-DD``). ``licenses``: ``{"detector": [{"model", "sha256",
    "license", "path"}], "weights": str}``.
    """
    return card_template().render(c=card_context(metrics, labels_summary, sources, licenses))


# ---------------------------------------------------------------- gathering inputs


def detector_licenses(folder: Path = DETECTOR_DIR) -> list[dict[str, str]]:
    """The licenses stated beside the shipped detector: its README's table rows, and any
    LICENSE / NOTICE / COPYING file (by SPDX id, else its first line). Paths relative to the package root."""
    out: list[dict[str, str]] = []
    if not folder.is_dir():
        return out
    for f in sorted(folder.iterdir()):
        upper = f.name.upper()
        if upper.startswith(("LICENSE", "LICENCE", "NOTICE", "COPYING")) and f.is_file():
            lines = [ln.strip() for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
            spdx = [ln.split(":", 1)[1].strip() for ln in lines if "SPDX-License-Identifier:" in ln]
            out.append({"model": "", "sha256": "", "license": spdx[0] if spdx else (lines[0][:80] if lines else f.name),
                        "path": shown_path(f)})
        elif upper == "README.MD" and f.is_file():
            out += [{**row, "path": shown_path(f)} for row in license_table_rows(f.read_text(errors="replace"))]
    return out


def shown_path(f: Path) -> str:
    """``f`` relative to the package root; a file elsewhere by name only (no local paths in the card)."""
    return f.relative_to(PACKAGE_ROOT).as_posix() if PACKAGE_ROOT in f.parents else f.name


def license_table_rows(markdown: str) -> list[dict[str, str]]:
    """Rows of the first Markdown table that has ``file`` and ``license`` columns: model, sha256, license."""
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    for line in markdown.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            header = None
            continue
        cells = [re.sub(r"[*`]", "", c).strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            if "file" not in header or "license" not in header:
                header = None
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the separator row
        row = dict(zip(header, cells, strict=False))
        rows.append({"model": row.get("file", ""), "sha256": row.get("sha256", ""), "license": row.get("license", "")})
    return rows


def weights_license(metrics: dict[str, Any]) -> str:
    used = str((metrics.get("model") or {}).get("weights") or "none")
    if used == "imagenet":
        return IMAGENET_LICENSE
    if used == "none":
        return NO_WEIGHTS
    return f"state-dict file `{Path(used).name}`: the terms of the model it was trained from"


def labeled_sources(storage: Storage, runs: list[str]) -> dict[str, Any]:
    """Per source: labeled rows and the first and last day a labeled post was created. Reads 2
    label columns and 3 posts columns. (The parameters and group size are the run record's.)"""
    import pyarrow as pa
    import pyarrow.dataset as ds

    out: dict[str, Any] = {"per_source": {}, "dates_note": ""}
    present = set(list_partitions(storage, "labels"))
    runs = [r for r in runs if r in present]
    if not runs:
        out["dates_note"] = "the labels partition is missing"
        return out
    labels = read_table(storage, "labels", partitions=runs,
                        columns=["source", "post_id"])
    per_source = out["per_source"]
    for row in labels.group_by("source").aggregate([("post_id", "count")]).to_pylist():
        per_source[row["source"]] = {"rows": int(row["post_id_count"]), "first_post": None, "last_post": None}
    if not list_partitions(storage, "posts"):
        out["dates_note"] = "this storage has no posts table (labels built from an imported file?)"
        return out
    try:
        posts = read_table(storage, "posts", columns=["source", "post_id", "created_at"],
                           filter=ds.field("post_id").isin(labels["post_id"].unique()))
        # A post id is unique within its source only; a post scraped on several days has several rows.
        keys_ = labels.select(["source", "post_id"]).group_by(["source", "post_id"]).aggregate([])
        posts = posts.join(keys_, ["source", "post_id"], join_type="inner")
        spans = posts.group_by("source").aggregate([("created_at", "min"), ("created_at", "max")])
    except (OSError, ValueError, pa.ArrowException) as e:
        out["dates_note"] = f"the posts table could not be read ({type(e).__name__})"
        return out
    if not spans.num_rows:
        out["dates_note"] = "none of the labeled posts is in the posts table"
    for row in spans.to_pylist():
        # By day: an exact timestamp could single out one post.
        s = per_source.setdefault(row["source"], {"rows": None})
        s["first_post"] = row["created_at_min"].date().isoformat()
        s["last_post"] = row["created_at_max"].date().isoformat()
    return out


def write_model_card(storage: Storage, run_id: str, metrics: dict[str, Any], cfg: Config) -> str:
    """Gather the card's inputs, write ``models/<run_id>/MODEL_CARD.md``, return its key."""
    runs = run_ids(metrics)
    summary = None
    if len(runs) == 1:
        try:
            summary = read_labels_run(storage, runs[0]).record
        except LabelsRunMissing as exc:  # the card says n/a where the record would have spoken
            log.warning("model card of %s: %s", run_id, exc)
    sources = labeled_sources(storage, runs)
    if "config" not in metrics:  # the card reads image size and requested weights from the resolved config
        metrics = {**metrics, "config": cfg.to_dict()}
    licenses = {"detector": detector_licenses(), "weights": weights_license(metrics)}
    key = keys.model_card(run_id)
    storage.put_text(key, render_model_card(metrics, summary, sources, licenses))
    return key

"""``models/<run>/MODEL_CARD.md``: what a completed training run learned from, how well, and its limits.

:func:`render_model_card` is pure (dicts in, Markdown out); :func:`write_model_card` gathers its
inputs from storage and the shipped files and writes the card beside ``metrics.json``.

The card is aggregate only: run ids, counts, dates by day, metrics and licenses. It never
names a post, an author (not even by pseudonym) or a local file path.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pipeline
from pipeline.core import keys
from pipeline.core.config import Config
from pipeline.core.storage import Storage
from pipeline.core.tables import get_json, list_partitions, read_table

#: The folder holding the ``pipeline`` package (the repository root in a checkout); card paths are relative to it.
PACKAGE_ROOT = Path(pipeline.__file__).resolve().parents[1]
#: The shipped face detector and the files that state its license.
DETECTOR_DIR = PACKAGE_ROOT / "pipeline" / "faces" / "models"
#: Metrics shown first, in this order; any others follow alphabetically.
METRIC_ORDER = ("n", "accuracy", "roc_auc", "log_loss", "pearson_r", "mae", "rmse", "spearman_r", "unreadable_images")
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


def metrics_table(by_split: dict[str, Any]) -> list[str]:
    splits = {s: by_split.get(s) or {} for s in ("val", "test")}
    lines = ["| metric | val | test |", "| --- | ---: | ---: |"]
    for name in metric_names(*splits.values()):
        lines.append(f"| {name} | {fmt(splits['val'].get(name))} | {fmt(splits['test'].get(name))} |")
    return lines


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


# ---------------------------------------------------------------- the card


def render_model_card(metrics: dict[str, Any], labels_summary: dict[str, Any] | None, sources: dict[str, Any],
                      licenses: dict[str, Any]) -> str:
    """The card as Markdown.

    ``metrics``: the run's ``metrics.json``. ``labels_summary``: the labels run's ``_summary.json``
    (None when it is missing). ``sources``: ``{"per_source": {name: {"rows", "first_post",
    "last_post"}}, "dates_note": why dates are unknown or ""}`` from the labels partition and the
    posts table (dates as ``YYYY-MM-DD``). ``licenses``: ``{"detector": [{"model", "sha256",
    "license", "path"}], "weights": str}``.
    """
    summary = labels_summary or {}
    model = metrics.get("model") or {}
    training_cfg = (metrics.get("config") or {}).get("training", {})
    per_source: dict[str, dict[str, Any]] = sources.get("per_source") or {}
    summary_sources: dict[str, dict[str, Any]] = summary.get("sources") or {}
    rows = metrics.get("rows") or {}
    runs = run_ids(metrics)
    published = metrics.get("labels_published") or {}
    params_hash = summary.get("params_hash") or published.get("params_hash") or sources.get("params_hash")
    group_size = summary.get("group_size") or sources.get("group_size")

    firsts = [s["first_post"] for s in per_source.values() if s.get("first_post")]
    lasts = [s["last_post"] for s in per_source.values() if s.get("last_post")]
    if firsts and lasts:
        dates = f"{min(firsts)} to {max(lasts)} (UTC days)"
    else:
        dates = f"unknown: {sources.get('dates_note') or 'no dates were gathered'}"

    detector_rows = licenses.get("detector") or []
    shipped = {d.get("sha256"): d.get("model") for d in detector_rows if d.get("sha256")}
    detectors = ", ".join(
        f"`{d[:12]}` ({shipped[d]}, shipped)" if d in shipped else f"`{d[:12]}`"
        for d in metrics.get("detector_ids") or []
    ) or "n/a"

    out = [
        f"# Model card: {metrics.get('run_id', 'unknown run')}",
        "",
        f"A {model.get('backbone', 'n/a')} fine-tuned to predict whether a public photo post's likes rank in "
        f"the upper half of its group of posts with similar follower-normalized exposure (README, "
        f"\"The labeling rule\"). Finished {metrics.get('finished_at', 'n/a')}; status "
        f"{metrics.get('status', 'n/a')}.",
        "",
        "## Trained on",
        "",
        "| | |",
        "| --- | --- |",
        f"| labels run | {', '.join(runs) or 'n/a'} |",
        f"| rows | {', '.join(f'{s} {fmt(rows[s])}' for s in ('train', 'val', 'test') if s in rows) or 'n/a'} "
        "(splits are by author) |",
        f"| posts created | {dates} |",
        f"| labeling parameters | hash `{params_hash or 'n/a'}`, group size {fmt(group_size)}, labeler "
        f"{summary.get('labeler') or published.get('labeler') or 'n/a'} |",
        f"| face detector(s) | {detectors} |",
        f"| backbone | {model.get('backbone', 'n/a')} (normalization: {model.get('norm', 'n/a')}) |",
        f"| initial weights | {weights_used(metrics)} |",
        f"| epochs | {fmt(metrics.get('epochs'))} ({fmt(metrics.get('steps'))} steps, global batch "
        f"{fmt(metrics.get('global_batch'))}) |",
        f"| image size | {fmt(training_cfg.get('image_size'))} px, crop: {training_cfg.get('crop', 'n/a')} |",
        f"| code version | {metrics.get('code_version') or 'unknown'} |",
        "",
    ]
    names = sorted(set(per_source) | set(summary_sources))
    if names:
        out += ["| source | labeled posts | groups | first post | last post |", "| --- | ---: | ---: | --- | --- |"]
        for name in names:
            s, c = summary_sources.get(name, {}), per_source.get(name, {})
            out.append(f"| {name} | {fmt(s.get('rows_out', c.get('rows')))} | {fmt(s.get('groups'))} | "
                       f"{c.get('first_post') or 'unknown'} | {c.get('last_post') or 'unknown'} |")
        if not summary:
            out.append("")
            out.append("Groups per source: n/a (the labels run has no `_summary.json`).")
        out.append("")

    out += ["## Metrics", "", "Against the labels of the held-out splits:", "", *metrics_table(metrics), ""]
    truth = metrics.get("truth")
    if truth:
        out += ["Against the simulator's hidden quality (ROC-AUC: quality above its median is positive):", "",
                *metrics_table(truth), ""]

    out += [
        "## Intended use",
        "",
        "- Research on engagement signals in public photo posts.",
        "- Ranking photos by predicted follower-normalized engagement.",
        "",
        "Out of scope: judging people, rating attractiveness, and any decision about a person.",
        "",
        "## Known biases",
        "",
        "- Engagement is not beauty. Likes follow audiences, time of day, fashion, platform culture and "
        "the hashtag's community; the model learns all of these.",
        "- Follower normalization and the tag correction reduce audience effects but do not remove them.",
        "- The faces skew to whoever posts under the hashtags scraped; other people are under-represented.",
        f"- Labels are relative: upper or lower half within groups of {fmt(group_size)} posts of one source, "
        "not an absolute score, and not comparable across sources.",
        "",
        "## Licenses",
        "",
    ]
    if detector_rows:
        for d in detector_rows:
            model_name = f"`{d['model']}`: " if d.get("model") else ""
            out.append(f"- Face detector: {model_name}{d.get('license', 'n/a')} (stated in `{d.get('path', 'n/a')}`).")
    else:
        out.append("- Face detector: no license file found beside the shipped model; check the detector's own terms.")
    others = [d for d in metrics.get("detector_ids") or [] if d not in shipped]
    if others:
        out.append(f"- Face detector(s) {', '.join(f'`{d[:12]}`' for d in others)}: not the shipped model; their own "
                   "terms apply (insightface's model packs: non-commercial research only).")
    out += [
        f"- Initial weights: {licenses.get('weights') or 'n/a'}.",
        "",
        "## Privacy",
        "",
        "Authors are pseudonymized (keyed hashes) in every table. This card holds aggregates only: "
        "no post ids, handles or author keys.",
        "",
    ]
    return "\n".join(out)


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
    """Per source: labeled rows and the first and last day a labeled post was created; plus the
    parameter hash and group size read from the rows. Reads 4 label columns and 3 posts columns."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    out: dict[str, Any] = {"per_source": {}, "dates_note": ""}
    present = set(list_partitions(storage, "labels"))
    runs = [r for r in runs if r in present]
    if not runs:
        out["dates_note"] = "the labels partition is missing"
        return out
    labels = read_table(storage, "labels", partitions=runs,
                        columns=["source", "post_id", "rank_in_group", "params_hash"])
    per_source = out["per_source"]
    for row in labels.group_by("source").aggregate([("post_id", "count")]).to_pylist():
        per_source[row["source"]] = {"rows": int(row["post_id_count"]), "first_post": None, "last_post": None}
    if labels.num_rows:
        # Every kept group is full, so the largest rank is the group size.
        out["group_size"] = int(pc.max(labels["rank_in_group"]).as_py())
        hashes = sorted(set(labels["params_hash"].unique().to_pylist()))
        out["params_hash"] = ", ".join(hashes)
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
    summary = get_json(storage, keys.labels_summary(runs[0])) if len(runs) == 1 else None
    sources = labeled_sources(storage, runs)
    if "config" not in metrics:  # the card reads image size and requested weights from the resolved config
        metrics = {**metrics, "config": cfg.to_dict()}
    licenses = {"detector": detector_licenses(), "weights": weights_license(metrics)}
    key = keys.model_card(run_id)
    storage.put_text(key, render_model_card(metrics, summary, sources, licenses))
    return key

"""The report's pictures: charts (PNG through matplotlib's Agg renderer, via
``matplotlib.figure.Figure``: no pyplot state, no display) and JPEG thumbnails of the photos."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from labeling.rank_groups import WIDE_GROUP_WARNING
from likerank.report.load import ReportContext, is_number
from pipeline.core.orientation import orientation_of, recorded_orientations, upright
from pipeline.core.storage import ImageStore, StorageError
from pipeline.core.tables import list_partitions, read_table

log = logging.getLogger(__name__)

#: Thumbnail edge, pixels (square crops, JPEG). Karpathy's sheets used ~100 px tiles; 96 px
#: keeps a contact sheet of up to 360 tiles (the continuum and two grids of 100) near 1 MB.
THUMB_PX = 96

THUMB_QUALITY = 80

COLORS = {"neg": "#4c72b0", "pos": "#dd8452", "posts": "#8c8c8c", "labels": "#4c72b0", "line": "#c44e52"}


def save_chart(ctx: ReportContext, fig, name: str) -> str:
    fig.savefig(ctx.out / name, dpi=100, metadata={"Software": None})
    ctx.charts.append(name)
    return name

def funnel_chart(ctx: ReportContext, bars: list[tuple[str, int]]) -> str:
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
    return save_chart(ctx, fig, "funnel.png")

def roc_points(y: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold (ties move together)."""
    order = np.argsort(-prob, kind="mergesort")
    y, prob = y[order], prob[order]
    last = np.r_[np.flatnonzero(np.diff(prob)), len(prob) - 1]  # last index of each tied run
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]

def roc_chart(ctx: ReportContext, y: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
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
    return {"chart": save_chart(ctx, fig, "roc.png"), "auc": auc, "n": len(y)}

def calibration_chart(ctx: ReportContext, y: np.ndarray, prob: np.ndarray, bins: int = 10) -> dict[str, Any]:
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
    return {"chart": save_chart(ctx, fig, "calibration.png"), "bins": rows}

def span_chart(ctx: ReportContext, spans: Any, limit: float | None) -> str | None:
    """Each group's exposure span (max / min, log scale) by group id, a colour per source, with the
    span above which the labeler warns and ``limit`` (``labeling.max_group_exposure_ratio``) if set.
    ``spans``: :func:`likerank.report.sections.group_exposure_spans`."""
    if spans.empty:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 3), layout="constrained")
    ax = fig.subplots()
    for source, part in spans.groupby("source", sort=True):
        ax.plot(part.index, part["span"], "o", markersize=3, label=str(source))
    ax.axhline(WIDE_GROUP_WARNING, color=COLORS["posts"], linestyle="--", linewidth=1,
               label=f"warned above {WIDE_GROUP_WARNING:g}x")
    if limit:
        ax.axhline(limit, color=COLORS["line"], linewidth=1, label=f"max_group_exposure_ratio {limit:g}x")
    ax.set_yscale("log")
    ax.set_xlabel("group_id")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("exposure span (max / min)")
    ax.legend(fontsize=8, frameon=False)
    return save_chart(ctx, fig, "group_exposure.png")


#: The training history's curves, by panel: losses (lower is better), then the validation
#: metrics on a 0-1 scale. ``val_*`` is the validation curve, measured after every epoch.
HISTORY_PANELS = {
    "loss": ("train_loss", "train_bce", "val_log_loss"),
    "validation": ("val_roc_auc", "val_accuracy"),
}


def history_panels(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Panel title -> the curves the history has numbers for; panels without any are left out
    (runs trained before the validation curve have the loss panel only)."""
    panels = {title: [k for k in names if any(is_number(r.get(k)) for r in rows)]
              for title, names in HISTORY_PANELS.items()}
    return {title: names for title, names in panels.items() if names}


def history_chart(ctx: ReportContext, history: list[Any]) -> str | None:
    """Per-epoch losses and the validation curve, if the history is a list of flat dicts."""
    rows = [h for h in history if isinstance(h, dict)]
    panels = history_panels(rows)
    if not panels:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3), layout="constrained")
    x = [r.get("epoch", i) for i, r in enumerate(rows)]
    for ax, (title, names) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels.items(), strict=True):
        for k in names:
            ax.plot(x, [r[k] if is_number(r.get(k)) else np.nan for r in rows], marker="o", label=k)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, frameon=False)
    return save_chart(ctx, fig, "history.png")


class Thumbnailer:
    """Square JPEG thumbnails in ``thumbs/``, centred on the largest face where faces/ knows it."""

    def __init__(self, ctx: ReportContext, shas: list[str]):
        self.ctx, self.images = ctx, ImageStore(ctx.storage)
        self.dir = ctx.out / "thumbs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, str | None] = {}
        self.missing = 0
        self.centres = self._face_centres(shas)
        self.orientations = recorded_orientations(ctx.storage, shas)  # stored bytes carry no EXIF

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
                im = upright(im, orientation_of(im, self.orientations.get(sha))).convert("RGB")
                centre = self.centres.get(sha, (0.5, 0.5))
                thumb = ImageOps.fit(im, (THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS, centering=centre)
        except (StorageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("report: no thumbnail for image %s: %s", sha, exc)
            return None
        name = f"thumbs/{sha[:20]}.jpg"
        thumb.save(self.ctx.out / name, "JPEG", quality=THUMB_QUALITY, optimize=True)
        return name

#: The map's full-size picture: side (pixels; the page shows it scaled down and links to it),
#: thumbnail side, coloured border width, and the strip above the map for title and legend.
MAP_PX = 2400

MAP_THUMB_PX = 40

MAP_BORDER_PX = 3

MAP_HEADER_PX = 150

#: Colormap of the predicted probability (perceptually uniform, readable by the colour-blind).
MAP_CMAP = "viridis"

#: Height (pixels) each crop is drawn at in the best-crops picture.
CROP_PX = 240


def _rgb(color: str) -> tuple[int, int, int]:
    h = color.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)

def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)

def _map_canvas(xy: np.ndarray, thumbs: list[Any], borders: list[tuple[int, int, int]], title: str):
    """A ``MAP_PX`` square white picture with each thumbnail, in its border colour, at its 2-D
    point; one scale for both axes, so distances look as t-SNE made them."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (MAP_PX, MAP_PX), "white")
    draw = ImageDraw.Draw(canvas)
    pad, cell = 12, MAP_THUMB_PX + 2 * MAP_BORDER_PX
    room = np.array([MAP_PX - 2 * pad - cell, MAP_PX - MAP_HEADER_PX - 2 * pad - cell], dtype=float)
    lo, span = xy.min(axis=0), np.ptp(xy, axis=0)
    scale = float(np.min(room / np.where(span > 0, span, 1.0)))
    offset = (room - span * scale) / 2 + np.array([pad, MAP_HEADER_PX + pad])
    for (x, y), thumb, color in zip(xy, thumbs, borders, strict=True):
        left = int(offset[0] + (x - lo[0]) * scale)
        top = int(offset[1] + (lo[1] + span[1] - y) * scale)  # t-SNE's y points up, pixels' down
        draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=color)
        canvas.paste(thumb, (left + MAP_BORDER_PX, top + MAP_BORDER_PX))
    draw.line((0, MAP_HEADER_PX - 1, MAP_PX, MAP_HEADER_PX - 1), fill=(200, 200, 200), width=2)
    draw.text((pad, 14), title, fill=(29, 35, 42), font=_font(44))
    return canvas, draw

def _save_picture(ctx: ReportContext, canvas: Any, name: str) -> str:
    canvas.save(ctx.out / name, "PNG")
    ctx.charts.append(name)
    return name

def map_pictures(ctx: ReportContext, xy: np.ndarray, thumbs: list[Any], labels: list[int],
                 probs: list[float]) -> dict[str, Any]:
    """The map twice: borders by label, and by predicted probability (with a colour bar)."""
    from matplotlib import colormaps

    neg, pos = _rgb(COLORS["neg"]), _rgb(COLORS["pos"])
    n_pos = int(sum(labels))
    canvas, draw = _map_canvas(xy, thumbs, [pos if y else neg for y in labels],
                               f"{len(labels):,} test photos placed by the model's features (t-SNE); border: label")
    x = 12
    for color, text in ((neg, f"label 0 (n={len(labels) - n_pos:,})"), (pos, f"label 1 (n={n_pos:,})")):
        draw.rectangle((x, 80, x + 40, 120), fill=color)
        draw.text((x + 54, 78), text, fill=(29, 35, 42), font=_font(36))
        x += 460
    by_label = _save_picture(ctx, canvas, "map_label.png")

    cmap = colormaps[MAP_CMAP]
    lo, hi = float(min(probs)), float(max(probs))

    def color(p: float) -> tuple[int, int, int]:
        r, g, b, _ = cmap((p - lo) / (hi - lo) if hi > lo else 0.5)  # spread over the range seen
        return int(r * 255), int(g * 255), int(b * 255)

    canvas, draw = _map_canvas(xy, thumbs, [color(p) for p in probs],
                               f"{len(probs):,} test photos placed by the model's features (t-SNE); "
                               "border: predicted probability of label 1")
    bar_left, bar_width = 520, 1000
    draw.text((12, 78), "predicted probability:", fill=(29, 35, 42), font=_font(36))
    for i in range(bar_width):
        draw.line((bar_left + i, 80, bar_left + i, 110), fill=color(lo + (hi - lo) * i / (bar_width - 1)))
    for frac in (0.0, 0.5, 1.0):
        tick = bar_left + frac * (bar_width - 1)
        draw.text((tick, 112), f"{lo + (hi - lo) * frac:.3f}", fill=(29, 35, 42), font=_font(28),
                  anchor={0.0: "la", 0.5: "ma", 1.0: "ra"}[frac])
    by_prob = _save_picture(ctx, canvas, "map_prob.png")
    return {"label_chart": by_label, "prob_chart": by_prob, "px": MAP_PX, "prob_min": lo, "prob_max": hi}

def best_crops_chart(ctx: ReportContext, pairs: list[dict[str, Any]]) -> str:
    """Each photo's training-style crop beside the crop the model likes best, two pairs a row.

    A pair is ``{"original", "best"}`` (PIL images; best None when no grid crop fits) and the
    numbers of :func:`scoring.best_crop.best_crop` (``post_id``, ``label``, ``original_prob``,
    ``best_prob``, ``aspect``).
    """
    return save_chart(ctx, best_crops_figure(pairs), "best_crops.png")

#: Longest post id a best-crops caption prints whole; longer ones keep their ends around "…"
#: (the table under the picture has them in full). A caption is as wide as its crop at most.
CAPTION_ID_CHARS = 24


def _short_id(post_id: str) -> str:
    if len(post_id) <= CAPTION_ID_CHARS:
        return post_id
    half = (CAPTION_ID_CHARS - 1) // 2
    return f"{post_id[:half]}…{post_id[-half:]}"

def best_crops_figure(pairs: list[dict[str, Any]]) -> Any:
    """:func:`best_crops_chart`'s figure: each caption on lines short enough for its crop (the
    post id alone on the first), so none runs past the picture's edge or into its neighbour."""
    from matplotlib.figure import Figure
    from PIL import Image

    def shown(img: Any) -> np.ndarray:
        w, h = img.size
        return np.asarray(img.resize((max(1, round(w * CROP_PX / h)), CROP_PX), Image.Resampling.LANCZOS))

    per_row = 2 if len(pairs) > 1 else 1
    rows = -(-len(pairs) // per_row)
    fig = Figure(figsize=(2 * per_row * CROP_PX / 100 * 1.05, rows * CROP_PX / 100 * 1.35), layout="constrained")
    axes = fig.subplots(rows, 2 * per_row, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, pair in enumerate(pairs):
        r, c = divmod(k, per_row)
        before, after = axes[r][2 * c], axes[r][2 * c + 1]
        before.imshow(shown(pair["original"]))
        before.set_title(f"post {_short_id(str(pair['post_id']))}\nlabel {pair['label']} · original · "
                         f"p {pair['original_prob']:.3f}", fontsize=9)
        if pair["best"] is None:
            after.text(0.5, 0.5, "no grid crop fits\nin the photo", ha="center", va="center", fontsize=9)
            continue
        gain = pair["best_prob"] - pair["original_prob"]
        after.imshow(shown(pair["best"]))
        after.set_title(f"\nbest {pair['aspect']} · p {pair['best_prob']:.3f} ({gain:+.3f})", fontsize=9,
                        color=COLORS["pos"] if gain > 0 else "#1d232a")
    return fig

def findings_chart(ctx: ReportContext, findings: Any) -> str | None:
    """One small panel per attribute, in rank order: the label rate per bin with its Wilson 95 %
    interval, the model's mean predicted probability with its 95 % interval, the overall rate.
    A title ends in * when the attribute is significant, and says "(planted)" when the simulator
    planted it (a truth file was given)."""
    shown = [f for f in findings.attributes if f.bins]
    if not shown:
        return None
    from matplotlib.figure import Figure

    cols = 4
    rows = -(-len(shown) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.7 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, f in zip(axes, shown, strict=False):
        x = np.arange(len(f.bins))
        rate = np.array([b.rate for b in f.bins], dtype=float)
        err = np.array([[b.rate - b.rate_low, b.rate_high - b.rate] for b in f.bins], dtype=float).T
        ax.axhline(f.overall_rate, color="#999999", linewidth=0.8, linestyle="--")
        ax.errorbar(x - 0.08, rate, yerr=err, fmt="o", color=COLORS["pos"], markersize=4, capsize=2,
                    label="label rate")
        with_prob = [i for i, b in enumerate(f.bins) if b.prob is not None]
        if with_prob:
            p = np.array([f.bins[i].prob for i in with_prob], dtype=float)
            lo = np.array([f.bins[i].prob_low if f.bins[i].prob_low is not None else f.bins[i].prob
                           for i in with_prob], dtype=float)
            hi = np.array([f.bins[i].prob_high if f.bins[i].prob_high is not None else f.bins[i].prob
                           for i in with_prob], dtype=float)
            ax.errorbar(np.array(with_prob) + 0.08, p, yerr=[p - lo, hi - p], fmt="s", color=COLORS["neg"],
                        markersize=3.5, capsize=2, label="mean predicted p")
        ax.set_xticks(x, [b.label for b in f.bins], rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.5, len(f.bins) - 0.5)
        ax.set_ylim(0, 1)
        ax.tick_params(axis="y", labelsize=7)
        mark = (" *" if f.significant else "") + (" (planted)" if f.planted not in (None, "not planted") else "")
        ax.set_title(f"{f.rank}. {f.title}{mark}", fontsize=8.5, color="#1d232a" if f.significant else "#6b7480")
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    axes[0].legend(fontsize=7, frameon=False, loc="lower left")
    return save_chart(ctx, fig, "findings.png")

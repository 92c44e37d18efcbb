"""The report's pictures: charts (PNG through matplotlib's Agg renderer, via
``matplotlib.figure.Figure``: no pyplot state, no display) and JPEG thumbnails of the photos."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from pipeline.core.storage import ImageStore, StorageError
from pipeline.core.tables import list_partitions, read_table
from pipeline.report.load import ReportContext, is_number

log = logging.getLogger(__name__)

#: Thumbnail edge, pixels (square crops, JPEG). Karpathy's sheets used ~100 px tiles.
THUMB_PX = 112

THUMB_QUALITY = 82

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

def history_chart(ctx: ReportContext, history: list[Any]) -> str | None:
    """Per-epoch numbers (loss, val metrics) if the history is a list of flat dicts."""
    rows = [h for h in history if isinstance(h, dict)]
    keys = [k for k in ("train_loss", "train_bce", "loss", "val_loss", "val_roc_auc", "val_accuracy")
            if any(is_number(r.get(k)) for r in rows)]
    if not rows or not keys:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.subplots()
    x = [r.get("epoch", i) for i, r in enumerate(rows)]
    for k in keys:
        ax.plot(x, [r.get(k, np.nan) if is_number(r.get(k)) else np.nan for r in rows], marker="o", label=k)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, frameon=False)
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

"""What makes a good photo: each visual attribute of the labeled photos against the label rate.

A. Karpathy's 2015 #selfie post ended with findings ("face about 1/3 of the image, cut off the
forehead, oversaturate, add a border, don't take group shots, don't shoot in low light"). This
module asks the same questions of a labels run, one attribute at a time:

1. **Measure** every labeled photo: read its attributes from the image's newest ok ``faces``
   row (its largest face by box area). The face stage stores them there, measured from the
   pixels it decoded for detection (:mod:`pipeline.faces.photo_attributes`, which also holds
   the measurement's constants), so a run's findings cost one table read, no decoding. Rows
   written before those columns existed read them as null (``pipeline.core.tables`` reads a
   column added to the schema as null on older rows): only for those images, and for images
   with no ok ``faces`` row, the face attributes are computed from the row's boxes and the
   pixel attributes measured from the stored bytes, decoded as the stage decodes them, in
   threads. Either way a value is the number the column holds (float32), so old data and new
   give the same findings.
2. **Bin** each attribute: continuous ones at their quintiles, rounded to two significant
   digits so a bin reads "17–24 %"; counts and yes/no flags by value. A bin with fewer than
   :data:`MIN_BIN_N` photos is merged into its smaller neighbour.
3. **Per bin**: the label rate with its Wilson 95 % interval, the model's mean predicted
   probability (its test predictions) with a normal-approximation 95 % interval, and, given a
   ground-truth file, the mean true quality the bin's photos carry.
4. **Per attribute**: a chi-square test of independence of bin and label (no continuity
   correction), Cramér's V as the effect size (with two label classes it is
   ``sqrt(chi2 / n)``), and the Holm correction over every attribute tested: a finding is
   *significant* when its Holm-adjusted p-value is below :data:`ALPHA`. Attributes are ranked by
   Cramér's V; each gets one sentence naming its best and its worst bin.

The attributes (:data:`ATTRIBUTES`), in display units:

==================  =========================================================================
``face_share``      largest face box height / image height, % (Karpathy's "about 1/3")
``face_y``          largest face centre, % of the image height from the top
``face_x``          largest face centre, % of the image width from the left
``head_tilt``       head roll, degrees: the angle of the line through the two eye landmarks
``n_faces``         faces the detector found
``brightness``      99th percentile of luma (Rec. 601), 0-255, inside any border
``contrast``        standard deviation of luma, 0-255, inside any border
``saturation``      mean HSV saturation, %, of the pixels not near black, inside any border
``black_and_white`` no colour beyond compression noise (99th percentile of max-min channel
                    spread at most :data:`BW_MAX_SPREAD` levels)
``border``          a uniform frame of one colour, at least :data:`BORDER_MIN_PX` px wide at
                    the analysis size on all four sides
``sharpness``       variance of the Laplacian of luma at the analysis size, inside any border
==================  =========================================================================

The simulator plants some of these (``simulator/likes.py``); :data:`PLANTED` says how, for a
report on a simulated world (shown only when a ground-truth file is given).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.storage import ImageStore, Storage, StorageError
from pipeline.core.truth import coverage_line, load_truth, match_id
from pipeline.faces.decode import DecodeError
from pipeline.faces.photo_attributes import (  # noqa: F401 - the measurement's constants, named in this module's docs
    ANALYSIS_PX,
    BORDER_MIN_PX,
    BORDER_TOLERANCE,
    BRIGHTNESS_PERCENTILE,
    BW_MAX_SPREAD,
    SATURATION_MIN_VALUE,
    PixelAttributes,
    border_widths,
    face_geometry,
    measure_bytes,
    pixel_attributes,
)

log = logging.getLogger(__name__)

#: Quantile bins per continuous attribute (before merging small ones).
QUANTILE_BINS = 5

#: Fewest photos in a bin: smaller bins are merged into a neighbour (the chi-square test wants
#: expected counts of at least 5 per cell; 30 also keeps a Wilson interval readable).
MIN_BIN_N = 30

#: Significance threshold on the Holm-adjusted p-value (family: every attribute tested).
ALPHA = 0.05

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


@dataclass(frozen=True)
class Attribute:
    """One visual attribute: how its bins read and how it is binned."""

    name: str
    title: str  # the column header
    kind: str  # "continuous" (quantile bins), "count" (by value, the last open), "flag" (no / yes)
    unit: str = ""  # printed after a bin's numbers
    phrase: str = ""  # "photos {phrase}", with {bin} for the bin's range
    flag_phrases: tuple[str, str] = ("", "")  # kind "flag": photos without / with it
    count_noun: tuple[str, str] = ("", "")  # kind "count": singular, plural
    count_cap: int = 3  # kind "count": values >= cap share the last bin


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("face_share", "face height / image height", "continuous", "%",
              phrase="whose face is {bin} of the image height"),
    Attribute("face_y", "face centre, from the top", "continuous", "%",
              phrase="whose face centre sits {bin} down the image"),
    Attribute("face_x", "face centre, from the left", "continuous", "%",
              phrase="whose face centre sits {bin} across the image"),
    Attribute("head_tilt", "head tilt (roll)", "continuous", "°", phrase="whose head is tilted {bin}"),
    Attribute("n_faces", "faces in the photo", "count", phrase="with {bin}", count_noun=("face", "faces")),
    Attribute("brightness", "brightness (99th-pct luma, 0-255)", "continuous",
              phrase="whose brightness (99th-percentile luma) is {bin} of 255"),
    Attribute("contrast", "contrast (s.d. of luma)", "continuous", phrase="whose contrast (s.d. of luma) is {bin}"),
    Attribute("saturation", "saturation (mean HSV S)", "continuous", "%", phrase="whose mean saturation is {bin}"),
    Attribute("black_and_white", "black and white", "flag",
              flag_phrases=("in colour", "in black and white")),
    Attribute("border", "uniform border", "flag", flag_phrases=("without a border", "with a uniform border")),
    Attribute("sharpness", "sharpness (variance of Laplacian)", "continuous",
              phrase="whose sharpness (variance of the Laplacian) is {bin}"),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)


def planted_effects() -> dict[str, str]:
    """How the simulator's likes model (``simulator/likes.py``) uses each attribute; an attribute
    missing here is not planted. Its constants are read, not copied, so the two cannot drift."""
    from simulator import likes

    return {
        "face_share": f"best at a face {likes.FACE_SHARE_BEST:.0%} of the frame height; "
                      f"{likes.FACE_SIZE_COEF:+g} × ln(share / best)²",
        "n_faces": f"the group photo (3+ faces) {likes.GROUP_EFFECT:+g}",
        "brightness": f"darker is worse: {likes.DARK_COEF:+g} × ln(min(brightness factor, 1))",
        "saturation": f"less saturated is better: {likes.FILTER_COEF:+g} × (1 − min(saturation factor, 1))",
        "black_and_white": f"black and white {likes.FILTER_COEF:+g}",
        "border": f"white border {likes.BORDER_EFFECT:+g}",
    }


# --------------------------------------------------------------------------- measuring

#: Display unit per attribute from its ``faces`` column: the column's name and the factor (the
#: columns hold fractions; the findings read percent).
STORED = {
    "face_share": ("largest_face_height", 100.0),
    "face_x": ("largest_face_cx", 100.0),
    "face_y": ("largest_face_cy", 100.0),
    "head_tilt": ("head_tilt", 1.0),
    "brightness": ("brightness", 1.0),
    "contrast": ("contrast", 1.0),
    "saturation": ("saturation", 100.0),
    "black_and_white": ("black_and_white", 1.0),
    "border": ("border", 1.0),
    "sharpness": ("sharpness", 1.0),
}
_FACE_ATTRS = ("face_share", "face_x", "face_y", "head_tilt")
_PIXEL_ATTRS = tuple(PixelAttributes.__dataclass_fields__)


def _as_stored(value: Any) -> float:
    """A measured value as its ``faces`` column holds it (float32; flags 0 / 1; None as NaN),
    back as a float: a value measured here and one read from the table are the same number."""
    return float("nan") if value is None else float(np.float32(value))


def measure_images(storage: Storage, shas: Sequence[str], workers: int | None = None) -> pd.DataFrame:
    """Pixel attributes of stored images measured from their bytes, in display units, one row
    per sha256 (``error`` says why one has none): for images whose ``faces`` row has no stored
    attributes. Decoded as the face stage decodes (upright by the recorded EXIF orientation,
    fitted to the detector's input size), so the numbers are the ones the stage would store."""
    from pipeline.core.orientation import recorded_orientations

    images = ImageStore(storage)
    unique = list(dict.fromkeys(shas))
    orientations = recorded_orientations(storage, unique) if unique else {}

    def one(sha: str) -> dict[str, Any]:
        try:
            pixels = measure_bytes(images.get(sha), orientation=orientations.get(sha))
        except (DecodeError, StorageError) as exc:
            return {"sha256": sha, "error": str(exc)}
        row = {name: _as_stored(value) * STORED[name][1] for name, value in asdict(pixels).items()}
        return {"sha256": sha, "error": None, **row}

    # Pillow's decoder, cv2 and numpy release the GIL: threads use every core.
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 2)) as pool:
        rows = list(pool.map(one, unique))
    return pd.DataFrame(rows, columns=["sha256", "error", *_PIXEL_ATTRS])


def face_attributes(faces: pd.DataFrame) -> pd.DataFrame:
    """Face attributes, in display units, from ``faces`` rows (one per image: its newest ok
    detection), by sha256: the stored columns where the row has them, else computed from its
    boxes (:func:`~pipeline.faces.photo_attributes.face_geometry`, as the stage stores them).
    NaN without a face."""
    rows = []
    for r in faces.to_dict("records"):
        row: dict[str, Any] = {"sha256": r["sha256"], "n_faces": float(r["n_faces"])}
        boxes = list(r["faces"]) if r.get("faces") is not None else []
        if boxes and r.get("width") and r.get("height"):
            computed: dict[str, Any] | None = None
            for name in _FACE_ATTRS:
                column, factor = STORED[name]
                value = r.get(column)
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    computed = computed or face_geometry(boxes, r["width"], r["height"])
                    value = computed[column]
                row[name] = _as_stored(value) * factor
        rows.append(row)
    return pd.DataFrame(rows, columns=["sha256", "n_faces", *_FACE_ATTRS])


def stored_pixels(faces: pd.DataFrame) -> pd.DataFrame:
    """Pixel attributes, in display units, of the ``faces`` rows that store them, by sha256."""
    have = [c for c in _PIXEL_ATTRS if c in faces]
    if len(have) < len(_PIXEL_ATTRS):
        return pd.DataFrame(columns=["sha256", "error", *_PIXEL_ATTRS])
    rows = faces[faces[list(_PIXEL_ATTRS)].notna().all(axis=1)]
    out = pd.DataFrame({"sha256": rows["sha256"].to_numpy(), "error": None})
    for name in _PIXEL_ATTRS:
        column, factor = STORED[name]
        out[name] = rows[column].astype(np.float32).astype(float).to_numpy() * factor
    return out


#: The ``faces`` columns the findings read.
FACES_COLUMNS = ["sha256", "status", "width", "height", "n_faces", "faces", "detected_at",
                 *dict.fromkeys(c for c, _ in STORED.values())]


def latest_faces(storage: Storage, shas: Sequence[str]) -> pd.DataFrame:
    """The newest ok ``faces`` row of each image (a rerun with another detector adds rows), with
    its attribute columns (null on rows written before they existed)."""
    import pyarrow.compute as pc

    from pipeline.core.tables import list_partitions, read_table

    if not list_partitions(storage, "faces"):
        return pd.DataFrame(columns=FACES_COLUMNS)
    rows = read_table(storage, "faces", columns=FACES_COLUMNS,
                      filter=pc.field("sha256").isin(list(set(shas))) & (pc.field("status") == "ok")).to_pandas()
    return rows.sort_values("detected_at", ascending=False).drop_duplicates("sha256")


def measure_labeled_photos(storage: Storage, labels: pd.DataFrame, workers: int | None = None) -> pd.DataFrame:
    """One row per labeled post: ``post_id``, ``label``, every attribute (NaN where unmeasured:
    no faces row, or the image could not be read) and ``error`` (why the pixels are missing).
    The attributes are read from the images' ``faces`` rows; only the images whose row does not
    store them (written before the columns existed, or no ok row) are decoded and measured."""
    shas = [s for s in labels["image_sha256"].dropna().astype(str) if s]  # "": a bring-your-own row, no image
    rows = latest_faces(storage, shas)
    faces = face_attributes(rows)
    stored = stored_pixels(rows)
    have = set(stored["sha256"])
    todo = [s for s in dict.fromkeys(shas) if s not in have]
    if todo:
        log.info("findings: %d of %d photo(s) have no stored attributes; measuring them from their bytes",
                 len(todo), len(set(shas)))
    measured = measure_images(storage, todo, workers)
    pixels = measured if not len(stored) else stored if not len(measured) else pd.concat([stored, measured])
    out = (labels[["post_id", "image_sha256", "label"]]
           .merge(faces, left_on="image_sha256", right_on="sha256", how="left").drop(columns="sha256")
           .merge(pixels, left_on="image_sha256", right_on="sha256", how="left").drop(columns="sha256"))
    for flag in ("black_and_white", "border"):
        out[flag] = out[flag].astype(float)  # 0 / 1, NaN where unmeasured
    return out


# --------------------------------------------------------------------------- binning


def nice(x: float) -> float:
    """``x`` rounded to two significant digits (bin edges people can read)."""
    if x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.2g}")


def _fmt_edge(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 10 or float(x).is_integer() else f"{x:.2g}"


def bin_edges(attr: Attribute, values: np.ndarray) -> list[float]:
    """The inner edges of the bins of ``values`` (not empty; bin i holds edges[i-1] <= v < edges[i])."""
    if attr.kind == "flag":
        edges = [0.5]
    elif attr.kind == "count":
        edges = [float(k) + 0.5 for k in range(int(values.min()), attr.count_cap)]
    else:
        qs = np.quantile(values, np.linspace(0, 1, QUANTILE_BINS + 1)[1:-1])
        edges = sorted({nice(float(q)) for q in qs})
    return merge_small_bins(list(edges), values)


def merge_small_bins(edges: list[float], values: np.ndarray) -> list[float]:
    """Drop edges until every bin has at least MIN_BIN_N values (or only one bin is left): the
    smallest bin is merged into its smaller neighbour."""
    edges = [e for e in edges if (values < e).any() and (values >= e).any()]  # no empty bins
    while edges:
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
        small = int(np.argmin(counts))
        if counts[small] >= MIN_BIN_N:
            break
        if small == 0:
            edges.pop(0)
        elif small == len(edges):
            edges.pop()
        else:  # merge with the smaller neighbour: remove the edge between them
            edges.pop(small - 1 if counts[small - 1] <= counts[small + 1] else small)
    return edges


def bin_labels(attr: Attribute, edges: list[float], values: np.ndarray) -> list[str]:
    """How each bin reads ("17–24 %", "3+ faces", "with a uniform border")."""
    n = len(edges) + 1
    if attr.kind == "flag":
        if n == 1:
            return [attr.flag_phrases[int(values.max() > 0.5)]]
        return list(attr.flag_phrases)
    if attr.kind == "count":  # values are capped at count_cap: the last bin is open
        bounds = [int(values.min()), *[int(e + 0.5) for e in edges], None]
        out = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if hi is None:
                out.append(f"{lo}+ {attr.count_noun[1]}")
            elif hi - lo == 1:
                out.append(f"{lo} {attr.count_noun[lo != 1]}")
            else:
                out.append(f"{lo}–{hi - 1} {attr.count_noun[1]}")
        return out
    unit = attr.unit if attr.unit in ("%", "°") else (" " + attr.unit if attr.unit else "")
    if n == 1:
        return [f"{_fmt_edge(float(values.min()))}–{_fmt_edge(float(values.max()))}{unit}"]
    out = [f"under {_fmt_edge(edges[0])}{unit}"]
    out += [f"{_fmt_edge(lo)}–{_fmt_edge(hi)}{unit}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    out.append(f"{_fmt_edge(edges[-1])}{unit} or more")
    return out


# --------------------------------------------------------------------------- statistics


def wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson score 95 % interval of a proportion k / n."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def mean_ci(x: np.ndarray) -> tuple[float, float, float]:
    """Mean and its normal-approximation 95 % interval (NaN where fewer than two values)."""
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(np.mean(x))
    if len(x) < 2:
        return m, float("nan"), float("nan")
    half = Z95 * float(np.std(x, ddof=1)) / math.sqrt(len(x))
    return m, m - half, m + half


def holm(p: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down; monotone; NaN stays NaN and is not counted)."""
    p = np.asarray(p, dtype=float)
    ok = np.flatnonzero(np.isfinite(p))
    adjusted = np.full(len(p), np.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


@dataclass
class Bin:
    label: str  # how the bin reads
    low: float | None  # value range [low, high) in display units; None = open
    high: float | None
    n: int
    positives: int
    rate: float
    rate_low: float  # Wilson 95 %
    rate_high: float
    n_pred: int = 0  # labeled posts with a test prediction
    prob: float | None = None  # mean predicted probability, normal 95 % interval
    prob_low: float | None = None
    prob_high: float | None = None
    n_truth: int = 0
    true_quality: float | None = None  # mean true (visual) quality, normal 95 % interval
    true_low: float | None = None
    true_high: float | None = None


@dataclass
class AttributeFinding:
    name: str
    title: str
    n: int  # labeled photos with this attribute measured
    missing: int  # labeled photos without (no face row, unreadable image)
    overall_rate: float  # label rate of those n
    bins: list[Bin]
    chi2: float | None = None
    dof: int | None = None
    p: float | None = None
    p_holm: float | None = None
    cramers_v: float | None = None
    spread: float | None = None  # largest minus smallest bin label rate
    significant: bool = False
    testable: str = ""  # why there is no test ("" when there is one)
    sentence: str = ""
    planted: str | None = None  # the simulator's planted effect (truth given), "not planted"
    true_spread: float | None = None  # largest minus smallest bin mean true quality
    rank: int = 0


#: What a finding is and is not, said under every findings table (report and ``likerank findings``).
ASSOCIATION_NOTE = ("Each attribute is tested on its own: a finding is an association with the label, not a "
                    "cause, and attributes that go together (a larger face is also a sharper one) are found "
                    "together.")


@dataclass
class Findings:
    labels_run: str | None
    model_run: str | None
    n_labeled: int
    overall_rate: float
    alpha: float
    correction: str
    tested: int  # attributes in the Holm family
    attributes: list[AttributeFinding]  # ranked: largest Cramér's V first, untestable last
    truth: str = ""  # where the truth came from ("" = none)
    truth_column: str = ""  # "visual_quality" or "quality"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (NaN as None)."""
        return _jsonable(asdict(self))


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def attribute_finding(attr: Attribute, table: pd.DataFrame, truth_column: str) -> AttributeFinding:
    """Bins, per-bin rates and the chi-square test of one attribute over ``table``'s rows."""
    from scipy.stats import chi2_contingency

    column = table[attr.name] if attr.name in table else pd.Series(np.nan, index=table.index)
    have = table[column.notna()]
    column = column[column.notna()]
    values = column.to_numpy(dtype=float)
    if not len(values):
        return AttributeFinding(name=attr.name, title=attr.title, n=0, missing=len(table), overall_rate=float("nan"),
                                bins=[], testable="not measured on any labeled photo")
    if attr.kind == "count":
        values = np.minimum(values, max(attr.count_cap, values.min()))
    labels = have["label"].to_numpy(dtype=int)
    edges = bin_edges(attr, values)
    which = np.searchsorted(edges, values, side="right")
    names = bin_labels(attr, edges, values)
    bounds = [None, *edges, None]
    prob = have["prob"].to_numpy(dtype=float) if "prob" in have else np.full(len(have), np.nan)
    true = have[truth_column].to_numpy(dtype=float) if truth_column else np.full(len(have), np.nan)
    bins = []
    for b, name in enumerate(names):
        sel = which == b
        n, k = int(sel.sum()), int(labels[sel].sum())
        lo, hi = wilson(k, n)
        p_b = prob[sel][np.isfinite(prob[sel])]
        t_b = true[sel][np.isfinite(true[sel])]
        pm, pl, ph = mean_ci(p_b)
        tm, tl, th = mean_ci(t_b)
        bins.append(Bin(label=name, low=bounds[b], high=bounds[b + 1], n=n, positives=k,
                        rate=k / n if n else float("nan"), rate_low=lo, rate_high=hi,
                        n_pred=len(p_b), prob=_finite(pm), prob_low=_finite(pl), prob_high=_finite(ph),
                        n_truth=len(t_b), true_quality=_finite(tm), true_low=_finite(tl), true_high=_finite(th)))
    f = AttributeFinding(name=attr.name, title=attr.title, n=len(have), missing=len(table) - len(have),
                         overall_rate=float(labels.mean()) if len(labels) else float("nan"), bins=bins)
    rates = [b.rate for b in bins if b.n]
    f.spread = max(rates) - min(rates) if len(rates) > 1 else None
    trues = [b.true_quality for b in bins if b.true_quality is not None]
    f.true_spread = max(trues) - min(trues) if len(trues) > 1 else None
    contingency = np.array([[b.n - b.positives, b.positives] for b in bins])
    if len(have) < 2 * MIN_BIN_N:
        f.testable = f"too few measured photos ({len(have)}; a test needs two bins of {MIN_BIN_N})"
    elif len(bins) < 2:
        f.testable = f"one bin only: every other value has fewer than {MIN_BIN_N} photos"
    elif (contingency.sum(axis=0) == 0).any():
        f.testable = "every measured photo has the same label"
    else:
        chi2, p, dof, _ = chi2_contingency(contingency, correction=False)
        f.chi2, f.p, f.dof = float(chi2), float(p), int(dof)
        f.cramers_v = math.sqrt(chi2 / len(have))  # min(bins, 2 labels) - 1 = 1
    return f


def sentence(attr: Attribute, f: AttributeFinding, alpha: float) -> str:
    """One finding in words: the best and the worst bin against the overall rate, and whether
    the difference holds up."""
    if not f.n:
        return f"{attr.title[:1].upper()}{attr.title[1:]}: not measured on any labeled photo."

    def who(b: Bin) -> str:
        return b.label if attr.kind == "flag" else attr.phrase.format(bin=b.label)

    filled = [b for b in f.bins if b.n]
    best = max(filled, key=lambda b: b.rate)
    worst = min(filled, key=lambda b: b.rate)
    text = f"Photos {who(best)} are positive {best.rate:.0%} of the time (n = {best.n:,})"
    if worst is not best:
        text += f", those {who(worst)} {worst.rate:.0%} (n = {worst.n:,})"
    text += f"; {f.overall_rate:.0%} overall ({f.n:,} photos"
    if f.testable:
        return text + f"; no test: {f.testable})."
    text += f"; Cramér's V {f.cramers_v:.2f}, Holm-adjusted p = {f.p_holm:.2g})"
    if best.prob is not None and worst.prob is not None and worst is not best:
        text += f"; the model's mean probability: {best.prob:.2f} and {worst.prob:.2f}"
    if not f.significant:
        text += f" — not significant at {alpha:g}"
    return text + "."


def compute_findings(table: pd.DataFrame, *, labels_run: str | None = None, model_run: str | None = None,
                     truth: str = "", alpha: float = ALPHA) -> Findings:
    """The ranked findings over ``table`` (:func:`measure_labeled_photos`' rows, optionally with
    ``prob`` and a true-quality column, ``visual_quality`` or ``quality``)."""
    truth_column = next((c for c in ("visual_quality", "quality") if c in table and table[c].notna().any()), "")
    found = [attribute_finding(a, table, truth_column) for a in ATTRIBUTES]
    adjusted = holm([f.p if f.p is not None else float("nan") for f in found])
    planted = planted_effects() if truth_column else {}
    for attr, f, p_adj in zip(ATTRIBUTES, found, adjusted, strict=True):
        f.p_holm = _finite(p_adj)
        f.significant = f.p_holm is not None and f.p_holm < alpha
        f.sentence = sentence(attr, f, alpha)
        if truth_column:
            f.planted = planted.get(attr.name, "not planted")
    ranked = sorted(found, key=lambda f: (f.cramers_v is None, -(f.cramers_v or 0.0), f.name))
    for i, f in enumerate(ranked, 1):
        f.rank = i
    n_lab = len(table)
    return Findings(labels_run=labels_run, model_run=model_run, n_labeled=n_lab,
                    overall_rate=float(table["label"].mean()) if n_lab else float("nan"), alpha=alpha,
                    correction="Holm", tested=sum(f.p is not None for f in found), attributes=ranked,
                    truth=truth, truth_column=truth_column)


# --------------------------------------------------------------------------- one labels run


def load_truth_qualities(path: str | Path) -> pd.DataFrame:
    """``match_id`` and the true quality columns present (``visual_quality``, ``quality``) of a
    ground-truth Parquet or CSV file (``likerank sim truth`` writes the simulator's), read by
    :func:`pipeline.core.truth.load_truth` so that every source's posts meet their truth."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"truth file {path}: does not exist")
    return load_truth(path, columns=("visual_quality", "quality")).drop_duplicates("match_id")


def join_truth(table: pd.DataFrame, truth: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """``table`` (one row a post) with the truth's quality columns beside each post, matched by
    :func:`pipeline.core.truth.match_id`; and how many posts the truth covered."""
    joined = (table.assign(match_id=table["post_id"].astype(str).map(match_id))
              .merge(truth, on="match_id", how="left").drop(columns="match_id"))
    return joined, int(joined["quality"].notna().sum())


def findings_for_labels(storage: Storage, labels: pd.DataFrame, *, labels_run: str | None,
                        predictions: pd.DataFrame | None = None, model_run: str | None = None,
                        truth: pd.DataFrame | None = None, truth_name: str = "",
                        workers: int | None = None) -> Findings:
    """Measure a labels run's photos and compute its findings. ``predictions`` (post_id, prob)
    are the model's test predictions; ``truth`` (:func:`load_truth_qualities`) the true quality
    of each post, read from ``truth_name``."""
    table = measure_labeled_photos(storage, labels, workers)
    notes = []
    errors = table["error"].dropna()
    if len(errors):
        notes.append(f"{len(errors):,} image(s) could not be read, e.g. {errors.iloc[0]}")
    if predictions is not None and len(predictions):
        table = table.merge(predictions[["post_id", "prob"]].drop_duplicates("post_id"), on="post_id", how="left")
        notes.append(f"{int(table['prob'].notna().sum()):,} labeled posts have a test prediction of model run "
                     f"{model_run}")
    if truth is not None:
        table, matched = join_truth(table, truth)
        notes.append(f"{coverage_line(matched, len(table))} in the truth file {truth_name}")
    result = compute_findings(table, labels_run=labels_run, model_run=model_run, truth=truth_name if truth is not None else "")
    result.notes = notes
    return result

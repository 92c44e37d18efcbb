"""Score photos: find the largest face, crop it as training did, and ask the model.

``score_inputs(cfg, inputs, model)`` takes file paths and http(s) URLs and yields one row per
input, in order:

``input``, ``status`` (``ok``, ``unreadable``, ``download_error``, ``decode_error``,
``no_face``), ``error`` (None when ok), ``prob`` (the probability of label 1, i.e. of ranking
in the upper half of its group of 100), ``face_box`` ([x1, y1, x2, y2] in the original
image's pixels), ``face_score``, ``model_run_id`` and ``detector_id``.

URLs are fetched through the scraper's client (SSRF guard, size and time limits, politeness);
files and downloads go through the face stage's decode guards (format, truncation, pixel
count). Faces are found by the configured detector (``faces.min_score``); the crops are
scored in batches of ``batch_size``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from pipeline.core.config import Config
from scoring.model import Model, crop_batch, label_probability

log = logging.getLogger(__name__)

STATUSES = ("ok", "unreadable", "download_error", "decode_error", "no_face")


@dataclass
class ScoreRow:
    input: str
    status: str
    error: str | None = None
    prob: float | None = None
    face_box: list[float] | None = None
    face_score: float | None = None
    model_run_id: str = ""
    detector_id: str = ""
    #: With ``best_crop``: ``{"original_prob", "best": {"box", "aspect", "prob"}, "candidates"}``,
    #: boxes in the original image's pixels (see :mod:`scoring.best_crop`).
    best_crop: dict[str, Any] | None = None
    # The face stage's fitted image (not a column): what the crop is taken from.
    rgb: np.ndarray | None = field(default=None, repr=False, compare=False)
    scale: tuple[float, float] = field(default=(1.0, 1.0), repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        del out["rgb"], out["scale"]
        return out


def read_input(item: str, client: Any, cfg: Config) -> tuple[bytes | None, str, str]:
    """(bytes, status, error) of a path or URL."""
    if item.startswith(("http://", "https://")):
        res = client.fetch(item, max_bytes=cfg.scrape.max_bytes, total_timeout_s=cfg.scrape.total_timeout_s)
        if not res.ok:
            return None, "download_error", f"{item}: {res.status}: {res.error}"
        return res.body, "ok", ""
    path = Path(item)
    try:
        size = path.stat().st_size
        if size > cfg.scrape.max_bytes:
            return None, "unreadable", f"{item}: {size} bytes > scrape.max_bytes {cfg.scrape.max_bytes}"
        return path.read_bytes(), "ok", ""
    except OSError as exc:
        return None, "unreadable", f"{item}: {exc.strerror or exc}"


def find_face(item: str, data: bytes, detector: Any, cfg: Config, row: ScoreRow) -> ScoreRow:
    """Decode ``data`` under the face stage's guards and set the row's largest face (or its status)."""
    from pipeline.faces.decode import DecodeError, decode_fitted

    try:
        img = decode_fitted(data, detector.det_size, max_pixels=cfg.scrape.max_pixels)
    except DecodeError as exc:
        row.status, row.error = "decode_error", f"{item}: {exc}"
        return row
    faces = [f for f in detector.detect_fitted(img) if f.score >= cfg.faces.min_score]
    if not faces:
        row.status, row.error = "no_face", f"{item}: no face scoring >= faces.min_score {cfg.faces.min_score}"
        return row
    face = max(faces, key=lambda f: f.area)
    row.face_box = [round(float(v), 1) for v in (face.x1, face.y1, face.x2, face.y2)]
    row.face_score = round(float(face.score), 4)
    row.rgb, row.scale = img.rgb, (img.sx, img.sy)
    return row


def score_rows(rows: list[ScoreRow], model: Model, *, best_crop: bool = False,
               save_crops_to: Path | None = None) -> None:
    """Score the rows whose face was found (:func:`find_face`), in one batch, in place.
    ``save_crops_to``: a folder to write each best crop into, as a JPEG named after the input."""
    from scoring.best_crop import best_crop as search
    from scoring.best_crop import save_crop

    ready = [r for r in rows if r.status == "ok" and r.rgb is not None]
    if ready:
        boxes = [np.asarray(r.face_box, dtype=np.float32) * np.array([*r.scale, *r.scale], dtype=np.float32)
                 for r in ready]
        logits, _ = model.run(crop_batch([r.rgb for r in ready], boxes, model.spec))
        for r, logit, box in zip(ready, logits, boxes, strict=True):
            r.prob = round(float(label_probability(logit)), 6)
            if best_crop:
                r.best_crop = search(model, r.rgb, box)
                if r.best_crop["best"]:  # back to the original image's pixels
                    sx, sy = r.scale
                    b = r.best_crop["best"]["box"]
                    if save_crops_to is not None:
                        r.best_crop["saved"] = save_crop(r.rgb, b, save_crops_to / crop_file_name(r.input))
                    r.best_crop["best"]["box"] = [round(b[0] / sx), round(b[1] / sy), round(b[2] / sx), round(b[3] / sy)]
    for r in rows:
        r.rgb = None


def crop_file_name(item: str) -> str:
    """``<input's file name without suffix>.best.jpg``; a URL's last path segment, or ``photo``."""
    stem = Path(urlsplit(item).path if "://" in item else item).stem or "photo"
    return f"{stem}.best.jpg"


def score_inputs(cfg: Config, inputs: Iterable[str], model: Model, *,
                 batch_size: int = 32, detector: Any = None, best_crop: bool = False,
                 save_crops_to: Path | None = None) -> Iterator[ScoreRow]:
    """One :class:`ScoreRow` per input, in order (see the module docstring). ``best_crop`` also
    searches the crop of each photo the model likes best (:mod:`scoring.best_crop`)."""
    from pipeline.faces.detector import FaceDetector
    from pipeline.scrape.http import HttpClient

    detector = detector or FaceDetector(cfg.faces)
    pending: list[ScoreRow] = []

    def flush() -> Iterator[ScoreRow]:
        score_rows(pending, model, best_crop=best_crop, save_crops_to=save_crops_to)
        yield from pending
        pending.clear()

    with HttpClient(cfg.scrape) as client:
        for item in inputs:
            row = ScoreRow(input=item, status="ok", model_run_id=model.spec.run_id, detector_id=detector.detector_id)
            data, row.status, error = read_input(item, client, cfg)
            row.error = error or None
            if data is not None:
                find_face(item, data, detector, cfg, row)
            pending.append(row)
            if sum(r.status == "ok" for r in pending) >= batch_size:
                yield from flush()
        yield from flush()

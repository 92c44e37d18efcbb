"""The crop of a photo the model likes best: a grid of square and 4:5 (portrait) crops around
the face, scored in one batch, against the training-style crop of the same photo.

Grid (face side ``s`` = the larger of the face box's width and height; units are pixels of
the image the face box is in):

* sizes: the crop's width is ``s * k`` for ``k`` in :data:`WIDTHS` (a 4:5 crop is 1.25x taller),
  and the largest crop of each shape the photo holds;
* offsets: the crop's centre moves by ``s * d`` horizontally and vertically, ``d`` in
  :data:`OFFSETS`;
* every crop lies inside the photo (a real crop cannot add pixels) and contains the whole
  face; one that cannot is skipped.

The model takes square inputs, so a 4:5 crop is scored as the mean of its two inscribed
squares (top-aligned and bottom-aligned, which together cover every pixel of it): padded with
black bars, as before, it met borders training never showed and could not win; squashed, it
would distort faces. The original is the crop training uses (``training.face_margin`` around
the face).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scoring.model import Model, crop_batch, inputs_from_boxes, label_probability

WIDTHS = (1.2, 1.6, 2.2, 3.0, 4.0)
OFFSETS = (-0.3, 0.0, 0.3)
ASPECTS = {"1:1": 1.0, "4:5": 1.25}  # height / width


@dataclass(frozen=True)
class Crop:
    box: tuple[int, int, int, int]  # left, top, right, bottom
    aspect: str
    prob: float

    def as_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "aspect": self.aspect, "prob": round(self.prob, 6)}


def candidate_boxes(face_box: np.ndarray, width: int, height: int) -> list[tuple[tuple[int, int, int, int], str]]:
    """Every grid crop (box, aspect) inside a ``width`` x ``height`` image that holds the whole face."""
    x1, y1, x2, y2 = (float(v) for v in face_box)
    side = max(x2 - x1, y2 - y1, 1.0)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    out, seen = [], set()
    for aspect, ratio in ASPECTS.items():
        largest = min(width, height / ratio) / side  # the widest crop of this shape the photo holds
        for k in (*WIDTHS, largest):
            w, h = side * min(k, largest), side * min(k, largest) * ratio
            if w < x2 - x1 or h < y2 - y1:
                continue
            for dx in OFFSETS:
                for dy in OFFSETS:
                    left = min(max(cx + dx * side - w / 2, 0.0), width - w)
                    top = min(max(cy + dy * side - h / 2, 0.0), height - h)
                    box = (round(left), round(top), round(left + w), round(top + h))
                    if box in seen or box[0] > x1 or box[1] > y1 or box[2] < x2 or box[3] < y2:
                        continue
                    seen.add(box)
                    out.append((box, aspect))
    return out


def inscribed_squares(box: tuple[int, int, int, int]) -> list[tuple[int, int, int, int]]:
    """The square model inputs a crop is scored by: itself when square, else its top-aligned
    and bottom-aligned squares of its width (a portrait crop's two ends)."""
    left, top, right, bottom = box
    side = right - left
    if bottom - top <= side:
        return [box]
    return [(left, top, right, top + side), (left, bottom - side, right, bottom)]


def save_crop(rgb: np.ndarray, box: list[int] | tuple[int, ...], path: str | Path) -> str:
    """Cut ``box`` (left, top, right, bottom in ``rgb``'s pixels) out and write it as an image,
    its format from ``path``'s suffix; return the path."""
    from PIL import Image

    Image.fromarray(rgb).crop(tuple(int(v) for v in box)).save(path)
    return str(path)


def best_crop(model: Model, rgb: np.ndarray, face_box: np.ndarray) -> dict[str, Any]:
    """The best-scoring grid crop of ``rgb`` (uint8 HxWx3) around ``face_box`` (its pixels), and the
    original crop's score: ``{"original_prob", "best": {"box", "aspect", "prob"}, "candidates"}``."""
    height, width = rgb.shape[:2]
    candidates = candidate_boxes(face_box, width, height)
    original = float(label_probability(model.run(crop_batch([rgb], [face_box], model.spec))[0])[0])
    if not candidates:
        return {"original_prob": round(original, 6), "best": None, "candidates": 0}
    squares = [square for box, _ in candidates for square in inscribed_squares(box)]
    square_probs = label_probability(model.run(inputs_from_boxes([rgb] * len(squares), squares, model.spec))[0])
    probs, at = np.empty(len(candidates)), 0
    for i, (box, _) in enumerate(candidates):
        n = len(inscribed_squares(box))
        probs[i] = float(np.mean(square_probs[at:at + n]))
        at += n
    i = int(np.argmax(probs))
    best = Crop(box=candidates[i][0], aspect=candidates[i][1], prob=float(probs[i]))
    return {"original_prob": round(original, 6), "best": best.as_dict(), "candidates": len(candidates)}

"""A trained model, ready to score face crops: what every model takes and returns, and an
exported ONNX file on onnxruntime (the face stage's runtime). This module and the ones that
score through it import no torch; a registered model on torch is :mod:`scoring.torch_model`.

Both take the same input, built by :func:`crop_batch`: the largest face's square crop
(``training.face_margin`` around the box, as in training), resized to ``training.image_size``
with bilinear filtering, scaled to 0..1 and normalized with ImageNet's mean and std, NCHW
float32. Both return the label logit and the penultimate-layer features per image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.faces.crop import MEAN, STD, face_crop_box

#: Outputs of the exported ONNX graph, in order; a model trained with a score head
#: (``training.score_head``) also has :data:`ONNX_SCORE_OUTPUT` after them.
ONNX_OUTPUTS = ("label_logit", "features")
#: The score head's logit (sigmoid: the predicted within-group rank score, 0..1).
ONNX_SCORE_OUTPUT = "score_logit"


class ModelUnavailable(RuntimeError):
    """No model to score with: none trained yet, an unknown run id, or an unreadable file."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model expects and where it came from (saved beside an exported file)."""

    run_id: str
    backbone: str
    norm: str
    score_head: bool
    image_size: int  # square input, pixels
    face_margin: float  # margin around the face box, as a fraction of its size
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> ModelSpec:
        training = metrics.get("config", {}).get("training", {})
        model = metrics.get("model", {})
        return cls(run_id=metrics["run_id"], backbone=model.get("backbone", training.get("backbone", "resnet18")),
                   norm=model.get("norm", "batch"), score_head=bool(training.get("score_head", True)),
                   image_size=int(training.get("image_size", 224)), face_margin=float(training.get("face_margin", 0.6)))


class Model(Protocol):
    """What scoring needs of a model, on torch or on onnxruntime."""

    spec: ModelSpec

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label logits, penultimate features) of an NCHW float32 batch."""
        ...


def label_probability(logits: np.ndarray) -> np.ndarray:
    """The probability of label 1 from label logits (the sigmoid), float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def crop_batch(rgbs: list[np.ndarray], boxes: list[np.ndarray], spec: ModelSpec) -> np.ndarray:
    """The model input for each (RGB uint8 HxWx3 image, face box in its pixels), cropped as in
    training (a square of ``face_margin`` around the face): NCHW float32."""
    squares = []
    for rgb, box in zip(rgbs, boxes, strict=True):
        squares.append(face_crop_box(np.asarray(box, dtype=np.float32), spec.face_margin, (rgb.shape[1], rgb.shape[0])))
    return inputs_from_boxes(rgbs, squares, spec)


def inputs_from_boxes(rgbs: list[np.ndarray], boxes: list[tuple[int, int, int, int]], spec: ModelSpec) -> np.ndarray:
    """The model input for each (image, crop box (left, top, right, bottom) in its pixels): the
    box cut out (outside the image: black, as in training), a box that is not square centred on
    a black square (its shape kept), resized to ``image_size`` bilinearly, normalized: NCHW float32."""
    from PIL import Image

    size = spec.image_size
    out = np.empty((len(rgbs), 3, size, size), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    for i, (rgb, box) in enumerate(zip(rgbs, boxes, strict=True)):
        left, top, right, bottom = (int(v) for v in box)
        crop = Image.fromarray(rgb).crop((left, top, right, bottom))
        side = max(crop.size)
        if crop.size != (side, side):
            square = Image.new("RGB", (side, side))
            square.paste(crop, ((side - crop.size[0]) // 2, (side - crop.size[1]) // 2))
            crop = square
        crop = crop.resize((size, size), Image.Resampling.BILINEAR)
        out[i] = (np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
    return out


class OnnxModel:
    """An exported model on onnxruntime (``likerank model export --format onnx``)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None):
        import onnxruntime

        path = Path(path)
        spec_file = spec_path(path)
        if not path.is_file():
            raise ModelUnavailable(f"ONNX model {path}: no such file")
        if not spec_file.is_file():
            raise ModelUnavailable(f"ONNX model {path}: {spec_file.name} (its input size and normalisation) is missing")
        raw = json.loads(spec_file.read_text())
        self.spec = ModelSpec(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), providers=providers or onnxruntime.get_available_providers())
        except Exception as exc:  # noqa: BLE001 - name the file and the reason
            raise ModelUnavailable(f"ONNX model {path}: cannot load: {type(exc).__name__}: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logit, features = self.session.run(list(ONNX_OUTPUTS), {self.input_name: batch})
        return logit.astype(np.float32), features.astype(np.float32)


def spec_path(onnx_path: Path) -> Path:
    """The JSON beside an exported model: its input size, normalisation and run id."""
    return onnx_path.with_suffix(".json")

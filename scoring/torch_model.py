"""A registered model on torch: loading it from the model registry, running it, exporting it
to ONNX. The ONNX path (:mod:`scoring.model`) never imports this module, so a scoring fleet
that runs exported models needs no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.storage import Storage
from scoring.model import ONNX_OUTPUTS, ONNX_SCORE_OUTPUT, ModelSpec, ModelUnavailable, spec_path
from training import registry
from training.model import build_model


class TorchModel:
    """A registry model on torch (CPU, or the first GPU when there is one)."""

    def __init__(self, spec: ModelSpec, state_dict: dict[str, Any]):
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # weights "": no initial weights and no log of a random initialization; the checkpoint follows.
        net, _ = build_model(spec.backbone, "", score_head=spec.score_head, norm=spec.norm)
        net.load_state_dict(state_dict)
        self.net = net.eval().to(self.device)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label logits, penultimate features) of an NCHW float32 batch."""
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            features = self.net.backbone(x)
            logit = self.net.label_head(features).squeeze(1)
        return logit.float().cpu().numpy(), features.float().cpu().numpy()



def load_registry_model(storage: Storage, run_id: str | None = None) -> TorchModel:
    """The model of ``run_id``, or the latest registered one (``models/latest.json``)."""
    if run_id is None:
        latest = registry.latest_model(storage)
        if not latest:
            raise ModelUnavailable("no model yet: run `make run` or `make retrain` first, or pass --model RUN_ID")
        run_id = latest["run_id"]
    try:
        metrics = registry.read_metrics(storage, run_id)
    except registry.ModelNotFound as exc:
        raise ModelUnavailable(str(exc)) from None
    if metrics.get("status") != "complete":
        raise ModelUnavailable(f"model run {run_id!r} is not complete (status {metrics.get('status')!r})")
    checkpoint = registry.load_checkpoint(storage, run_id)
    if checkpoint is None:
        raise ModelUnavailable(f"model run {run_id!r}: its checkpoint is missing")
    return TorchModel(ModelSpec.from_metrics(metrics), checkpoint["model"])


def export_onnx(model: TorchModel, path: str | Path, opset: int = 17) -> Path:
    """Write ``model`` as ONNX (dynamic batch axis; outputs :data:`ONNX_OUTPUTS`, and
    :data:`ONNX_SCORE_OUTPUT` when the model has a score head, as ``model.json`` says) and its
    :class:`ModelSpec` beside it as JSON; return the model's path."""
    class Exported(torch.nn.Module):
        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            features = self.net.backbone(x)
            outputs = (self.net.label_head(features).squeeze(1), features)
            if self.net.score_head is not None:
                outputs += (self.net.score_head(features).squeeze(1),)
            return outputs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.spec.image_size
    wrapper = Exported(model.net.to("cpu")).eval()
    tmp = path.with_name(f".tmp-{path.name}")
    # The TorchScript-based exporter: the dynamo one needs onnxscript, a dependency for this alone.
    outputs = [*ONNX_OUTPUTS, *([ONNX_SCORE_OUTPUT] if model.net.score_head is not None else [])]
    torch.onnx.export(wrapper, (torch.zeros(1, 3, size, size),), str(tmp), dynamo=False, opset_version=opset,
                      input_names=["image"], output_names=outputs,
                      dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in outputs}})
    spec_path(path).write_text(json.dumps(asdict(model.spec), indent=2) + "\n")
    tmp.replace(path)
    model.net.to(model.device)
    return path

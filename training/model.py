"""The model: a torchvision backbone with a binary label head and an optional score head.

``build_model`` never downloads: ``pretrained = "imagenet"`` loads torchvision's weights only
if the file is already in torch's hub cache (``$TORCH_HOME/hub/checkpoints``, see
``torch.hub.get_dir()``), a path loads that file, and anything missing falls back to random
initialization with a loud warning; the returned info (saved in metrics.json) says which.

Normalization (``norm``): ``batch`` keeps the backbone's BatchNorm (the default; under DDP on
CUDA ``sync`` converts it to SyncBatchNorm); ``group`` swaps it for GroupNorm(32) and
``frozen`` for FrozenBatchNorm2d. Both make a sample's output independent of the rest of its
batch, so N processes and 1 process on the same global batch train the same model (see
tests/test_train.py); ``group`` cannot use BatchNorm's pretrained statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

BACKBONES = ("resnet18", "resnet50", "vgg16")
NORMS = ("batch", "sync", "group", "frozen")


class LikeRankNet(nn.Module):
    """backbone -> features -> (label logit, score logit or None). Apply sigmoid to both."""

    def __init__(self, backbone: nn.Module, features: int, score_head: bool):
        super().__init__()
        self.backbone = backbone
        self.label_head = nn.Linear(features, 1)
        self.score_head = nn.Linear(features, 1) if score_head else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.backbone(x)
        score = self.score_head(h).squeeze(1) if self.score_head is not None else None
        return self.label_head(h).squeeze(1), score


def _norm_layer(norm: str):
    if norm == "group":
        return lambda channels: nn.GroupNorm(32, channels)
    if norm == "frozen":
        from torchvision.ops import FrozenBatchNorm2d

        return FrozenBatchNorm2d
    return None  # torchvision's default, BatchNorm2d ("sync" is converted after DDP setup)


def _weights_enum(backbone: str):
    from torchvision import models

    return {"resnet18": models.ResNet18_Weights, "resnet50": models.ResNet50_Weights,
            "vgg16": models.VGG16_Weights}[backbone]


def cached_imagenet_file(backbone: str) -> Path | None:
    """The torchvision ImageNet weights for ``backbone`` in the hub cache, if any (newest first)."""
    enum = _weights_enum(backbone)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for w in [enum.DEFAULT, *[w for w in enum if w is not enum.DEFAULT]]:
        f = cache / Path(w.url).name
        if f.is_file():
            return f
    return None


def build_model(backbone: str = "resnet18", pretrained: str = "imagenet", *, score_head: bool = True,
                norm: str = "batch") -> tuple[LikeRankNet, dict[str, Any]]:
    """The model and a record of how it was initialized: {"backbone", "norm", "pretrained"}.

    ``pretrained`` is 'imagenet', 'none' or a path to a state dict (a torchvision backbone's,
    or a likerank checkpoint with a "model" entry). "pretrained" in the record is the file
    actually loaded, or "none".
    """
    from torchvision import models

    if backbone not in BACKBONES:
        raise ValueError(f"training.backbone: unknown {backbone!r} (known: {', '.join(BACKBONES)})")
    if norm not in NORMS:
        raise ValueError(f"norm: unknown {norm!r} (known: {', '.join(NORMS)})")
    kwargs = {}
    if backbone.startswith("resnet") and _norm_layer(norm) is not None:
        kwargs["norm_layer"] = _norm_layer(norm)
    net = getattr(models, backbone)(weights=None, **kwargs)

    source, state, full = "none", None, None
    if pretrained == "imagenet":
        f = cached_imagenet_file(backbone)
        if f is None:
            log.warning("!!! training.pretrained = 'imagenet' but no %s weights are in %s/checkpoints "
                        "(offline: nothing is downloaded); TRAINING FROM RANDOM INIT", backbone, torch.hub.get_dir())
        else:
            source, state = str(f), torch.load(f, map_location="cpu", weights_only=True)
    elif pretrained and pretrained != "none":
        f = Path(pretrained).expanduser()
        if not f.is_file():
            log.warning("!!! training.pretrained = %r: no such file; TRAINING FROM RANDOM INIT", pretrained)
        else:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
            source = str(f)
            if isinstance(loaded, dict) and "model" in loaded:
                full = loaded["model"]  # a likerank checkpoint: backbone and heads
            else:
                state = loaded
    if state is not None:
        missing, unexpected = net.load_state_dict(state, strict=norm in ("batch", "sync"))
        if missing or unexpected:
            log.warning("pretrained %s with norm=%s: %d missing, %d unexpected keys (normalization "
                        "statistics are not transferable)", source, norm, len(missing), len(unexpected))

    if backbone.startswith("resnet"):
        features = net.fc.in_features
        net.fc = nn.Identity()
    else:  # vgg16: drop the last classifier layer, keep the 4096-d features (and its dropout)
        features = net.classifier[-1].in_features
        net.classifier[-1] = nn.Identity()
    model = LikeRankNet(net, features, score_head)
    if full is not None:
        model.load_state_dict(full)
    if source == "none":
        log.warning("model %s: random initialization (pretrained: none)", backbone)
    return model, {"backbone": backbone, "norm": norm, "pretrained": source}

"""The model: a torchvision backbone with a binary label head and an optional score head.

``training.weights`` says how the backbone starts: ``imagenet`` loads torchvision's weights
from torch's hub cache (``$TORCH_HOME/hub/checkpoints``, see ``torch.hub.get_dir()``) or
downloads them there; offline and uncached, the run says so in one line and trains from
scratch. ``none`` trains from scratch; a path loads that state-dict file (a missing file is an
error). The returned info (saved in metrics.json) records what was used.

Normalization (``norm``): ``batch`` keeps the backbone's BatchNorm (the default; under DDP on
CUDA ``sync`` converts it to SyncBatchNorm); ``group`` swaps it for GroupNorm(32) and
``frozen`` for FrozenBatchNorm2d. Both make a sample's output independent of the rest of its
batch, so N processes and 1 process on the same global batch train the same model (see
tests/training/test_train.py); ``group`` cannot use BatchNorm's pretrained statistics.
"""

from __future__ import annotations

import logging
import socket
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


DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation while fetching ImageNet weights


def download_imagenet_file(backbone: str) -> Path | None:
    """torchvision's ImageNet weights for ``backbone``, downloaded into the hub cache; None offline."""
    enum = _weights_enum(backbone)
    f = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.DEFAULT.url).name
    previous = socket.getdefaulttimeout()
    # torch.hub opens the URL without a timeout: a network that drops packets would hang the run.
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(enum.DEFAULT.url, str(f), progress=False)
    except Exception as exc:  # noqa: BLE001 - offline, proxy, disk: any failure means train from scratch
        log.warning("training.weights = 'imagenet': %s is not cached in %s and could not be downloaded "
                    "(%s: %s); training from scratch", f.name, f.parent, type(exc).__name__, exc)
        return None
    finally:
        socket.setdefaulttimeout(previous)
    return f


def build_model(backbone: str = "resnet18", weights: str = "imagenet", *, score_head: bool = True,
                norm: str = "batch") -> tuple[LikeRankNet, dict[str, Any]]:
    """The model and a record of how it was initialized: {"backbone", "norm", "weights", "weights_file"}.

    ``weights`` is 'imagenet', 'none' or a path to a state dict (a torchvision backbone's, or a
    likerank checkpoint with a "model" entry); '' is 'none' for a caller that loads a checkpoint
    next (scoring), so nothing logs a random initialization. In the record, "weights" is what was actually
    used ('none' when ImageNet weights were asked for but could not be had) and "weights_file"
    the file loaded.
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

    used, source, state, full = "none", None, None, None
    if weights == "imagenet":
        f = cached_imagenet_file(backbone) or download_imagenet_file(backbone)
        if f is not None:
            used, source, state = "imagenet", str(f), torch.load(f, map_location="cpu", weights_only=True)
    elif weights and weights != "none":
        f = Path(weights).expanduser()
        if not f.is_file():
            raise ValueError(f"training.weights {weights!r}: no such file (use 'imagenet', 'none' or a state-dict path)")
        loaded = torch.load(f, map_location="cpu", weights_only=True)
        used = source = str(f)
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
    if used == "none" and weights == "none":
        log.info("model %s: random initialization (training.weights = 'none')", backbone)
    return model, {"backbone": backbone, "norm": norm, "weights": used, "weights_file": source}

"""Where a training run's outputs live, and the ``models/latest.json`` pointer.

Layout under the storage root::

    models/<run_id>/checkpoint.pt   torch.save of {"model", "optimizer", "scaler", "epoch", "step", ...}
                                    (rewritten after every epoch; a restart resumes from it)
    models/<run_id>/metrics.json    metrics, per-epoch history, provenance, resolved config
    models/<run_id>/config.toml     the resolved config (secrets blanked)
    models/latest.json              {"run_id", "metrics_key", "checkpoint_key", ...} of the newest
                                    *completed* run; never points at a run still training

Every write is one atomic ``Storage.put_bytes``.
"""

from __future__ import annotations

import io
import math
import re
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.core import keys
from pipeline.core.config import Config, load_config
from pipeline.core.storage import Storage, open_storage
from pipeline.core.tables import get_json, put_json

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ModelNotFound(RuntimeError):
    """A model run's outputs are missing (not trained, still training, or failed)."""


def new_run_id() -> str:
    """A fresh, sortable run id: UTC time plus 6 random hex digits, e.g. 20261123T101500Z-3fa2c1."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def run_id_from(text: str) -> str:
    """A valid run id derived from any text (e.g. an Airflow dag_run id); the same text gives the same id."""
    rid = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:100]
    return check_run_id(rid or new_run_id())


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r}: use 1-100 characters of A-Z a-z 0-9 . _ - (starting alphanumeric)")
    return run_id


def code_version() -> str:
    """``git describe`` of the checkout the code runs from, else the installed package version."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"likerank {version('likerank')}"
    except PackageNotFoundError:
        return "unknown"


def save_checkpoint(storage: Storage, run_id: str, state: dict[str, Any]) -> str:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    key = keys.model_checkpoint(run_id)
    storage.put_bytes(key, buf.getvalue())
    return key


def load_checkpoint(storage: Storage, run_id: str) -> dict[str, Any] | None:
    """The run's last checkpoint, or None if it has none (a fresh run)."""
    import torch

    key = keys.model_checkpoint(run_id)
    if not storage.exists(key):
        return None
    return torch.load(io.BytesIO(storage.get_bytes(key)), map_location="cpu", weights_only=False)


def read_metrics(storage: Storage, run_id: str) -> dict[str, Any]:
    metrics = get_json(storage, keys.model_metrics(run_id))
    if metrics is None:
        raise ModelNotFound(f"model run {run_id!r}: {storage.uri(keys.model_metrics(run_id))} does not exist "
                            "(not trained, still training, or failed)")
    return metrics


def latest_model(storage: Storage) -> dict[str, Any] | None:
    """The ``models/latest.json`` pointer, or None before the first completed run."""
    return get_json(storage, keys.LATEST_MODEL)


def publish_model(storage: Storage, run_id: str) -> dict[str, Any]:
    """Point ``models/latest.json`` at a completed run (idempotent); returns the pointer."""
    metrics = read_metrics(storage, run_id)
    if metrics.get("status") != "complete":
        raise ModelNotFound(f"model run {run_id!r} is not complete (status {metrics.get('status')!r})")
    if not storage.exists(keys.model_checkpoint(run_id)):
        raise ModelNotFound(f"model run {run_id!r}: {storage.uri(keys.model_checkpoint(run_id))} is missing")
    pointer = {
        "run_id": run_id,
        "metrics_key": keys.model_metrics(run_id),
        "checkpoint_key": keys.model_checkpoint(run_id),
        "labels_run": metrics.get("labels_run"),
        "finished_at": metrics.get("finished_at"),
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    put_json(storage, keys.LATEST_MODEL, pointer)
    return pointer


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few numbers worth passing through XCom or printing: small and JSON-safe."""
    out: dict[str, Any] = {"run_id": metrics["run_id"], "labels_run": metrics.get("labels_run"),
                           "steps": metrics.get("steps"), "weights": metrics.get("model", {}).get("weights")}
    for split in ("val", "test"):
        m = metrics.get(split) or {}
        for k in ("accuracy", "roc_auc", "log_loss", "pearson_r"):
            if k in m:
                out[f"{split}_{k}"] = m[k]
    if metrics.get("truth"):
        out["test_truth_roc_auc"] = metrics["truth"].get("test", {}).get("roc_auc")
    # A metric of an empty split is NaN, which JSON (and so Airflow's XCom API) refuses: None.
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}


def evaluate_run(run_id: str, cfg: Config | None = None) -> dict[str, Any]:
    """The completed run's metrics summary (raises :class:`ModelNotFound` if it did not complete)."""
    cfg = cfg or load_config()
    metrics = read_metrics(open_storage(cfg.storage), run_id)
    if metrics.get("status") != "complete":
        raise ModelNotFound(f"model run {run_id!r} did not complete (status {metrics.get('status')!r})")
    return summarize(metrics)


def register_run(run_id: str, cfg: Config | None = None) -> dict[str, Any]:
    """Make ``run_id`` the latest model (training does this on completion; this is the idempotent re-check)."""
    cfg = cfg or load_config()
    return publish_model(open_storage(cfg.storage), run_id)

"""Start a training run: ``torchrun`` here (``local``) or a Kubeflow PyTorchJob (``kubernetes``).

    from training.launch import launch, wait
    job = launch()                     # the published labels, training.backend, a new run id
    wait(job)                          # local: already done; kubernetes: poll the PyTorchJob
    # -> models/<job["run_id"]>/metrics.json, models/latest.json

Both backends run the same ``training.train`` command with ``--labels-run`` and ``--run-id``
fixed at launch, so a restart (torchrun, a Pod restart, an Airflow retry with the same run id)
resumes the same run on the same labels even if a newer labels run is published meanwhile.
The config reaches the processes as ``LIKERANK_STORAGE__*`` / ``LIKERANK_TRAINING__*``
environment variables (the config's own env layer); on Kubernetes the storage credentials
are not in the manifest but come from the ``training.storage_secret`` Secret.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import logging
import os
import re
import shlex
import string
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.core import keys
from pipeline.core.config import Config, load_config
from pipeline.core.published import require_published
from pipeline.core.storage import open_storage
from pipeline.core.tables import get_json
from training import registry

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parents[1] / "infra" / "k8s" / "pytorchjob.yaml.tmpl"
SECRET_FIELDS = ("access_key_id", "secret_access_key")


class TrainingFailed(RuntimeError):
    """The training processes exited non-zero (or the PyTorchJob failed)."""

    def __init__(self, message: str, *, run_id: str, returncode: int | None = None):
        super().__init__(message)
        self.run_id, self.returncode = run_id, returncode


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def config_env(cfg: Config, *, secrets: bool = True) -> dict[str, str]:
    """The [storage] and [training] sections as LIKERANK_<SECTION>__<FIELD> variables."""
    env = {}
    for section in ("storage", "training"):
        for f in dataclasses.fields(getattr(cfg, section)):
            if section == "storage" and f.name in SECRET_FIELDS and not secrets:
                continue
            value = getattr(getattr(cfg, section), f.name)
            if section == "storage" and not value and (f.name in SECRET_FIELDS or not secrets):
                continue  # unset: leave the AWS chain / the pod's Secret (envFrom) in charge
            env[f"LIKERANK_{section.upper()}__{f.name.upper()}"] = _text(value)
    return env


def train_args(labels_run: str, run_id: str, *, truth: str | None = None, config_path: str | None = None,
               extra_args: Sequence[str] = ()) -> list[str]:
    """The arguments of ``training.train`` (after ``-m training.train``)."""
    args = ["--labels-run", labels_run, "--run-id", run_id]
    if config_path:
        args += ["--config", str(config_path)]
    if truth:
        args += ["--truth", str(truth)]
    return args + list(extra_args)


def local_command(nproc: int, args: Sequence[str]) -> list[str]:
    """``torchrun --standalone`` with this interpreter (``python -m torch.distributed.run`` is torchrun)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "training.train", *args]


def run_local(cfg: Config, args: Sequence[str], *, run_id: str,
              echo: Callable[[str], None] = print) -> None:
    """Run torchrun to completion, streaming its output; raise :class:`TrainingFailed` on failure."""
    cmd = local_command(cfg.training.nproc, args)
    env = {**os.environ, **config_env(cfg), "PYTHONUNBUFFERED": "1"}
    log.info("launching: %s", shlex.join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            echo(line)
        rc = proc.wait()
    if rc != 0:
        raise TrainingFailed(f"training run {run_id} failed: torchrun exited {rc}; last output:\n" + "\n".join(tail),
                             run_id=run_id, returncode=rc)


# --------------------------------------------------------------------------- kubernetes


def job_name(run_id: str) -> str:
    """A DNS-1123 name for the PyTorchJob (lower case, at most 63 characters)."""
    return ("likerank-train-" + re.sub(r"[^a-z0-9-]+", "-", run_id.lower()))[:63].rstrip("-")


def _label_value(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63].strip("-._") or "none"


def render_pytorchjob(cfg: Config, *, labels_run: str, run_id: str, truth: str | None = None,
                      extra_args: Sequence[str] = (), template: Path | None = None) -> dict[str, Any]:
    """The PyTorchJob manifest (a dict) for one run, from ``infra/k8s/pytorchjob.yaml.tmpl``."""
    import yaml

    tc = cfg.training
    nproc = tc.gpus_per_replica or tc.nproc  # one process per GPU; CPU pods run training.nproc
    torchrun = [
        "python", "-m", "torch.distributed.run",
        '--nnodes="${PET_NNODES:-${WORLD_SIZE:-1}}"',
        '--node_rank="${PET_NODE_RANK:-${RANK:-0}}"',
        f"--nproc_per_node={nproc}",
        '--master_addr="${PET_MASTER_ADDR:-${MASTER_ADDR:-localhost}}"',
        '--master_port="${PET_MASTER_PORT:-${MASTER_PORT:-29500}}"',
        "-m", "training.train",
    ]
    # The operator's variables are expanded by the shell; everything else is quoted literally.
    shell = "exec " + " ".join(torchrun) + " " + shlex.join(train_args(labels_run, run_id, truth=truth,
                                                                          extra_args=extra_args))
    env = [{"name": k, "value": v} for k, v in sorted(config_env(cfg, secrets=False).items())]
    env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
    labels = {"app.kubernetes.io/name": "likerank-train", "likerank/run-id": _label_value(run_id),
              "likerank/labels-run": _label_value(labels_run)}
    values = {
        "name": job_name(run_id),
        "namespace": tc.namespace,
        "labels": labels,
        "nproc_per_node": str(nproc),  # the operator's field is a string ("auto", "cpu", "gpu" or a number)
        "backoff_limit": 3,
        "image": tc.image,
        "command": ["sh", "-c", shell],
        "env": env,
        "storage_secret": tc.storage_secret,
        "limits": {"nvidia.com/gpu": tc.gpus_per_replica} if tc.gpus_per_replica else {},
        "workers": tc.replicas - 1,
    }
    text = string.Template((template or TEMPLATE).read_text()).substitute(
        {k: json.dumps(v) for k, v in values.items()})
    manifest = yaml.safe_load(text)
    specs = manifest["spec"]["pytorchReplicaSpecs"]
    if tc.replicas > 1:
        specs["Worker"]["template"] = copy.deepcopy(specs["Master"]["template"])
    else:
        del specs["Worker"]
    return manifest


def custom_objects_api() -> Any:
    """A Kubernetes CustomObjectsApi: the in-cluster service account, else the local kubeconfig."""
    from kubernetes import client
    from kubernetes import config as kube_config

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    return client.CustomObjectsApi()


def apply_pytorchjob(manifest: dict[str, Any], *, api: Any = None) -> dict[str, Any]:
    """Create the PyTorchJob (an existing one with the same name counts as launched)."""
    from kubernetes import client

    api = custom_objects_api() if api is None else api
    ns = manifest["metadata"]["namespace"]
    try:
        return api.create_namespaced_custom_object(group="kubeflow.org", version="v1", namespace=ns,
                                                   plural="pytorchjobs", body=manifest)
    except client.ApiException as exc:
        if exc.status == 409:  # a retried launch of the same run id: the job is already there
            log.info("PyTorchJob %s/%s already exists; not recreating it", ns, manifest["metadata"]["name"])
            return manifest
        raise


def job_state(name: str, namespace: str, *, api: Any = None) -> str:
    """'Succeeded', 'Failed', or the newest condition type (e.g. 'Running', 'Created')."""
    api = custom_objects_api() if api is None else api
    obj = api.get_namespaced_custom_object(group="kubeflow.org", version="v1", namespace=namespace,
                                           plural="pytorchjobs", name=name)
    conditions = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    for final in ("Succeeded", "Failed"):
        if any(c.get("type") == final for c in conditions):
            return final
    return conditions[-1]["type"] if conditions else "Pending"


# --------------------------------------------------------------------------- entry points


def launch(cfg: Config | None = None, *, labels_run: str | None = None, run_id: str | None = None,
           run_tag: str | None = None, backend: str | None = None, truth: str | None = None, dry_run: bool = False,
           config_path: str | None = None, extra_args: Sequence[str] = (),
           echo: Callable[[str], None] = print, api: Any = None) -> dict[str, Any]:
    """Launch training on the published labels; returns a small, JSON-safe job description.

    ``local`` blocks until torchrun exits and raises :class:`TrainingFailed` if it fails;
    ``kubernetes`` returns once the PyTorchJob is created (``wait`` polls it). ``dry_run``
    prints the command or manifest and launches nothing. Refuses (``LabelsNotPublished``)
    when no labels run is published or ``labels_run`` is not the published one.

    The run id is ``run_id``, else one derived from ``run_tag`` (e.g. an Airflow dag_run id:
    the same tag gives the same id, so a retried task resumes the run), else a new one.
    """
    cfg = cfg or load_config(config_path)
    backend = backend or cfg.training.backend
    truth = truth or cfg.training.truth_file or None
    storage = open_storage(cfg.storage)
    if run_id:
        run_id = registry.check_run_id(run_id)
    else:
        run_id = registry.run_id_from(run_tag) if run_tag else registry.new_run_id()
    started = get_json(storage, keys.model_metrics(run_id)) or {}
    if started.get("status") == "running" and (not labels_run or labels_run == started["labels_run"]):
        # Resuming (e.g. an Airflow retry): the labels this run started on were published then.
        labels_run = started["labels_run"]
        log.info("run %s has a checkpoint on labels run %s: resuming it", run_id, labels_run)
    else:
        labels_run = require_published(storage, labels_run)["run_id"]
    job: dict[str, Any] = {"run_id": run_id, "labels_run": labels_run, "backend": backend,
                           "metrics_key": keys.model_metrics(run_id)}
    if backend == "local":
        args = train_args(labels_run, run_id, truth=truth, config_path=config_path, extra_args=extra_args)
        if dry_run:
            echo(shlex.join(local_command(cfg.training.nproc, args)))
            return job
        run_local(cfg, args, run_id=run_id, echo=echo)
        return job
    if backend == "kubernetes":
        import yaml

        manifest = render_pytorchjob(cfg, labels_run=labels_run, run_id=run_id, truth=truth, extra_args=extra_args)
        job.update(job_name=manifest["metadata"]["name"], namespace=manifest["metadata"]["namespace"])
        if dry_run:
            echo(yaml.safe_dump(manifest, sort_keys=False))
            return job
        apply_pytorchjob(manifest, api=api)
        return job
    raise ValueError(f"training.backend: unknown {backend!r} (known: local, kubernetes)")


def wait(job: dict[str, Any], cfg: Config | None = None, *, timeout_s: float = 7 * 24 * 3600,
         poll_s: float = 30.0, api: Any = None) -> dict[str, Any]:
    """Until the run has finished; returns ``job``. Raises TrainingFailed if it failed."""
    if job["backend"] == "kubernetes":
        deadline = time.monotonic() + timeout_s
        while (state := job_state(job["job_name"], job["namespace"], api=api)) not in ("Succeeded", "Failed"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"PyTorchJob {job['namespace']}/{job['job_name']} still {state} after {timeout_s} s")
            time.sleep(poll_s)
        if state == "Failed":
            raise TrainingFailed(f"PyTorchJob {job['namespace']}/{job['job_name']} failed "
                                 f"(kubectl -n {job['namespace']} logs -l likerank/run-id={_label_value(job['run_id'])})",
                                 run_id=job["run_id"])
    cfg = cfg or load_config()
    metrics = registry.read_metrics(open_storage(cfg.storage), job["run_id"])
    if metrics.get("status") != "complete":
        raise TrainingFailed(f"training run {job['run_id']} ended without completing "
                             f"(metrics status {metrics.get('status')!r})", run_id=job["run_id"])
    return job


def train_on_published(cfg: Config | None = None, *, truth: str | None = None, run_id: str | None = None,
                       echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Launch on the published labels, wait, and return the metrics summary (one call for orchestrators).

    The summary has ``run_id``, ``labels_run``, ``steps``, ``val_*``/``test_*`` metrics and
    ``metrics_key`` (``models/<run_id>/metrics.json`` under the storage root); on success
    ``models/latest.json`` points at the run.
    """
    cfg = cfg or load_config()
    job = launch(cfg, run_id=run_id, truth=truth, echo=echo)
    wait(job, cfg)
    return {**registry.evaluate_run(job["run_id"], cfg), "metrics_key": job["metrics_key"]}

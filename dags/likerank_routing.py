"""Where the heavy tasks run: queue, pool and Kubernetes pod override, from the config.

Read when a DAG file is parsed (TOML and environment only, no heavy imports), so the values
a deployment sets (``LIKERANK_FACES__QUEUE``, ``LIKERANK_TRAINING__QUEUE``,
``LIKERANK_FACES__KUBERNETES_GPUS``) must reach the DAG processor as well as the workers.
Executors that know no queues (Local, the standalone demo) ignore them.
"""

from __future__ import annotations

from typing import Any


def detect_routing() -> dict[str, Any]:
    """``@task`` arguments of the face-detection shards: ``faces.queue``, ``faces.pool``, and a
    ``pod_override`` asking for ``faces.kubernetes_gpus`` GPUs under the Kubernetes executor."""
    from pipeline.core.config import load_config

    faces = load_config().faces
    routing: dict[str, Any] = {key: value for key, value in (("queue", faces.queue), ("pool", faces.pool)) if value}
    if faces.kubernetes_gpus:
        routing["executor_config"] = {"pod_override": gpu_pod(faces.kubernetes_gpus)}
    return routing


def train_routing() -> dict[str, Any]:
    """``@task`` arguments of the training launch: ``training.queue``."""
    from pipeline.core.config import load_config

    queue = load_config().training.queue
    return {"queue": queue} if queue else {}


def gpu_pod(gpus: int):
    """A pod override for the task container (named ``base`` by the Kubernetes executor) that
    requests ``gpus`` NVIDIA GPUs and tolerates the taint GPU node pools usually carry."""
    from kubernetes.client import models as k8s

    limits = {"nvidia.com/gpu": str(gpus)}
    return k8s.V1Pod(spec=k8s.V1PodSpec(
        containers=[k8s.V1Container(name="base", resources=k8s.V1ResourceRequirements(limits=limits, requests=limits))],
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
    ))

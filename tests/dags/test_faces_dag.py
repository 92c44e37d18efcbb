"""The detect_faces DAG's wiring (tests/dags/test_airflow_integrity.py covers import, owner, docs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


def load_dag(monkeypatch, **env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(DAGS))  # what Airflow does for the DAGs folder
    spec = importlib.util.spec_from_file_location("detect_faces_dag_under_test", DAGS / "detect_faces.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.pop("detect_faces_dag_under_test", None)
    from airflow.sdk import DAG

    (dag,) = [v for v in vars(module).values() if isinstance(v, DAG)] or [module.detect_faces()]
    return dag


@pytest.fixture
def dag(monkeypatch):
    pytest.importorskip("airflow")
    return load_dag(monkeypatch)


def test_scheduled_on_images_maps_detection_and_emits_faces(dag):
    from likerank_assets import FACES, IMAGES

    assert dag.dag_id == "detect_faces"
    assert [a.name for a in dag.timetable.asset_condition.objects] == [IMAGES.name]
    plan, detect, summarize = (dag.get_task(t) for t in ("plan", "detect", "summarize"))
    assert detect.upstream_task_ids == {"plan"} and summarize.upstream_task_ids == {"detect"}
    assert type(detect).__name__.endswith("MappedOperator")  # .expand over shards
    assert FACES in summarize.outlets
    assert all(t.owner == "likerank-data" and t.retries >= 1 for t in dag.tasks)


def test_detection_routes_to_the_configured_queue_and_pool(monkeypatch):
    pytest.importorskip("airflow")
    dag = load_dag(monkeypatch, LIKERANK_FACES__QUEUE="gpu", LIKERANK_FACES__POOL="gpu_pool")
    detect = dag.get_task("detect")
    assert detect.queue == "gpu" and detect.pool == "gpu_pool"
    assert dag.get_task("plan").queue != "gpu"


def test_by_default_shards_go_to_the_gpu_queue_and_everything_else_to_default(dag):
    assert dag.get_task("detect").queue == "gpu"
    assert {dag.get_task(t).queue for t in ("plan", "summarize")} == {"default"}
    assert not dag.get_task("detect").executor_config  # no pod override unless asked


def test_kubernetes_gpus_puts_a_gpu_request_on_the_shard_pods(monkeypatch):
    pytest.importorskip("airflow")
    dag = load_dag(monkeypatch, LIKERANK_FACES__KUBERNETES_GPUS="2")
    pod = dag.get_task("detect").executor_config["pod_override"]
    (container,) = pod.spec.containers
    assert container.name == "base"  # the Kubernetes executor's task container
    assert container.resources.limits == {"nvidia.com/gpu": "2"}
    assert not dag.get_task("plan").executor_config

"""The launcher: the rendered Kubeflow PyTorchJob, applying it, the local command, dry runs."""

from __future__ import annotations

import shlex

import pytest
import yaml

from pipeline.core.config import load_config
from pipeline.core.published import LabelsNotPublished
from pipeline.core.storage import LocalStorage
from tests.training.test_train_data import LABELS_RUN, make_labels_run
from training import launch as L


@pytest.fixture
def published(tmp_path):
    make_labels_run(LocalStorage(tmp_path / "data"), n={"train": 4, "val": 2, "test": 2})
    return tmp_path


def k8s_cfg(root, *extra):
    return load_config(overrides=[
        f"storage.root={root / 'data'}", "storage.endpoint_url=http://minio.storage:9000",
        "storage.access_key_id=AKIA-SHOULD-NOT-LEAK", "storage.secret_access_key=SECRET-SHOULD-NOT-LEAK",
        "training.backend=kubernetes", "training.image=registry.example/likerank:1.2", "training.namespace=ml",
        "training.storage_secret=s3-creds", *extra,
    ])


def render(cfg, run_id="20261123T101500Z-abc123"):
    return L.render_pytorchjob(cfg, labels_run=LABELS_RUN, run_id=run_id)


@pytest.mark.parametrize("replicas, gpus, workers, nproc", [(1, 1, None, "1"), (2, 1, 1, "1"), (4, 8, 3, "8"), (3, 0, 2, "2")])
def test_pytorchjob_manifest(published, replicas, gpus, workers, nproc):
    cfg = k8s_cfg(published, f"training.replicas={replicas}", f"training.gpus_per_replica={gpus}", "training.nproc=2")
    m = render(cfg)
    assert m["apiVersion"] == "kubeflow.org/v1" and m["kind"] == "PyTorchJob"
    assert m["metadata"]["name"] == "likerank-train-20261123t101500z-abc123"
    assert m["metadata"]["namespace"] == "ml" and m["metadata"]["labels"]["likerank/labels-run"] == LABELS_RUN
    assert m["spec"]["nprocPerNode"] == nproc
    specs = m["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    assert (specs["Worker"]["replicas"] if "Worker" in specs else None) == workers
    for spec in specs.values():
        (c,) = spec["template"]["spec"]["containers"]
        assert c["name"] == "pytorch" and c["image"] == "registry.example/likerank:1.2"
        assert spec["restartPolicy"] == "OnFailure"
        assert c.get("resources", {}).get("limits", {}) == ({"nvidia.com/gpu": gpus} if gpus else {})
        assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["LIKERANK_STORAGE__ENDPOINT_URL"] == "http://minio.storage:9000"
        assert env["LIKERANK_TRAINING__BACKBONE"] == "resnet18" and env["LIKERANK_TRAINING__SCORE_HEAD"] == "true"
        assert c["command"][:2] == ["sh", "-c"]
        argv = shlex.split(c["command"][2])
        assert argv[:4] == ["exec", "python", "-m", "torch.distributed.run"]
        assert f"--nproc_per_node={nproc}" in argv and "--nnodes=${PET_NNODES:-${WORLD_SIZE:-1}}" in argv
        i = argv.index("-m", 4)
        assert argv[i:] == ["-m", "training.train", "--labels-run", LABELS_RUN, "--run-id", "20261123T101500Z-abc123"]
    text = yaml.safe_dump(m)
    assert "SHOULD-NOT-LEAK" not in text  # credentials come from the Secret, never the manifest
    assert yaml.safe_load(text) == m  # round-trips


def test_apply_creates_the_custom_object(published):
    calls = []

    class FakeApi:
        def create_namespaced_custom_object(self, **kw):
            calls.append(kw)
            return kw["body"]

    job = L.launch(k8s_cfg(published, "training.replicas=2"), run_id="r-1", api=FakeApi(), echo=lambda s: None)
    assert job == {"run_id": "r-1", "labels_run": LABELS_RUN, "backend": "kubernetes",
                   "metrics_key": "models/r-1/metrics.json", "job_name": "likerank-train-r-1", "namespace": "ml"}
    (kw,) = calls
    assert (kw["group"], kw["version"], kw["plural"], kw["namespace"]) == ("kubeflow.org", "v1", "pytorchjobs", "ml")
    assert kw["body"]["metadata"]["name"] == "likerank-train-r-1"


def test_apply_tolerates_an_existing_job(published):
    from kubernetes.client import ApiException

    class ConflictApi:
        def create_namespaced_custom_object(self, **kw):
            raise ApiException(status=409, reason="AlreadyExists")

    assert L.launch(k8s_cfg(published), run_id="r-2", api=ConflictApi(), echo=lambda s: None)["run_id"] == "r-2"


def test_wait_reads_the_job_conditions(published):
    class StatusApi:
        def __init__(self, states):
            self.states = list(states)

        def get_namespaced_custom_object(self, **kw):
            return {"status": {"conditions": [{"type": t, "status": "True"} for t in self.states.pop(0)]}}

    job = {"run_id": "r-3", "backend": "kubernetes", "job_name": "likerank-train-r-3", "namespace": "ml"}
    with pytest.raises(L.TrainingFailed, match="failed"):
        L.wait(job, k8s_cfg(published), api=StatusApi([["Created"], ["Created", "Running"], ["Failed"]]), poll_s=0)
    assert L.job_state("x", "ml", api=StatusApi([["Created", "Running", "Succeeded"]])) == "Succeeded"


def test_dry_runs_print_and_launch_nothing(published, capsys):
    job = L.launch(k8s_cfg(published), run_id="r-4", dry_run=True)
    manifest = yaml.safe_load(capsys.readouterr().out)
    assert manifest["kind"] == "PyTorchJob" and job["job_name"] == manifest["metadata"]["name"]
    local = load_config(overrides=[f"storage.root={published / 'data'}", "training.nproc=2"])
    L.launch(local, run_id="r-5", dry_run=True)
    argv = shlex.split(capsys.readouterr().out)
    assert argv[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert argv[6:] == ["training.train", "--labels-run", LABELS_RUN, "--run-id", "r-5"]
    assert not LocalStorage(published / "data").list("models/")


def test_unpublished_labels_are_refused_for_kubernetes_too(tmp_path):
    make_labels_run(LocalStorage(tmp_path / "data"), publish=False, n={"train": 4, "val": 2, "test": 2})
    with pytest.raises(LabelsNotPublished, match="no labels run is published"):
        L.launch(k8s_cfg(tmp_path), dry_run=True)


@pytest.mark.parametrize("text, expect", [
    ("manual__2026-11-23T10:15:00+00:00", "manual__2026-11-23T10-15-00-00-00"),
    ("scheduled__x", "scheduled__x"),
])
def test_run_id_from_airflow_run_ids(text, expect):
    from training.registry import run_id_from

    assert run_id_from(text) == expect == run_id_from(text)


def test_empty_storage_settings_leave_the_secret_in_charge(published):
    cfg = k8s_cfg(published, "storage.endpoint_url=")
    (c,) = render(cfg)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    names = {e["name"] for e in c["env"]}
    assert "LIKERANK_STORAGE__ENDPOINT_URL" not in names and "LIKERANK_STORAGE__REGION" not in names
    assert "LIKERANK_STORAGE__ROOT" in names

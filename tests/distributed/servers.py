"""Real PostgreSQL and Redis servers on loopback, and an Airflow CeleryExecutor deployment on
top of them, for the distributed tier.

The servers are Debian's ``postgresql`` and ``redis-server`` packages (``.ci/run`` installs
them). Where they are missing the tests skip and say which binary is missing, unless
``LIKERANK_REQUIRE_SERVERS=1`` (set by ``.ci/run``), which turns the skip into a failure so CI
always runs this tier.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from likerank.orchestrate import AirflowProcesses, wait_for_api
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def require(binary: str, found: str | None) -> str:
    """The binary's path, or skip (fail under ``LIKERANK_REQUIRE_SERVERS=1``) saying what is missing."""
    if found:
        return found
    message = (f"{binary} not found: install Debian's postgresql and redis-server packages "
               "(.ci/run does) to run the CeleryExecutor tier")
    if os.environ.get("LIKERANK_REQUIRE_SERVERS") == "1":
        pytest.fail(message + " (LIKERANK_REQUIRE_SERVERS=1)")
    pytest.skip(message)


def postgres_bin() -> Path:
    """Debian keeps initdb and pg_ctl in /usr/lib/postgresql/<version>/bin, not on PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    found = candidates[0] if candidates else shutil.which("initdb")
    return Path(require("PostgreSQL's initdb", found)).resolve().parent


def wait_until(check, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s\n{tail}")


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1; yields the database URL (user airflow, no password).

    PostgreSQL refuses to run as root, so as root its files belong to, and its processes run
    as, Debian's ``postgres`` user.
    """
    bindir = postgres_bin()
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="likerank-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(work, user="postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = work / "data", work / "server.log"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "airflow", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={work} -c max_connections=200"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w",
                    "start"], check=True, capture_output=True, timeout=120)
    try:
        subprocess.run([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "airflow",
                        "airflow"], check=True, capture_output=True, timeout=60)
        yield f"airflow@127.0.0.1:{port}/airflow"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def redis_server() -> Iterator[str]:
    """A Redis server on 127.0.0.1 with persistence off; yields its URL."""
    binary = require("redis-server", shutil.which("redis-server"))
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 30, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@dataclass
class CeleryDeployment:
    """Airflow 3 with the CeleryExecutor: api-server, scheduler, dag-processor and two workers.

    Workers: ``default`` (everything unrouted) and ``gpu-train`` (queues ``gpu`` and ``train``).
    Each worker reports a hostname of its own (``LIKERANK_WORKER_NAME`` through Airflow's
    ``hostname_callable``), so a task instance's ``hostname`` says which worker ran it.
    """

    procs: AirflowProcesses
    api_url: str

    WORKERS = {"default": "default", "gpu-train": "gpu,train"}

    def airflow(self, *args: str) -> None:
        self.procs.airflow(*args)


def worker_name() -> str:
    """Airflow ``[core] hostname_callable`` for the test's workers: the worker's own name."""
    return os.environ.get("LIKERANK_WORKER_NAME") or "unnamed"


@contextmanager
def celery_deployment(base_env: dict[str, str], home: Path, database: str, broker: str) -> Iterator[CeleryDeployment]:
    api_port = free_port()
    env = {
        **base_env,
        "PYTHONPATH": str(REPO),  # the workers import tests.distributed.servers.worker_name
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.distributed.servers.worker_name",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__FERNET_KEY": "",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{database}",
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the lock has psycopg2.
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{database}",
        "AIRFLOW__CELERY__BROKER_URL": broker,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # Find new DAG runs and Asset events quickly: the chain is a series of short runs.
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
    }
    procs = AirflowProcesses(env, home)
    deployment = CeleryDeployment(procs=procs, api_url=f"http://127.0.0.1:{api_port}")
    procs.airflow("db", "migrate")
    try:
        procs.start("api-server", "api-server")
        procs.start("scheduler", "scheduler")
        procs.start("dag-processor", "dag-processor")
        for name, queues in CeleryDeployment.WORKERS.items():
            # Each worker's log server on a port of its own (the default, 8793, would collide).
            procs.start(f"worker-{name}", "celery", "worker", "--queues", queues, "--concurrency", "2",
                        "--celery-hostname", f"{name}@%h",
                        env={"LIKERANK_WORKER_NAME": name,
                             "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})
        wait_for_api(deployment.api_url, procs, timeout_s=180)
        yield deployment
    finally:
        procs.stop()

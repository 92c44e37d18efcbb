"""The Asset chain under the CeleryExecutor: PostgreSQL metadata, Redis broker, two workers.

A real deployment on loopback (:mod:`tests.distributed.servers`): the test unpauses the chain,
triggers ``scrape`` against the simulator and waits while the scheduler lets the Asset events
run ``detect_faces`` → ``build_labels`` → ``retrain``. Then it checks that every DAG run
succeeded at the first try, that each task ran on the worker of its queue, and that the tables
equal those of an ``airflow dags test`` chain over the same world. Slow: several minutes.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from likerank.orchestrate import dags_test
from pipeline.core.pseudonym import register_simulator
from pipeline.core.published import published_run_id
from pipeline.core.storage import LocalStorage
from pipeline.core.tables import read_table
from tests.distributed.servers import celery_deployment, postgres_server, redis_server

REPO = Path(__file__).resolve().parents[2]
CHAIN = ("scrape", "detect_faces", "build_labels", "retrain")
WAIT_S = 30 * 60  # the whole chain on a 2-core machine takes a few minutes; a hang must end

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

#: A small world and a small model, as in tests/likerank/test_chain.py.
SETTINGS = {
    "LIKERANK_SCRAPE__ALLOW_HOSTS": "127.0.0.1",
    "LIKERANK_SCRAPE__PER_HOST_RPS": "1000",
    "LIKERANK_SCRAPE__PER_HOST_CONCURRENCY": "16",
    "LIKERANK_SCRAPE__BACKFILL_DAYS": "120",
    "LIKERANK_LABELING__GROUP_SIZE": "20",
    "LIKERANK_LABELING__MIN_AGE_DAYS": "30",
    "LIKERANK_VALIDATION__MIN_ROWS": "20",
    "LIKERANK_TRAINING__IMAGE_SIZE": "48",
    "LIKERANK_TRAINING__EPOCHS": "1",
    "LIKERANK_TRAINING__BATCH_SIZE": "16",
    "LIKERANK_TRAINING__WEIGHTS": "none",
    "LIKERANK_TRAINING__WORKERS": "0",
    "LIKERANK_AUTHOR_KEY": "dummy-author-key-celery",
}

#: Columns that record when or how fast something happened, or which run wrote the row (the
#: labels partition): they differ between any two chains. Everything else must be equal.
VOLATILE = {"scraped_at", "attempted_at", "elapsed_ms", "detected_at", "run_id", "run"}
TABLES = {"posts": ["instance", "post_id"], "engagement": ["instance", "post_id", "observed_at"],
          "downloads": ["post_id", "url"], "images": ["sha256"], "faces": ["sha256", "detector_id"]}


def base_env(root: Path, sim_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIKERANK_", "AIRFLOW"))}
    env.update({"PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
                "LIKERANK_STORAGE__ROOT": str(root), "LIKERANK_SOURCE__INSTANCE_URL": sim_url, "LIKERANK_SOURCE__BLUESKY_URL": sim_url, **SETTINGS})
    # This test started the simulator: the workers it spawns may use its demo Bluesky login.
    register_simulator(sim_url, env)
    return env


@pytest.fixture(scope="module")
def world():
    """One simulated world on loopback, its clock at the real current time (one clock)."""
    from simulator import build_world, start_server

    now = datetime.now(UTC).replace(second=0, microsecond=0)
    sim = start_server(build_world(seed=11, posts=600, hashtags=("selfie",), now=now))
    yield sim
    sim.stop()


def query(db_url: str, sql: str) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(f"postgresql://{db_url}") as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


@pytest.fixture(scope="module")
def celery_chain(tmp_path_factory, world):
    work = tmp_path_factory.mktemp("celery")
    env = base_env(work / "data", world.url)
    with postgres_server() as db, redis_server() as broker, \
            celery_deployment(env, work / "airflow", db, broker) as deployment:
        def parsed() -> set[str]:
            return {r[0] for r in query(db, "select dag_id from dag where is_stale is not true")}

        deadline = time.monotonic() + 300
        while not set(CHAIN) <= parsed():
            assert time.monotonic() < deadline, "the DAG processor did not parse the DAGs in 5 minutes"
            time.sleep(2)
        for dag_id in CHAIN:
            deployment.airflow("dags", "unpause", dag_id)
        deployment.airflow("dags", "trigger", "scrape")
        deadline = time.monotonic() + WAIT_S
        while True:
            runs = query(db, "select dag_id, run_id, state from dag_run")
            states = {state for _, _, state in runs}
            retrained = any(d == "retrain" and s == "success" for d, _, s in runs)
            if "failed" in states or (retrained and states <= {"success"}):
                break
            assert time.monotonic() < deadline, f"the chain did not finish in {WAIT_S // 60} minutes: {runs}"
            time.sleep(5)
        tis = query(db, "select dag_id, task_id, map_index, state, queue, hostname, try_number from task_instance")
        scrape_day = query(db, "select min(run_after) from dag_run where dag_id = 'scrape'")[0][0]
        logs = {p.name: p.read_text(errors="replace")[-4000:] for p in (work / "airflow").glob("*.log")}
    return {"runs": runs, "tis": tis, "storage": LocalStorage(work / "data"), "day": scrape_day.date().isoformat(),
            "logs": logs, "work": work}


@pytest.fixture(scope="module")
def dags_test_chain(tmp_path_factory, world, celery_chain):
    """The same chain over the same world with `airflow dags test` (SQLite, no scheduler)."""
    import subprocess

    work = tmp_path_factory.mktemp("dagstest")
    env = base_env(work / "data", world.url)
    env.update({"AIRFLOW_HOME": str(work / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    for dag_id in ("scrape", "detect_faces", "build_labels"):
        log = work / f"{dag_id}.log"
        assert dags_test(dag_id, celery_chain["day"], env=env, log=log) == 0, log.read_text()[-3000:]
    return LocalStorage(work / "data")


def test_every_dag_run_of_the_chain_succeeded_at_the_first_try(celery_chain):
    runs, tis = celery_chain["runs"], celery_chain["tis"]
    failed = [r for r in runs if r[2] != "success"]
    assert not failed, f"{failed}\n" + "\n".join(f"== {k}\n{v}" for k, v in celery_chain["logs"].items())
    assert {d for d, _, _ in runs} >= set(CHAIN)
    bad = [t for t in tis if t[3] not in ("success", "skipped") or t[6] > 1]
    assert not bad, f"failed, retried or unfinished task instances: {bad}"


def test_each_task_ran_on_the_worker_of_its_queue(celery_chain):
    ran = [t for t in celery_chain["tis"] if t[3] == "success"]
    routed = {(d, task) for d, task, *_ in ran if (d, task) in {("detect_faces", "detect"), ("retrain", "launch")}}
    assert routed == {("detect_faces", "detect"), ("retrain", "launch")}, "a routed task never ran"
    for dag_id, task_id, map_index, _, queue, hostname, _ in ran:
        expected = {("detect_faces", "detect"): ("gpu", "gpu-train"),
                    ("retrain", "launch"): ("train", "gpu-train")}.get((dag_id, task_id), ("default", "default"))
        assert (queue, hostname) == expected, f"{dag_id}.{task_id}[{map_index}] ran on {queue}/{hostname}"


def comparable(table: pa.Table, keys: list[str]) -> list[dict]:
    table = table.drop_columns([c for c in table.column_names if c in VOLATILE])
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


def test_tables_equal_those_of_a_dags_test_chain_over_the_same_world(celery_chain, dags_test_chain):
    celery, reference = celery_chain["storage"], dags_test_chain
    for table, keys in TABLES.items():
        a, b = read_table(celery, table), read_table(reference, table)
        assert a.num_rows > 0, table
        assert comparable(a, keys) == comparable(b, keys), table
    a = read_table(celery, "labels", partitions=[published_run_id(celery)])
    b = read_table(reference, "labels", partitions=[published_run_id(reference)])
    assert a.num_rows >= 20 and comparable(a, ["post_id"]) == comparable(b, ["post_id"])


def test_the_model_trained_on_the_published_labels(celery_chain):
    from pipeline.core import keys
    from pipeline.core.tables import get_json

    storage = celery_chain["storage"]
    latest = get_json(storage, keys.LATEST_MODEL)
    assert latest and latest["labels_run"] == published_run_id(storage)

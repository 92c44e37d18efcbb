"""The ``forget`` DAG, run for real (``airflow dags test`` on a fresh SQLite metadata DB), removes
the person and leaves nothing naming them in Airflow: not in any table of its database, not in
the task logs, not in the command's output. The request travels as an opaque id."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from likerank.cli.main import main
from pipeline.core import keys
from pipeline.core.storage import LocalStorage
from pipeline.core.tables import read_table
from tests.core import test_forget
from tests.core.test_forget import ALICE, KEY

REPO = Path(__file__).resolve().parents[2]
world = test_forget.world  # the scraped world: alice wrote posts 100-102, bob 103-105

pytestmark = pytest.mark.slow


@pytest.fixture
def airflow_home(tmp_path: Path, scrape_cfg) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIKERANK_", "AIRFLOW"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "LIKERANK_STORAGE__ROOT": scrape_cfg.storage.root,
    })
    subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    return env


def airflow_db_dump(home: Path) -> str:
    """Every row of every table of the metadata database, as SQL text (sqlite3's ``.dump``)."""
    con = sqlite3.connect(home / "airflow.db")
    try:
        return "\n".join(con.iterdump())
    finally:
        con.close()


def test_the_forget_dag_removes_the_person_and_airflow_keeps_no_trace_of_them(world, scrape_cfg, airflow_home,
                                                                              tmp_path, capsys):
    storage, _ = world
    root = ["--set", f"storage.root={scrape_cfg.storage.root}"]
    assert main([*root, "forget", "--account", ALICE, "--queue"]) == 0
    out = capsys.readouterr().out
    request_id = out.split("queued forget request ", 1)[1].split(";", 1)[0]
    assert storage.exists(keys.forget_request(request_id))

    log = tmp_path / "dags-test.log"
    airflow = str(Path(sys.executable).with_name("airflow"))
    with open(log, "w") as fh:
        rc = subprocess.call([airflow, "dags", "test", "forget", "--conf", f'{{"request": "{request_id}"}}'],
                             stdout=fh, stderr=subprocess.STDOUT, env=airflow_home, cwd=REPO, timeout=600)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "DagRun Finished: dag_id=forget" in text and "state=success" in text, text[-3000:]

    # The person is gone, and so is the request that named them.
    assert {p["post_id"] for p in read_table(LocalStorage(scrape_cfg.storage.root), "posts").to_pylist()} == {
        "103", "104", "105"}
    assert not storage.exists(keys.forget_request(request_id))

    home = Path(airflow_home["AIRFLOW_HOME"])
    dump = airflow_db_dump(home)
    assert request_id in dump  # the dump is the run's: it holds the conf it was given
    task_logs = "\n".join(p.read_text(errors="replace") for p in (home / "logs").rglob("*") if p.is_file()) \
        if (home / "logs").exists() else ""
    assert "forgot {" in text + task_logs  # the task's log is among what is searched
    for needle in (ALICE, "x.example", "alice", KEY(ALICE)):
        for where, body in (("metadata database", dump), ("task logs", task_logs), ("dags test output", text)):
            assert needle not in body, f"{needle!r} found in the {where}"

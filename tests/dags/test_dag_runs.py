"""DAG runs with nothing to do end skipped, not failed, and say why in the task log
(`airflow dags test` against a fresh SQLite metadata DB and empty storage)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from likerank.orchestrate import dags_test

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("dagruns")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIKERANK_", "AIRFLOW"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(work / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "LIKERANK_STORAGE__ROOT": str(work / "data"),
    })
    subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    return env


def test_build_labels_with_no_data_ends_skipped_and_logs_why(airflow_env, tmp_path):
    log = tmp_path / "build_labels.log"
    rc = dags_test("build_labels", "2026-03-01", env=airflow_env, log=log)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "Skipping task." in text and "nothing to label yet: 0 posts would be labeled" in text
    assert "new_state=skipped" in text and "new_state=failed" not in text
    assert "DagRun Finished: dag_id=build_labels" in text and "state=success" in text

"""``make airflow`` (``python -m likerank.orchestrate live``): the demo world under the real
scheduler. What a new user sees: the chain of DAG runs goes green by itself, with real dates;
``airflow backfill create`` over past days runs green too; nothing listens beyond 127.0.0.1;
Ctrl-C (SIGTERM here) stops every process. Slow: a few minutes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 20 * 60

pytestmark = pytest.mark.slow


def runs(home: Path) -> list[tuple[str, str, str, str]]:
    with sqlite3.connect(home / "airflow.db") as db:
        return db.execute("select dag_id, run_id, run_type, state from dag_run").fetchall()


def wait_for(condition, what: str, home: Path, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s / 60:.0f} min: {runs(home)}"
        time.sleep(3)


def listening_sockets(tree: list[psutil.Process]) -> set[tuple[str, int]]:
    """(ip, port) of every listening socket in ``tree``. A short-lived child (an ``airflow``
    subcommand) may exit between being listed and being inspected: it listens on nothing."""
    found = set()
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            found |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    return found


def still_running(p: psutil.Process) -> bool:
    """Running and not a zombie; False also when it exits while being asked."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    work = tmp_path_factory.mktemp("live")
    home = work / "airflow"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIKERANK_", "AIRFLOW"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__API__PORT": str(free_port()),
        "AIRFLOW__CORE__PARALLELISM": "2",
        "LIKERANK_STORAGE__ROOT": str(work / "data"),
        "LIKERANK_SIMULATOR__PORT": str(free_port()),
        "LIKERANK_SIMULATOR__POSTS": "600",
        "LIKERANK_LABELING__GROUP_SIZE": "20",
        "LIKERANK_VALIDATION__MIN_ROWS": "20",
        "LIKERANK_TRAINING__IMAGE_SIZE": "48",
        "LIKERANK_TRAINING__EPOCHS": "1",
        "LIKERANK_TRAINING__WEIGHTS": "none",
        "LIKERANK_TRAINING__WORKERS": "0",
    })
    out = open(work / "live.out", "w+")
    tree: list[psutil.Process] = []
    proc = subprocess.Popen([sys.executable, "-m", "likerank.orchestrate", "live"], env=env, cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: "Ctrl-C stops everything" in (work / "live.out").read_text() or proc.poll() is not None,
                 "make airflow's start", home, 300)
        assert proc.poll() is None, (work / "live.out").read_text()
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        listening = listening_sockets(tree)

        def chain_done() -> bool:  # or a run failed: then the test says so at once
            states = runs(home)
            return any(s == "failed" for *_, s in states) or (
                any(d == "retrain" and s == "success" for d, _, _, s in states)
                and all(s == "success" for *_, s in states))

        wait_for(chain_done, "the chain through retrain", home)
        chain = runs(home)
        today = datetime.now(UTC).date()
        first, last = (today - timedelta(days=3)).isoformat(), (today - timedelta(days=1)).isoformat()
        # SQLite answers "database is locked" at once, past any busy timeout, when a transaction
        # that read must upgrade to write while the scheduler writes (its deadlock rule); the
        # command's transaction is rolled back and the README says to run it again. Up to 3 tries.
        for _attempt in range(3):
            created = subprocess.run([str(Path(sys.executable).with_name("airflow")), "backfill", "create",
                                      "--dag-id", "scrape", "--from-date", first, "--to-date", last],
                                     env=env, capture_output=True, text=True, timeout=300)
            if created.returncode == 0 or "database is locked" not in created.stdout + created.stderr:
                break
            time.sleep(5)
        assert created.returncode == 0, created.stdout + created.stderr
        wait_for(lambda: sum(1 for d, _, t, s in runs(home) if t == "backfill" and s in ("success", "failed")) == 3,
                 "the backfill runs", home)
        backfill = [r for r in runs(home) if r[2] == "backfill"]
        proc.send_signal(signal.SIGTERM)  # what Ctrl-C does
        proc.wait(timeout=120)
        survivors = [p for p in tree[1:] if still_running(p)]
        return {"out": (work / "live.out").read_text(), "listening": listening, "chain": chain,
                "backfill": backfill, "survivors": survivors, "home": home, "rc": proc.returncode,
                "root": work / "data", "first": first, "last": last}
    finally:  # only make airflow's own process tree: other fixtures' servers are children of pytest too
        leftovers = list(tree)
        if proc.poll() is None:
            leftovers += psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
        for p in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def test_it_says_where_the_ui_and_the_password_are(live):
    out = live["out"]
    assert "UI and REST API on http://127.0.0.1:" in out
    assert f"password in {live['home'] / 'simple_auth_manager_passwords.json.generated'}" in out
    assert (live["home"] / "simple_auth_manager_passwords.json.generated").is_file()


def test_nothing_listens_beyond_loopback(live):
    assert live["listening"], "found no listening socket at all"
    assert {ip for ip, _ in live["listening"]} == {"127.0.0.1"}, live["listening"]


def test_the_chain_goes_green_by_itself_with_real_dates(live):
    chain = live["chain"]
    assert {d for d, *_ in chain} >= {"scrape", "detect_faces", "build_labels", "retrain"}
    assert [r for r in chain if r[3] != "success"] == []
    today = datetime.now(UTC).date().isoformat()
    partitions = {p.name for p in (live["root"] / "posts").iterdir() if p.name != "_delta_log"}
    assert partitions == {f"dt={today}"}, partitions  # the simulator's clock is the real one


def test_backfill_over_past_days_runs_green(live):
    backfill = live["backfill"]
    assert sorted(r[1] for r in backfill) == [f"backfill__{d}T00:00:00+00:00" for d in (
        live["first"], (datetime.fromisoformat(live["first"]) + timedelta(days=1)).date().isoformat(), live["last"])]
    assert {r[3] for r in backfill} == {"success"}


def test_task_logs_say_what_happened_without_false_errors(live):
    logs = {p: p.read_text(errors="replace") for p in (live["home"] / "logs").rglob("attempt=*.log")}
    assert logs, "no task logs"
    assert not [p for p, text in logs.items() if "XCom not found" in text]
    scrape = "".join(text for p, text in logs.items() if "task_id=scrape" in str(p) and "map_index=0" in str(p))
    assert " kept, skipped " in scrape and "downloads {'ok'" in scrape  # the scrape's counts at INFO
    train = "".join(text for p, text in logs.items() if "task_id=launch" in str(p))
    assert "epoch 1 done" in train


def test_ctrl_c_stops_everything(live):
    assert live["rc"] == 0 and "airflow: stopped" in live["out"]
    assert live["survivors"] == []

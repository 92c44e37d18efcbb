"""Orchestration: every way likerank runs its DAGs, and ``make run``.

How DAGs are run from outside Airflow lives here once: :func:`dags_test` (``airflow dags
test``, one run in this process tree, no scheduler) and :func:`trigger_dag` (Airflow's REST
API, for a running ``make airflow`` or a deployment).

``make run`` (:func:`main`) is the whole chain on the embedded default, through Airflow.

What it does, in order:

1. starts the simulator (a local Mastodon-compatible server, ``likerank sim serve``) on
   ``simulator.port`` on loopback (fixed, so a second run is the same instance to the
   incremental scraper), unless ``source.kind = "mastodon"`` points at a real instance;
2. runs each DAG with ``airflow dags test`` in the order the Asset chain would trigger them —
   ``scrape`` → (the simulator's clock advances ``labeling.min_age_days`` so month-old likes
   exist) → ``refresh_engagement`` → ``detect_faces`` → ``build_labels`` → ``retrain``.
   Against the simulator, each DAG run's logical date is the simulated world's clock, so the
   partitions read ``dt=<simulated day>`` and a second ``make run`` lands in the same ones.
   Each is the same DAG file a scheduler runs and records its Asset events in Airflow's
   SQLite metadata; running them in sequence rather than waiting on a scheduler keeps the
   demo deterministic and leaves nothing running afterwards (``make airflow`` runs the same
   DAGs under the real scheduler, where the Asset events trigger the next DAG);
3. prints one screen: the funnel, the validation verdict, the model's metrics, where every
   table lives and a query to try next;
4. stops the simulator.

A second ``make run`` is incremental: the scraper resumes from the newest post it stored.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from pipeline.core.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Step:
    dag_id: str
    what: str


CHAIN = [
    Step("scrape", "read the hashtag timeline, download images -> posts, images, downloads, engagement"),
    Step("refresh_engagement", "re-observe posts older than min_age_days -> engagement"),
    Step("detect_faces", "SCRFD on every new image -> faces"),
    Step("build_labels", "groups-of-100 labels, Great Expectations gate, publish -> labels"),
    Step("retrain", "fine-tune on the published labels -> models/"),
]


class Simulator:
    """``likerank sim serve`` in a child process; its base URL is the first line it prints."""

    def __init__(self, cfg: Config, log: Path):
        cmd = [sys.executable, "-m", "pipeline.cli.main", "sim", "serve",
               "--seed", str(cfg.simulator.seed), "--posts", str(cfg.simulator.posts), "--port", str(cfg.simulator.port)]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 120
        self.url = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.strip().startswith("http"):
                self.url = line.strip().split()[0].rstrip("/")
                break
        if not self.url:
            self.stop()
            raise RuntimeError(f"the simulator did not start; see {log}")

    def advance(self, days: float) -> None:
        r = requests.post(f"{self.url}/_sim/advance", params={"days": days}, timeout=30)
        r.raise_for_status()

    def now(self) -> str:
        """The world's clock (ISO 8601): the logical date of the DAG runs against it."""
        r = requests.get(f"{self.url}/_sim/now", timeout=30)
        r.raise_for_status()
        return r.json()["now"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def dags_test(dag_id: str, logical_date: str | None = None, *, env: dict[str, str] | None = None,
              log: Path | None = None) -> int:
    """``airflow dags test DAG [DATE]``: one DAG run executed here, without a scheduler.

    Uses the repository's Airflow settings (the Makefile's) where the environment has none;
    output goes to ``log`` when given, else to this terminal. Returns the exit status.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("AIRFLOW_HOME", str(REPO / ".airflow"))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    airflow = Path(sys.executable).with_name("airflow")
    cmd = [str(airflow) if airflow.exists() else "airflow", "dags", "test", dag_id, *([logical_date] if logical_date else [])]
    if log is None:
        return subprocess.call(cmd, env=env, cwd=REPO)
    with open(log, "w") as fh:
        return subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def airflow_url() -> str:
    """The Airflow API server to talk to: ``$LIKERANK_AIRFLOW_URL``, default ``make airflow``'s."""
    return os.environ.get("LIKERANK_AIRFLOW_URL", "http://localhost:8080").rstrip("/")


def airflow_is_up(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return requests.get(f"{url}/api/v2/monitor/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def admin_password(airflow_home: str | None = None) -> tuple[str, str]:
    """The user and password ``airflow standalone`` generated (simple auth manager)."""
    home = Path(airflow_home or os.environ.get("AIRFLOW_HOME") or REPO / ".airflow")
    f = home / "simple_auth_manager_passwords.json.generated"
    if not f.is_file():
        raise RuntimeError(f"Airflow is up but {f} does not exist: set AIRFLOW_HOME to the running instance's home")
    users = json.loads(f.read_text())
    user = "admin" if "admin" in users else next(iter(users))
    return user, users[user]


def trigger_dag(url: str, dag_id: str, *, wait: bool = False, poll_s: float = 10.0, conf: dict | None = None) -> int:
    """Unpause and trigger ``dag_id`` through Airflow's REST API; returns an exit status.

    A token from ``POST /auth/token`` with the admin password, ``PATCH /api/v2/dags/{id}``,
    ``POST /api/v2/dags/{id}/dagRuns``; with ``wait``, polls the run until it ends.
    """
    user, password = admin_password()
    r = requests.post(f"{url}/auth/token", json={"username": user, "password": password}, timeout=10)
    r.raise_for_status()
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
    s.patch(f"{url}/api/v2/dags/{dag_id}", json={"is_paused": False}, timeout=10).raise_for_status()
    r = s.post(f"{url}/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}}, timeout=10)
    r.raise_for_status()
    run_id = r.json()["dag_run_id"]
    print(f"triggered DAG {dag_id!r} run {run_id!r} on {url} (watch it in the UI: {url}/dags/{dag_id})")
    if not wait:
        return 0
    while True:
        state = s.get(f"{url}/api/v2/dags/{dag_id}/dagRuns/{run_id}", timeout=10).json().get("state")
        if state in ("success", "failed"):
            print(f"DAG {dag_id!r} run {run_id!r}: {state}")
            return 0 if state == "success" else 1
        time.sleep(poll_s)


def run_step(step: Step, logical_date: str, env: dict[str, str], logs: Path) -> tuple[bool, float, Path]:
    log = logs / f"{step.dag_id}.log"
    t0 = time.monotonic()
    rc = dags_test(step.dag_id, logical_date, env=env, log=log)
    return rc == 0, time.monotonic() - t0, log


def main() -> int:
    cfg = load_config()
    logs = Path(os.environ.get("AIRFLOW_HOME", REPO / ".airflow")) / "run-logs"
    logs.mkdir(parents=True, exist_ok=True)
    logical_date = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    env = dict(os.environ)
    sim: Simulator | None = None
    truth: Path | None = None
    started = time.monotonic()
    try:
        if cfg.source.kind == "simulator":
            print(f"simulator: starting a world of {cfg.simulator.posts} posts (seed {cfg.simulator.seed}) ...")
            sim = Simulator(cfg, logs / "simulator.log")
            print(f"simulator: {sim.url}")
            env["LIKERANK_SOURCE__INSTANCE_URL"] = sim.url
            # The simulator lives on loopback; the SSRF guard refuses it unless allow-listed.
            env.setdefault("LIKERANK_SCRAPE__ALLOW_HOSTS", "127.0.0.1")
            # Our own loopback server: no need for the polite defaults meant for real instances.
            env.setdefault("LIKERANK_SCRAPE__PER_HOST_RPS", "1000")
            env.setdefault("LIKERANK_SCRAPE__PER_HOST_CONCURRENCY", "16")
            # Read the whole simulated world (its posts span ~90 days), not just the newest page.
            env.setdefault("LIKERANK_SCRAPE__BACKFILL_DAYS", "120")
            logical_date = sim.now()
            from simulator import build_world, write_truth

            # The hidden ground truth (never served): training and the summary report
            # ROC-AUC against true quality with it.
            truth = logs / f"truth-seed{cfg.simulator.seed}-posts{cfg.simulator.posts}.parquet"
            write_truth(build_world(cfg.simulator.seed, cfg.simulator.posts, tuple(cfg.simulator.hashtags)), truth)
            env.setdefault("LIKERANK_TRAINING__TRUTH_FILE", str(truth))
            # A demo-sized model so the whole chain ends in minutes on a laptop CPU (224 px
            # ResNet-18 trains at ~10 images/s on 2 cores); `make retrain` uses the config as is.
            env.setdefault("LIKERANK_TRAINING__IMAGE_SIZE", "96")
        for step in CHAIN:
            if step.dag_id == "refresh_engagement" and sim is not None:
                sim.advance(cfg.labeling.min_age_days)
                logical_date = sim.now()
                print(f"simulator: clock advanced {cfg.labeling.min_age_days:g} days to {logical_date}")
            print(f"{step.dag_id:<19} {step.what} ...", flush=True)
            ok, seconds, log = run_step(step, logical_date, env, logs)
            print(f"{'':<19} {'ok' if ok else 'FAILED'} in {seconds:.0f} s (log: {log})")
            if not ok:
                print("".join(log.read_text().splitlines(keepends=True)[-40:]))
                return 1
    finally:
        if sim is not None:
            sim.stop()
            print("simulator: stopped")
    print()
    from pipeline.report.summary import summary

    print(summary(cfg, truth))
    print(f"\nmake run: done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

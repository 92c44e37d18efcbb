"""Orchestration: every way likerank runs its DAGs, and ``make run``.

How DAGs are run from outside Airflow lives here once: :func:`dags_test` (``airflow dags
test``, one run in this process tree, no scheduler) and :func:`trigger_dag` (Airflow's REST
API, for a running ``make airflow`` or a deployment).

``make run`` (:func:`run_chain`) is the whole chain on the embedded default, through Airflow.

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

``make airflow`` (:func:`run_scheduler`) is the same demo world under the real scheduler: the
simulator with its clock at the real current time (so scheduled runs, backfills and
partitions carry real dates), Airflow's API server (on 127.0.0.1 only), scheduler,
DAG processor and triggerer, in an Airflow home and storage root of their own
(:data:`LIVE_HOME`, :data:`LIVE_ROOT`); Ctrl-C stops them all.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from pipeline.core.config import Config, load_config
from pipeline.core.pseudonym import register_simulator

REPO = Path(__file__).resolve().parents[1]
#: ``make airflow``'s Airflow home and storage root: apart from ``make run``'s (``.airflow``,
#: ``./data``), whose simulated clock and metadata would otherwise mix with the real ones.
LIVE_HOME = REPO / ".airflow-live"
LIVE_ROOT = REPO / "data-live"
#: SQLite connection arguments for ``make airflow``'s metadata DB, by import path in its
#: ``airflow.cfg``. Python's default busy timeout is 5 s; the scheduler and the task processes
#: hold SQLite's single write lock longer than that at times, and a CLI command beside them
#: (``airflow backfill create``) then failed with "database is locked". Seconds. (A read
#: transaction that must turn into a write while another writes still fails at once: SQLite's
#: deadlock rule, which no timeout changes; such a command is rolled back and can be rerun.)
SQLITE_CONNECT_ARGS = {"timeout": 120}


@dataclass(frozen=True)
class Step:
    dag_id: str
    what: str


CHAIN = [
    Step("scrape", "read the hashtag on each platform, download images -> posts, images, downloads, engagement"),
    Step("refresh_engagement", "re-observe posts older than min_age_days -> engagement"),
    Step("detect_faces", "SCRFD on every new image -> faces"),
    Step("build_labels", "groups-of-100 labels, Great Expectations gate, publish -> labels"),
    Step("retrain", "fine-tune on the published labels -> models/"),
]


class Simulator:
    """``likerank sim serve`` in a child process; its base URL is the first line it prints."""

    def __init__(self, cfg: Config, log: Path, now: str | None = None):
        """``now``: the world's clock (ISO 8601; default: the simulator's fixed demo date)."""
        cmd = [sys.executable, "-m", "likerank.cli.main", "sim", "serve",
               "--seed", str(cfg.simulator.seed), "--posts", str(cfg.simulator.posts), "--port", str(cfg.simulator.port),
               "--robots-share", str(cfg.simulator.robots_share), "--tdm-header-share",
               str(cfg.simulator.tdm_header_share), "--tdm-file-share", str(cfg.simulator.tdm_file_share),
               *(["--now", now] if now else [])]
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
    return os.environ.get("LIKERANK_AIRFLOW_URL", "http://127.0.0.1:8080").rstrip("/")


def airflow_is_up(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return requests.get(f"{url}/api/v2/monitor/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"


def admin_password(airflow_home: str | None = None) -> tuple[str, str]:
    """The user and password Airflow's simple auth manager generated: in ``airflow_home``, else
    ``$AIRFLOW_HOME``, else ``make airflow``'s home."""
    homes = [Path(h) for h in (airflow_home, os.environ.get("AIRFLOW_HOME")) if h] + [LIVE_HOME]
    f = next((h / PASSWORDS_FILE for h in homes if (h / PASSWORDS_FILE).is_file()), homes[0] / PASSWORDS_FILE)
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
            tis = s.get(f"{url}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", timeout=10).json()
            states = ", ".join(f"{t['task_id']} {t['state']}" for t in tis.get("task_instances", []))
            print(f"DAG {dag_id!r} run {run_id!r}: {state} ({states})")
            return 0 if state == "success" else 1
        time.sleep(poll_s)


def simulator_env(env: dict[str, str], sim_url: str, truth: Path) -> None:
    """Point the DAGs at the simulator (``setdefault``: what the caller set wins)."""
    env["LIKERANK_SOURCE__INSTANCE_URL"] = sim_url
    env["LIKERANK_SOURCE__BLUESKY_URL"] = sim_url  # the simulator serves Bluesky's XRPC too
    # Only a simulator started here may be pseudonymized with the public development key.
    register_simulator(sim_url, env)
    # The simulator lives on loopback; the SSRF guard refuses it unless allow-listed.
    env.setdefault("LIKERANK_SCRAPE__ALLOW_HOSTS", "127.0.0.1")
    # Our own loopback server: no need for the polite defaults meant for real instances.
    env.setdefault("LIKERANK_SCRAPE__PER_HOST_RPS", "1000")
    env.setdefault("LIKERANK_SCRAPE__PER_HOST_CONCURRENCY", "16")
    # Read the whole simulated world (its posts span ~90 days), not just the newest page.
    env.setdefault("LIKERANK_SCRAPE__BACKFILL_DAYS", "120")
    # The hidden ground truth (never served): training and the summary report ROC-AUC
    # against true quality with it.
    env.setdefault("LIKERANK_TRAINING__TRUTH_FILE", str(truth))
    # A demo-sized model so the whole chain ends in minutes on a laptop CPU (224 px ResNet-18
    # trains at ~10 images/s on 2 cores); `likerank retrain --direct` uses the config as is.
    env.setdefault("LIKERANK_TRAINING__IMAGE_SIZE", "96")


def write_world_truth(cfg: Config, folder: Path, now: str | None = None) -> Path:
    from simulator import build_world, write_truth

    world = {"now": dt.datetime.fromisoformat(now)} if now else {}
    truth = folder / (f"truth-seed{cfg.simulator.seed}-posts{cfg.simulator.posts}-bluesky{cfg.simulator.bluesky_share:g}"
                      f"{'-' + now[:10] if now else ''}.parquet")
    write_truth(build_world(cfg.simulator.seed, cfg.simulator.posts, tuple(cfg.simulator.hashtags),
                            bluesky_share=cfg.simulator.bluesky_share, **world), truth)
    return truth


def run_step(step: Step, logical_date: str, env: dict[str, str], logs: Path) -> tuple[bool, float, Path]:
    log = logs / f"{step.dag_id}.log"
    t0 = time.monotonic()
    rc = dags_test(step.dag_id, logical_date, env=env, log=log)
    return rc == 0, time.monotonic() - t0, log


def run_chain() -> int:
    """``make run``: every DAG of the chain once, in order, through ``airflow dags test``."""
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
            logical_date = sim.now()
            truth = write_world_truth(cfg, logs)
            simulator_env(env, sim.url, truth)
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
    from likerank.report.summary import summary

    print(summary(cfg, truth))
    print(f"\nmake run: done in {time.monotonic() - started:.0f} s")
    return 0


class AirflowProcesses:
    """Airflow components as child processes of this one, each logging to ``<logs>/<name>.log``.

    Each runs in a process group of its own, so :meth:`stop` ends it with everything it forked
    (task runners, gunicorn/uvicorn workers).
    """

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def airflow(self, *args: str, timeout_s: float = 600) -> None:
        """A one-shot command (``db migrate``, ``dags unpause``); raises with its output on failure."""
        p = subprocess.run([_airflow_bin(), *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                           timeout=timeout_s)
        if p.returncode:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        with open(self.logs / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen([_airflow_bin(), *args], env={**self.env, **(env or {})}, cwd=REPO,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def exited(self) -> list[str]:
        """Components that have stopped by themselves (a crash: see their logs)."""
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _airflow_bin() -> str:
    airflow = Path(sys.executable).with_name("airflow")
    return str(airflow) if airflow.exists() else "airflow"


def wait_for_api(url: str, procs: AirflowProcesses, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not airflow_is_up(url):
        if procs.exited() or time.monotonic() > deadline:
            raise RuntimeError(f"the Airflow API server did not come up at {url}; "
                               f"see {procs.logs}/api-server.log (exited: {', '.join(procs.exited()) or 'none'})")
        time.sleep(1)


def configure_live_home(home: Path) -> Path:
    """Add to ``home``'s ``airflow.cfg`` what every process on its SQLite DB needs, the user's
    own ``airflow`` commands included (they read the file, not ``make airflow``'s environment):
    a busy timeout (:data:`SQLITE_CONNECT_ARGS`). Every other setting is kept, the secrets
    Airflow generated into the file on its first start among them: the API server and the
    scheduler must share its ``jwt_secret``, or every task fails with "Invalid auth token"."""
    import configparser

    path = home / "airflow.cfg"
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(path)
    if not cfg.has_section("database"):
        cfg.add_section("database")
    cfg.set("database", "sql_alchemy_connect_args", "likerank.orchestrate.SQLITE_CONNECT_ARGS")
    home.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        cfg.write(f)
    return path


def run_scheduler() -> int:
    """``make airflow``: the demo world under the real scheduler, on 127.0.0.1, until Ctrl-C."""
    cfg = load_config()
    env = dict(os.environ)
    home = Path(env.setdefault("AIRFLOW_HOME", str(LIVE_HOME)))
    env.setdefault("LIKERANK_STORAGE__ROOT", str(LIVE_ROOT))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    # The demo runs by itself: the chain's DAGs start unpaused (a deployment keeps Airflow's
    # default, paused, and unpauses deliberately).
    env.setdefault("AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION", "False")
    env.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
    env["AIRFLOW__API__HOST"] = env.get("AIRFLOW__API__HOST", "127.0.0.1")
    port = env.setdefault("AIRFLOW__API__PORT", "8080")
    url = f"http://{env['AIRFLOW__API__HOST']}:{port}"
    # Tasks reach the execution API on the same loopback address.
    env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"{url}/execution/")
    logs = home / "logs" / "components"
    procs = AirflowProcesses(env, logs)
    sim: Simulator | None = None

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        if cfg.source.kind == "simulator":
            # One clock: the world's "now" is the real current time, so scheduled runs, backfills
            # and partitions carry real dates.
            now = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
            sim = Simulator(cfg, logs / "simulator.log", now=now)
            simulator_env(env, sim.url, write_world_truth(cfg, logs, now))
            print(f"simulator: {sim.url} ({cfg.simulator.posts} posts, its clock at {now})")
        print(f"airflow: home {home}, tables under {env['LIKERANK_STORAGE__ROOT']}; migrating the metadata DB ...",
              flush=True)
        procs.airflow("db", "migrate")  # also writes airflow.cfg with its generated secrets, once
        configure_live_home(home)
        # No log-server processes (they listen on every interface): with one machine and one
        # Airflow home, the API server reads the task logs from disk.
        procs.start("api-server", "api-server", "--host", env["AIRFLOW__API__HOST"], "--port", port)
        procs.start("scheduler", "scheduler", "--skip-serve-logs")
        procs.start("dag-processor", "dag-processor")
        procs.start("triggerer", "triggerer", "--skip-serve-logs")
        wait_for_api(url, procs)
        print(f"airflow: UI and REST API on {url}\n"
              f"airflow: user admin, password in {home / PASSWORDS_FILE}\n"
              f"airflow: component logs in {logs}; Ctrl-C stops everything", flush=True)
        while not procs.exited():
            time.sleep(2)
        print(f"airflow: {', '.join(procs.exited())} exited; see {logs}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nairflow: stopping ...")
        return 0
    finally:
        procs.stop()
        if sim is not None:
            sim.stop()
        print("airflow: stopped")


if __name__ == "__main__":
    sys.exit(run_scheduler() if sys.argv[1:] == ["live"] else run_chain())

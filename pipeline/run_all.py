"""``make run``: the whole chain on the embedded default, through Airflow.

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

from pipeline.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
DAGS = Path(os.environ.get("AIRFLOW__CORE__DAGS_FOLDER", REPO / "dags"))


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
        cmd = [sys.executable, "-m", "pipeline.cli", "sim", "serve",
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


def run_dag(step: Step, logical_date: str, env: dict[str, str], logs: Path) -> tuple[bool, float, Path]:
    log = logs / f"{step.dag_id}.log"
    t0 = time.monotonic()
    with open(log, "w") as fh:
        airflow = str(Path(sys.executable).with_name("airflow"))
        rc = subprocess.call([airflow, "dags", "test", step.dag_id, logical_date],
                             stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return rc == 0, time.monotonic() - t0, log


def main() -> int:
    cfg = load_config()
    logs = Path(os.environ.get("AIRFLOW_HOME", REPO / ".airflow")) / "run-logs"
    logs.mkdir(parents=True, exist_ok=True)
    logical_date = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    env = dict(os.environ)
    sim: Simulator | None = None
    started = time.monotonic()
    try:
        if cfg.source.kind == "simulator":
            print(f"simulator: starting a world of {cfg.simulator.posts} posts (seed {cfg.simulator.seed}) ...")
            sim = Simulator(cfg, logs / "simulator.log")
            print(f"simulator: {sim.url}")
            env["LIKERANK_SOURCE__INSTANCE_URL"] = sim.url
            # The simulator lives on loopback; the SSRF guard refuses it unless allow-listed.
            env.setdefault("LIKERANK_SCRAPE__ALLOW_HOSTS", "127.0.0.1")
            # Read the whole simulated world (its posts span ~90 days), not just the newest page.
            env.setdefault("LIKERANK_SCRAPE__BACKFILL_DAYS", "120")
            logical_date = sim.now()
        for step in CHAIN:
            if not (DAGS / f"{step.dag_id}.py").is_file():
                print(f"{step.dag_id:<19} not built yet (no dags/{step.dag_id}.py): skipped")
                continue
            if step.dag_id == "refresh_engagement" and sim is not None:
                sim.advance(cfg.labeling.min_age_days)
                logical_date = sim.now()
                print(f"simulator: clock advanced {cfg.labeling.min_age_days:g} days to {logical_date}")
            print(f"{step.dag_id:<19} {step.what} ...", flush=True)
            ok, seconds, log = run_dag(step, logical_date, env, logs)
            print(f"{'':<19} {'ok' if ok else 'FAILED'} in {seconds:.0f} s (log: {log})")
            if not ok:
                print("".join(log.read_text().splitlines(keepends=True)[-40:]))
                return 1
    finally:
        if sim is not None:
            sim.stop()
            print("simulator: stopped")
    print()
    print(summary(cfg))
    print(f"\nmake run: done in {time.monotonic() - started:.0f} s")
    return 0


def summary(cfg: Config) -> str:
    """One screen: what each table holds, the verdict, the model, and a query to try."""
    from pipeline.query import published_run, run_query
    from pipeline.schemas import TABLES
    from pipeline.storage import open_storage
    from pipeline.tables import get_json

    storage = open_storage(cfg.storage)
    lines = ["== likerank: what this run produced =="]
    for name, table in TABLES.items():
        n = run_query(storage, f"select count(*) n from {'labels_all' if name == 'labels' else name}")
        lines.append(f"  {name:<11} {n.column('n')[0].as_py():>7} rows   {storage.uri(table.path)}/")
    downloads = run_query(storage, "select status, count(*) n from downloads group by 1 order by 2 desc")
    if downloads.num_rows:
        lines.append("  downloads by status: " + ", ".join(f"{r['status']} {r['n']}" for r in downloads.to_pylist()))
    run = published_run(storage)
    if run:
        summ = get_json(storage, f"labels/run={run}/_summary.json", {})
        lines.append(f"  published labels: run {run}")
        if summ:
            lines.append("  label funnel: " + json.dumps(summ, sort_keys=True)[:600])
    else:
        lines.append("  published labels: none yet")
    latest = get_json(storage, "models/latest.json")
    if latest:
        lines.append(f"  model: {json.dumps(latest, sort_keys=True)[:400]}")
    lines.append('\ntry:  .venv/bin/likerank query "select label, count(*) from labels group by label"')
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

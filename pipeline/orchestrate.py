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


def write_truth(cfg: Config, path: Path) -> None:
    import pyarrow.parquet as pq

    from pipeline.simulator import world_truth

    pq.write_table(world_truth(seed=cfg.simulator.seed, posts=cfg.simulator.posts,
                               hashtags=cfg.simulator.hashtags), path)


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
            # The hidden ground truth (never served): training and the summary report
            # ROC-AUC against true quality with it.
            truth = logs / f"truth-seed{cfg.simulator.seed}-posts{cfg.simulator.posts}.parquet"
            write_truth(cfg, truth)
            env.setdefault("LIKERANK_TRAINING__TRUTH_FILE", str(truth))
            # A demo-sized model so the whole chain ends in minutes on a laptop CPU (224 px
            # ResNet-18 trains at ~10 images/s on 2 cores); `make retrain` uses the config as is.
            env.setdefault("LIKERANK_TRAINING__IMAGE_SIZE", "96")
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
    print(summary(cfg, truth))
    print(f"\nmake run: done in {time.monotonic() - started:.0f} s")
    return 0


def _fmt(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v) or "none"


def summary(cfg: Config, truth: Path | None = None) -> str:
    """One screen: the funnel, the verdict, the model, where everything lives, a query to try."""
    from pipeline.query import published_run, run_query
    from pipeline.schemas import TABLES
    from pipeline.storage import open_storage
    from pipeline.tables import get_json

    storage = open_storage(cfg.storage)

    def one(sql: str) -> list[dict]:
        return run_query(storage, sql).to_pylist()

    lines = ["== likerank: the funnel =="]
    from pipeline.scrape import run_log_prefix

    seen, skipped = 0, {}
    for key in storage.list(run_log_prefix()):
        scrape_run = get_json(storage, key)
        seen += scrape_run["seen"]
        for reason, n in scrape_run["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    posts = one("select count(distinct post_id) n from posts")[0]["n"]
    lines.append(f"  statuses read         {seen:>7}   skipped: {_fmt(skipped)}")
    lines.append(f"  posts stored          {posts:>7}")
    dl = {r["status"]: r["n"] for r in one("select status, count(*) n from downloads group by 1")}
    lines.append(f"  image downloads       {sum(dl.values()):>7}   ({_fmt(dl)})")
    faces = one("""select case when status <> 'ok' then status when n_faces = 0 then 'no face'
                   when n_faces = 1 then 'one face' else 'several faces' end k, count(*) n
                   from (from faces qualify row_number() over (partition by sha256 order by detected_at desc) = 1)
                   group by 1""")  # the latest detection per image: failed ones are retried in new rows
    lines.append(f"  images with faces     {sum(r['n'] for r in faces if r['k'] in ('one face', 'several faces')):>7}"
                 f"   ({_fmt({r['k']: r['n'] for r in faces})})")
    run = published_run(storage)
    if run:
        summ = get_json(storage, f"labels/run={run}/_summary.json", {})
        lines.append(f"  labeled posts         {summ.get('rows_out', '?'):>7}   in {summ.get('groups', '?')} groups of "
                     f"{summ.get('group_size', '?')}; dropped: {_fmt(summ.get('dropped', {}))}")
        docs = [k for k in storage.list(f"validation/run={run}/") if k.endswith("index.html")]
        lines.append("\n== validation (Great Expectations) ==")
        lines.append(f"  passed and published: labels run {run}")
        if docs:
            lines.append(f"  Data Docs: {storage.uri(docs[0])}")
        if truth is not None:
            from labeling.evaluate import evaluate_run, load_truth

            ev = evaluate_run(cfg, run, load_truth(truth, cfg), storage)
            lines.append("\n== label quality against the simulator's hidden truth (ROC-AUC, face posts) ==")
            lines.append("  " + ", ".join(f"{name} {r['auc']:.3f}" for name, r in ev["labelers"].items()))
    else:
        lines.append("  labels: none published yet")
    latest = get_json(storage, "models/latest.json")
    if latest:
        m = get_json(storage, latest["metrics_key"], {})
        test = m.get("test", {})
        lines.append(f"\n== model {latest['run_id']} ({m.get('model', {}).get('backbone', '?')}, "
                     f"pretrained: {m.get('model', {}).get('pretrained', '?')}) ==")
        lines.append("  test: " + ", ".join(f"{k} {test[k]:.3f}" for k in ("accuracy", "roc_auc", "log_loss",
                                                                              "pearson_r", "mae", "rmse")
                                            if isinstance(test.get(k), float)))
        truth_test = (m.get("truth") or {}).get("test") or {}
        if "roc_auc" in truth_test:
            lines.append(f"  ROC-AUC against true quality (held-out authors): {truth_test['roc_auc']:.3f}")
        lines.append(f"  metrics: {storage.uri(latest['metrics_key'])}")
    lines.append("\n== where the tables live ==")
    for name, table in TABLES.items():
        lines.append(f"  {name:<11} {storage.uri(table.path)}/")
    if run:
        from pipeline.report import build_report

        lines.append(f"\nreport: {build_report(cfg, storage)}")
    lines.append('\ntry:  .venv/bin/likerank query "select label, count(*) n, avg(likes) likes, '
                 'avg(followers) followers from labels group by label"')
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""The hostile-server corpus as one table: case -> outcome -> rows lost.

    .venv/bin/python bench/reliability.py [--posts 150]

For every case of :mod:`simulator.hostile`, a fresh simulator serves the fault while the
scrape runs; then the fault is cleared and the scrape runs again (what a scheduler's next run
does). The outcome is how the images it hit ended (their ``downloads.status``) or how the run
ended; "rows lost" compares the posts stored after the rerun with the world's eligible posts
(the baseline: what a clean crawl keeps). The goal is 0 in every row, and no case may hang.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.pseudonym import register_simulator  # noqa: E402
from pipeline.core.storage import LocalStorage  # noqa: E402
from pipeline.core.tables import list_partitions, read_table  # noqa: E402
from pipeline.scrape.scrape import scrape  # noqa: E402
from simulator import start_server  # noqa: E402
from simulator.hostile import CASES, Case  # noqa: E402

DAY, TAG = "2025-06-02", "selfie"


def eligible(sim) -> set[str]:
    w, now_ms = sim.world, int(sim.now.timestamp() * 1000)
    return {p.id for p in w.posts if p.created_ms <= now_ms and p.kind == "photo" and TAG in p.tags
            and w.accounts[p.author].discoverable and w.accounts[p.author].indexable}


def run_case(case: Case, posts: int, root: Path) -> dict:
    sim = start_server(seed=7, posts=posts)
    register_simulator(sim.url)  # started here: the development key may hash its accounts
    try:
        cfg = load_config(overrides=[f"storage.root={root}"])
        cfg.scrape.allow_hosts = ["127.0.0.1", "localhost"]
        cfg.scrape.backfill_days, cfg.scrape.page_limit, cfg.scrape.backoff_s = 100000, 20, 0.01
        cfg.scrape.per_host_rps = 1000.0
        for k, v in case.scrape.items():
            setattr(cfg.scrape, k, v)
        os.environ[cfg.source.token_env] = "bench-token"
        fault = dict(case.fault)
        sim.set_fault(case.mode, fraction=fault.pop("fraction", 1.0), count=fault.pop("count", None),
                      scope=fault.pop("scope", None), **fault)
        t0 = time.monotonic()
        try:
            summary = scrape(cfg, sim.url, TAG, DAY)
            run = "stops: rate limited" if summary["stopped"].startswith("rate limited") else "ok"
        except Exception as exc:  # noqa: BLE001 - the table reports it
            run = f"fails: {type(exc).__name__}"
        seconds = time.monotonic() - t0
        storage = LocalStorage(root)
        statuses = Counter(r["status"] for r in read_table(storage, "downloads").to_pylist()) \
            if list_partitions(storage, "downloads") else Counter()
        leaked = [h for h in sim.credentials_seen() if not h.startswith("127.0.0.1")]
        sim.clear_faults()
        scrape(cfg, sim.url, TAG, DAY)
        ids = {r["post_id"] for r in read_table(storage, "posts").to_pylist()}
        hit = {s: n for s, n in statuses.items() if s != "ok"}
        return {"case": case.name, "expect": case.expect, "run": run, "hit rows": hit or "-",
                "token leaked to": leaked or "-", "s": seconds, "rows lost": len(eligible(sim) - ids)}
    finally:
        sim.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--posts", type=int, default=150, help="world size per case")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(CASES):
            rows.append(run_case(case, args.posts, Path(tmp) / str(i)))
    print(f"{'case':<22} {'expected':<16} {'run':<20} {'rows hit (status: n)':<28} {'token leaked':<13} "
          f"{'run s':>6} {'rows lost':>9}")
    for r in rows:
        print(f"{r['case']:<22} {r['expect']:<16} {r['run']:<20} {str(r['hit rows']):<28} "
              f"{str(r['token leaked to']):<13} {r['s']:>6.1f} {r['rows lost']:>9}")
    lost = sum(r["rows lost"] for r in rows)
    print(f"\nrows lost in all: {lost} (goal 0); longest case {max(r['s'] for r in rows):.1f} s")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

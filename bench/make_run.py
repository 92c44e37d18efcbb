"""How long `make run` takes on the default world, against its 10-minute budget.

Runs the real chain (`python -m likerank.orchestrate`: simulator, then every DAG through
`airflow dags test`) on a fresh storage root and Airflow home, and prints each stage's time
and the total as a ratio of the 600 s budget. `--posts N` for a smaller world.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 600.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--posts", type=int, default=5000, help="simulated world size (default 5000, make run's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="likerank-bench-run-") as tmp:
        env = dict(os.environ, AIRFLOW_HOME=f"{tmp}/airflow", LIKERANK_STORAGE__ROOT=f"{tmp}/data",
                   LIKERANK_SIMULATOR__POSTS=str(args.posts), AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
                   AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__PARALLELISM="2")
        airflow = str(Path(sys.executable).with_name("airflow"))
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "likerank.orchestrate"], env=env, cwd=tmp, capture_output=True, text=True)
        total = time.monotonic() - t0
    if p.returncode:
        print(p.stdout[-3000:], p.stderr[-3000:])
        return 1
    print(p.stdout[p.stdout.index("== likerank: the funnel =="):].split("== where the tables live ==")[0].rstrip())
    print()
    for name, secs in re.findall(r"^(\w+)\s+.*\n\s+ok in (\d+) s", p.stdout, flags=re.M):
        print(f"  {name:<20} {secs:>5} s")
    print(f"make run, {args.posts}-post world: {total:.0f} s = {total / BUDGET_S:.2f}x the {BUDGET_S:.0f} s budget "
          f"({'within' if total <= BUDGET_S else 'OVER'} budget)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

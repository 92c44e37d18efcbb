"""Short processes that read and write tables exit with code 0.

Airflow runs every task as a process of its own and marks it failed on any non-zero exit, so
a process that aborts, crashes or hangs at interpreter exit, after its work is done, fails
its task. Reads at exit are the risk: a LIMIT query, a ``head()`` or a reader loop that
stops early leave Arrow's reader threads with reads in flight while the interpreter
finalizes, and if those threads need Python then (a Python filesystem under the dataset),
the process ends in SIGABRT ("terminate called without an active exception"), SIGSEGV or a
hang in Arrow's thread-pool shutdown.

Each child here writes and reads ``engagement`` through :mod:`pipeline.core.tables` in one
shared storage root (so commits to the same table race, as concurrent tasks' do), queries a
dataset with DuckDB as :mod:`pipeline.core.query` does, and leaves exactly those early-stopped
reads behind at exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROCESSES = 50
AT_ONCE = 2  # the CI machine has 2 cores; more only queues behind them
#: A child takes ~2 s; one still running after this hung (a hang at exit is one failure mode).
CHILD_TIMEOUT_S = 30
#: No new child starts after this many failed: the verdict is in, and more hung children would
#: only add their timeouts.
STOP_AFTER_FAILURES = 5

CHILD = """
import sys
from datetime import datetime, timezone

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import tables
from pipeline.core.storage import LocalStorage

storage, me = LocalStorage(sys.argv[1]), sys.argv[2]
n = 5
now = datetime.now(timezone.utc)
rows = pa.table({
    "source": ["mastodon"] * n, "instance": ["https://x.example"] * n,
    "post_id": [f"{me}-{i}" for i in range(n)],
    "observed_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
    "likes": list(range(n)), "reposts": [0] * n, "replies": [0] * n, "views": [None] * n,
    "author_followers": [10] * n, "age_days": [1.0] * n,
})

# Writes: a merge into the partition every child shares (its commits race the others'), and
# a partition of its own.
tables.merge_rows(storage, "engagement", rows, partition_value="2026-01-01")
tables.write_partition(storage, "engagement", f"child-{me}", rows)

# Reads: the whole table, in which this child's rows are in both partitions.
table = tables.read_table(storage, "engagement")
mine = table.filter(pc.is_in(table["post_id"], rows["post_id"]))
assert mine.num_rows == 2 * n, mine.num_rows

# DuckDB over the dataset, as pipeline.core.query registers each table.
data = tables.dataset(storage, "engagement")
con = duckdb.connect()
con.register("engagement", data)
counts = dict(con.sql("select dt, count(*) from engagement where post_id like ? group by dt",
                      params=[f"{me}-%"]).fetchall())
assert counts == {"2026-01-01": n, f"child-{me}": n}, counts
# Reads that stop early and leave Arrow's reads in flight at exit: a LIMIT query (the
# connection closed, as run_query does), head(), and a reader left undrained.
con.sql("select * from engagement limit 1").fetchall()
con.close()
data.head(1)
reader = data.scanner(batch_size=1).to_reader()
reader.read_next_batch()
print("done", flush=True)
"""


@dataclass(frozen=True)
class Exit:
    child: int
    code: int | None  # None: still running after CHILD_TIMEOUT_S, then killed
    stdout: str
    stderr: str

    def describe(self) -> str:
        what = f"hung (killed after {CHILD_TIMEOUT_S} s)" if self.code is None else (
            f"killed by signal {-self.code}" if self.code < 0 else f"exit code {self.code}")
        return f"child {self.child}: {what}, stdout {self.stdout.strip()[-200:]!r}\n{self.stderr[-1500:]}"


def run_child(root: Path, child: int) -> Exit:
    # cwd is the repository: ``-c`` puts it first on sys.path, so the child imports this
    # checkout's pipeline package whatever else the environment has installed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CTX_")}
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(child)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return Exit(child, None, out, err)
    return Exit(child, proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.timeout(600)
def test_processes_reading_and_writing_tables_exit_0(tmp_path: Path) -> None:
    root = tmp_path / "store"
    exits: list[Exit] = []
    lock = threading.Lock()

    def one(child: int) -> None:
        with lock:
            if sum(e.code != 0 for e in exits) >= STOP_AFTER_FAILURES:
                return
        result = run_child(root, child)
        with lock:
            exits.append(result)

    started = time.monotonic()
    with ThreadPoolExecutor(AT_ONCE) as pool:
        list(pool.map(one, range(PROCESSES)))
    failed = sorted((e for e in exits if e.code != 0), key=lambda e: e.child)
    assert not failed, (f"{len(failed)} of {len(exits)} processes run did not exit with code 0 "
                        f"({time.monotonic() - started:.0f} s):\n\n" + "\n\n".join(e.describe() for e in failed))
    assert len(exits) == PROCESSES
    # Exit code 0 with the work undone would prove nothing: each child got to its end.
    undone = [e.child for e in exits if not e.stdout.strip().endswith("done")]
    assert not undone, f"children exited 0 without finishing: {undone}"

"""Kill and resume: ``kill -9`` a scrape, then a face detection, at 20 random points each,
resume after every kill, and compare the tables with a clean run's: no duplicate, no
missing and no changed row.

Each run is a child process (``python -c``) over the same simulator on loopback; the clean
run goes to a storage root of its own. The kill points are drawn, with a fixed seed, from
the length of the clean run, so they land anywhere from start-up to the last flush.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.core import keys
from pipeline.core.storage import LocalStorage
from pipeline.core.tables import list_partitions, read_table

REPO = Path(__file__).resolve().parents[2]
KILLS = 20
DAY = "2025-06-02"
TAG = "selfie"

pytestmark = pytest.mark.slow


def child_code(root: Path, sim_url: str, stage: str) -> str:
    common = ("from pipeline.core.config import load_config\n"
              f"cfg = load_config(overrides=['storage.root={root}', 'scrape.backfill_days=100000', "
              "'scrape.page_limit=10', 'scrape.threads=4', 'faces.shard_size=5', "
              "'faces.providers=CPUExecutionProvider'])\n"
              "cfg.scrape.allow_hosts = ['127.0.0.1']\n")
    if stage == "scrape":
        # Small flushes: a kill lands between durable flushes as often as inside one.
        return common + ("from pipeline.scrape.scrape import scrape\n"
                         f"scrape(cfg, '{sim_url}', '{TAG}', '{DAY}', flush_every=20)\n")
    return common + ("from pipeline.faces.detect_faces import detect_shard, plan_shards\n"
                     "for i, shas in enumerate(plan_shards(cfg)):\n"
                     f"    detect_shard(cfg, i, shas, '{DAY}')\n")


def run_child(code: str, *, kill_when: Callable[[float], bool] | None = None) -> float:
    """Run ``code`` in a child; SIGKILL it as soon as ``kill_when(elapsed_s)`` says so (polled
    every 20 ms). Returns its wall time."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("LIKERANK_STORAGE__ROOT", None)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if kill_when is None:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err.decode()[-3000:]
        else:
            while proc.poll() is None and time.monotonic() - t0 < 600:
                if kill_when(time.monotonic() - t0):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.02)
            proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return time.monotonic() - t0


def snapshot(root: Path) -> dict[str, Counter]:
    """Each table as a multiset of its content rows (run-specific timings left out)."""
    storage = LocalStorage(root)
    columns = {
        "posts": ["instance", "post_id", "author_key", "likes", "image_urls"],
        "engagement": ["instance", "post_id", "likes", "age_days"],
        "downloads": ["post_id", "url", "status", "sha256"],
        "images": ["sha256", "width", "height", "format"],
        "faces": ["sha256", "detector_id", "status", "n_faces"],
    }
    out = {}
    for table, cols in columns.items():
        rows = read_table(storage, table, columns=cols).to_pylist() if list_partitions(storage, table) else []
        out[table] = Counter(repr(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in r.items()))
                             for r in rows)
    return out


def assert_same_as_clean(got: dict[str, Counter], clean: dict[str, Counter], tables: list[str]) -> None:
    for table in tables:
        dupes = [r for r, n in got[table].items() if n > 1]
        assert not dupes, f"{table}: {len(dupes)} duplicated row(s), e.g. {dupes[0]}"
        missing, extra = clean[table] - got[table], got[table] - clean[table]
        assert not missing and not extra, f"{table}: {sum(missing.values())} missing, {sum(extra.values())} extra"


def kill_repeatedly(code: str, clean_s: float, rng: random.Random, rows: Callable[[], int], total: int,
                    progress: tuple[Callable[[], int], int] | None = None) -> list[int]:
    """Run ``code`` KILLS times and SIGKILL each run at a random point; return the table's row
    count after each kill.

    Half the points are times within what is left of a clean run (start-up included); half are
    "once the work has grown past a random point in the first half of what is left, plus up to
    0.1 s", which lands between and inside flushes however little the resumed run has left, and
    leaves work behind: however far a time-based kill let a run get, the runs still end in
    several distinct partial states (the test checks they did). ``progress`` is
    a cheaper measure of the work done and its total (default: ``rows``, ``total``), polled
    every 20 ms while a child runs."""
    done, end = progress or (rows, total)
    seen = []
    for i in range(KILLS):
        if i % 2 == 0:
            at = rng.uniform(0.2, max(0.3, clean_s * (1 - done() / end)))
            run_child(code, kill_when=lambda t, at=at: t >= at)
        else:
            now = done()
            first = min(now + 1, end - 1)
            target = rng.randint(first, max(first, now + (end - now) // 2))
            extra, reached = rng.uniform(0.0, 0.1), [None]

            def kill_when(t, target=target, extra=extra, reached=reached):
                if reached[0] is None and done() >= target:
                    reached[0] = t
                return reached[0] is not None and t >= reached[0] + extra

            run_child(code, kill_when=kill_when)
        seen.append(rows())
    return seen


def row_count(root: Path, table: str) -> Callable[[], int]:
    storage = LocalStorage(root)
    return lambda: read_table(storage, table, columns=[]).num_rows if list_partitions(storage, table) else 0


def test_kill_9_scrape_and_detection_then_resume(sim_server_factory, tmp_path):
    sim = sim_server_factory(posts=600)
    sim.set_fault("slow", scope="media", delay_s=0.02)  # a crawl of a few seconds: room for the kills
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    rng = random.Random(20261201)

    scrape_s = run_child(child_code(clean, sim.url, "scrape"))
    after_kills = kill_repeatedly(child_code(killed, sim.url, "scrape"), scrape_s, rng, row_count(killed, "posts"),
                                  sum(snapshot(clean)["posts"].values()))
    run_child(child_code(killed, sim.url, "scrape"))  # the resume that finishes
    got, want = snapshot(killed), snapshot(clean)
    assert want["posts"] and want["images"]
    # The kills did land mid-crawl: several distinct partial states were left behind.
    assert len({n for n in after_kills if 0 < n < sum(want["posts"].values())}) >= 3, after_kills
    assert_same_as_clean(got, want, ["posts", "engagement", "downloads", "images"])

    detect_s = run_child(child_code(clean, sim.url, "faces"))
    # One faces partition per shard: counting them is cheap enough to poll.
    shards = (lambda: len(list_partitions(LocalStorage(killed), "faces")),
              len(list_partitions(LocalStorage(clean), "faces")))
    after_kills = kill_repeatedly(child_code(killed, sim.url, "faces"), detect_s, rng, row_count(killed, "faces"),
                                  sum(snapshot(clean)["faces"].values()), progress=shards)
    run_child(child_code(killed, sim.url, "faces"))
    got, want = snapshot(killed), snapshot(clean)
    assert sum(want["faces"].values()) == sum(want["images"].values())
    assert len({n for n in after_kills if 0 < n < sum(want["faces"].values())}) >= 3, after_kills
    assert_same_as_clean(got, want, ["faces"])

    # Every indexed image has its bytes; no temp file of a killed writer is visible as data.
    storage = LocalStorage(killed)
    for row in read_table(storage, "images", columns=["sha256"]).to_pylist():
        assert storage.exists(keys.image_bytes(row["sha256"]))
    assert not [k for k in storage.list("") if "/.tmp-" in k]

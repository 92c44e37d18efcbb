"""Benchmark: the Delta tables against the previous release's one Parquet file per partition.

    .venv/bin/python bench/tables.py                          # all three at full size
    .venv/bin/python bench/tables.py --only commits --procs 4 --commits 10 --batch 200
    .venv/bin/python bench/tables.py --only forget --rows 300000 --forget-runs 1
    .venv/bin/python bench/tables.py --only scrape --posts 400 --runs 1

The previous release kept each partition as one ``data.parquet``, rewritten whole on every
change (read it, add or drop rows, write it back with an atomic rename). This release keeps
every table as a Delta table (:mod:`pipeline.core.tables`). Each figure below is printed beside
the previous release's way of doing the same thing, measured in the same run on the same disk,
and as a ratio.

1. **Concurrent commits** (``--only commits``). ``--procs`` processes (4), all started together
   (each imports everything, says it is ready, then waits for one "go"), each make
   ``--commits`` commits (50) of ``--batch`` rows (1,000) to one day of ``engagement``, with
   keys of their own: :func:`pipeline.core.tables.merge_rows` into a table that already exists.
   Each child counts the tries of every commit (it wraps ``tables._with_retries``): tries
   beyond one are commit conflicts retried with backoff; conflicts that delta-rs rebases by
   itself (``max_commit_retries``) are not seen there. A commit still conflicting after
   ``COMMIT_ATTEMPTS`` tries raises ``TableConflict`` to its caller (a task fails and is
   retried); the child counts it and goes on, so its rows count as lost, and the bench says
   how many rows were lost without any error. Printed: commits/s (all commits over the wall
   time from "go" to the last commit), tries that conflicted, the most tries one commit
   needed, commits that gave up, and the rows of that day at the end, which must be
   procs x commits x batch (200,000).
   *Previous release*: the same processes, rows and keys through its write path (read the
   day's ``data.parquet``, concatenate, keep the last row per key, rewrite it whole to a temp
   file and rename it over the old one), which silently loses the rows of a writer whose
   read came before another's rename. Goal: 0 rows lost with Delta. Medians over ``--commit-runs``
   runs (3), each on a fresh folder.

2. **Forget** (``--only forget``). A ``posts`` table of ``--rows`` synthetic rows (10 million;
   every column of the posts schema, 16-hex author keys drawn from ``--authors`` authors,
   1,000,000) spread over 365 daily partitions, written partition by partition with
   :func:`pipeline.core.tables.write_partition` (then checkpointed, as table maintenance
   does), and the same rows also in the previous release's layout, one zstd ``data.parquet``
   per day. Timed: :func:`pipeline.core.tables.delete_rows` of 100 author keys (one MERGE
   delete, as a forget does for ``posts``) followed by :func:`pipeline.core.tables.vacuum_now`;
   bytes rewritten are the sizes of the data files the delete commit added. *Previous
   release*: its forget read every partition file, dropped the authors' rows and rewrote each
   file that had some, whole. Each of ``--forget-runs`` runs (3) forgets another 100 authors
   (authors with posts, drawn at random), on both layouts in turn; medians are printed, and
   both must delete the same rows. Not timed: generating and writing the table, nor the rest of
   a forget (tombstones, the other tables). Goals: at least 5x less time than the full
   rewrite, and under 60 s here.

3. **Parallel scrape** (``--only scrape``). The simulator (its own process) serves a world of
   ``--posts`` statuses (1,200) over 4 hashtags, its media slowed by ``--media-delay`` seconds
   (0.3) per request so that the network, not the CPU, sets the pace. 4 ``likerank scrape``
   processes (one per hashtag, same instance, same day) run at once, against the same 4 run
   one after another: serial is the previous release's mode, whose DAG ran the scrape tasks
   one at a time because its read-modify-write partitions could not take concurrent writers.
   Both use this release's code, a fresh storage root per run, per-host limits opened up as in
   the concurrent-scrape test (one host here), and alternate which goes first; one untimed
   parallel warm-up run first renders every image in the simulator. Printed: wall time of
   each mode, the ratio serial/parallel (median of ``--runs``, 3), and per parallel run the
   posts lost (the eligible posts of the 4 hashtags by the simulator's truth, minus those
   stored) and the duplicated rows of ``posts`` and ``downloads``. Goal: 0 lost, 0
   duplicated, and the ratio printed (the machine's cores bound it: 4 processes share them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DAY = "2025-06-02"
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
TAGS = ("selfie", "headshot", "faces", "mirror")  # none is one of the simulator's extra tags


def load() -> str:
    """The machine's load averages: the bench shares its cores, so say how busy they were."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def spread(values: list[float], fmt: str = ".2f") -> str:
    """``median (min..max)``: the median is the figure to quote, the range says how noisy it was."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


# --------------------------------------------------------------------------- 1. concurrent commits


def engagement_rows(proc: int, commit: int, n: int) -> pa.Table:
    """``n`` engagement rows whose post ids belong to this process and commit only."""
    i = np.arange(n, dtype=np.int64)
    post_id = pa.array(10**17 + proc * 10**12 + commit * 10**6 + i).cast(pa.string())
    rng = np.random.default_rng(proc * 1000 + commit)
    return pa.table({
        "source": pa.array(["mastodon"] * n, pa.string()),
        "instance": pa.array(["https://bench.example"] * n, pa.string()),
        "post_id": post_id,
        "observed_at": pa.array(np.full(n, 1748822400_000000, dtype=np.int64)).cast(pa.timestamp("us", tz="UTC")),
        "likes": rng.poisson(20, n).astype(np.int64),
        "reposts": rng.poisson(2, n).astype(np.int64),
        "replies": rng.poisson(1, n).astype(np.int64),
        "views": pa.nulls(n, pa.int64()),
        "author_followers": rng.integers(0, 10**5, n),
        "age_days": rng.uniform(0, 30, n),
    })


def child_commits(mode: str, root: str, proc: int, commits: int, batch: int) -> int:
    """One writer: wait for "go" on stdin, make the commits, print JSON figures."""
    import pyarrow.parquet as pq

    from pipeline.core import tables
    from pipeline.core.schemas import conform
    from pipeline.core.storage import LocalStorage

    storage = LocalStorage(root)
    tries = {"attempts": 0, "commits": 0, "failed": 0, "most": 0}
    original = tables._with_retries

    def counting(table, what, attempt):
        mine = [0]

        def counted():
            tries["attempts"] += 1
            mine[0] += 1
            tries["most"] = max(tries["most"], mine[0])
            return attempt()

        out = original(table, what, counted)
        tries["commits"] += 1
        return out

    tables._with_retries = counting
    key = f"engagement/dt={DAY}/data.parquet"
    pieces = [engagement_rows(proc, j, batch) for j in range(commits)]

    def previous_release(rows: pa.Table) -> None:
        """The previous release's merge: read the partition's one file, add, dedupe, rewrite it."""
        import io

        if storage.exists(key):
            old = conform("engagement", pq.read_table(io.BytesIO(storage.get_bytes(key))))
            rows = pa.concat_tables([old, conform("engagement", rows)])
        rows = tables.last_per_key(rows, ["instance", "post_id"])
        buf = io.BytesIO()
        pq.write_table(conform("engagement", rows), buf, compression="zstd")
        storage.put_bytes(key, buf.getvalue())
        tries["attempts"] += 1
        tries["commits"] += 1
        tries["most"] = 1

    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    for rows in pieces:
        if mode == "delta":
            try:
                tables.merge_rows(storage, "engagement", rows, partition_value=DAY, operation="bench commit")
            except tables.TableConflict:
                tries["failed"] += 1
        else:
            previous_release(rows)
    print(json.dumps({"start": start, "end": time.time(), **tries}), flush=True)
    return 0


def commit_run(mode: str, root: Path, procs: int, commits: int, batch: int) -> dict:
    """Start ``procs`` writers, let them go at once, and count what the day holds afterwards."""
    import pyarrow.parquet as pq

    from pipeline.core import tables
    from pipeline.core.storage import LocalStorage

    storage = LocalStorage(root)
    if mode == "delta":  # the table exists, as in production: no writer races to create it
        tables.write_partition(storage, "engagement", DAY, engagement_rows(0, 0, 0))
        first_version = tables.version(storage, "engagement")
    children = [subprocess.Popen([sys.executable, __file__, "--child", "commits", mode, str(root), str(p),
                                  str(commits), str(batch)], cwd=REPO, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for p in range(procs)]
    for c in children:
        if c.stdout.readline().strip() != "ready":
            raise SystemExit(f"commit writer failed to start: {c.communicate()[1][-2000:]}")
    for c in children:
        c.stdin.write("go\n")
        c.stdin.flush()
    results = []
    for c in children:
        out, err = c.communicate()
        if c.returncode:
            raise SystemExit(f"commit writer failed: {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    if mode == "delta":
        day = tables.read_table(storage, "engagement", partitions=[DAY], columns=["instance", "post_id"])
        versions = tables.version(storage, "engagement") - first_version
    else:
        day = pq.read_table(root / f"engagement/dt={DAY}/data.parquet", columns=["instance", "post_id"])
        versions = None
    distinct = day.group_by(["instance", "post_id"]).aggregate([]).num_rows
    commits_made = sum(r["commits"] for r in results)
    return {"seconds": seconds, "commits": commits_made, "rate": commits_made / seconds,
            "conflicts": sum(r["attempts"] - r["commits"] for r in results),
            "failed": sum(r["failed"] for r in results), "most": max(r["most"] for r in results),
            "rows": day.num_rows, "distinct": distinct,
            "versions": versions}


def bench_commits(a, work: Path) -> bool:
    from pipeline.core.tables import COMMIT_ATTEMPTS

    want = a.procs * a.commits * a.batch
    print(f"\n== 1. concurrent commits: {a.procs} processes x {a.commits} commits x {a.batch:,} rows "
          f"into engagement/dt={DAY} (load {load()})")
    runs: dict[str, list[dict]] = {"delta": [], "parquet": []}
    for k in range(1, a.commit_runs + 1):
        for mode in ("delta", "parquet") if k % 2 else ("parquet", "delta"):
            root = work / f"commits-{mode}-{k}"
            r = commit_run(mode, root, a.procs, a.commits, a.batch)
            shutil.rmtree(root, ignore_errors=True)
            runs[mode].append(r)
            label = "Delta merge_rows" if mode == "delta" else "previous release"
            extra = (f", {r['conflicts']} tries conflicted (most tries of one commit: {r['most']} of "
                     f"{COMMIT_ATTEMPTS}), {r['failed']} commits gave up (TableConflict, raised to the caller), "
                     f"{r['versions']} table versions" if mode == "delta" else "")
            print(f"run {k} {label:17}: {r['commits']} commits in {r['seconds']:.1f} s = {r['rate']:.1f} commits/s"
                  f"{extra}; rows at the end {r['rows']:,} of {want:,} (lost {want - r['distinct']:,}, "
                  f"duplicated {r['rows'] - r['distinct']:,})")
    d, p = runs["delta"], runs["parquet"]
    lost_d = [want - r["distinct"] for r in d]
    lost_p = [want - r["distinct"] for r in p]
    dup_d = [r["rows"] - r["distinct"] for r in d]
    silent = max(want - r["distinct"] - r["failed"] * a.batch for r in d)
    print(f"Delta (this release)     : {spread([r['rate'] for r in d], '.1f')} commits/s, conflicting tries "
          f"{spread([r['conflicts'] for r in d], '.0f')}, rows {spread([r['rows'] for r in d], ',.0f')} of {want:,}: "
          f"lost {max(lost_d):,} (silently: {silent:,}; the rest in commits that raised TableConflict), "
          f"duplicated {max(dup_d):,}")
    print(f"one file per partition   : {spread([r['rate'] for r in p], '.1f')} commits/s, rows "
          f"{spread([r['rows'] for r in p], ',.0f')} of {want:,}: lost {spread(lost_p, ',.0f')} "
          f"({statistics.median(lost_p) / want:.0%}) by concurrent read-modify-write")
    rate = statistics.median([r["rate"] for r in d]) / statistics.median([r["rate"] for r in p])
    print(f"ratio Delta / previous   : {rate:.2f}x commits/s   (goal: 0 rows lost with Delta: "
          f"{'met' if max(lost_d) == 0 and max(dup_d) == 0 else 'MISSED'})")
    return max(lost_d) == 0 and max(dup_d) == 0


# --------------------------------------------------------------------------- 2. forget


def hex_strings(raw: np.ndarray) -> pa.Array:
    """Fixed-width lowercase hex strings from a (n, k) uint8 matrix, built straight into Arrow buffers."""
    n, k = raw.shape
    chars = np.empty((n, 2 * k), dtype=np.uint8)
    chars[:, 0::2], chars[:, 1::2] = HEX[raw >> 4], HEX[raw & 15]
    offsets = np.arange(n + 1, dtype=np.int32) * (2 * k)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(chars)])


def list_array(values: pa.Array, counts: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


VOCAB = pa.array(["selfie", "portrait", "me", "photography", "nofilter", "friends", "travel", "happy", "love",
                  "smile", "summer", "art", "fediverse", "weekend", "coffee", "cat"])


def synthetic_posts(day: int, n: int, first_id: int, authors: pa.Array, rng: np.random.Generator):
    """``n`` posts of day number ``day`` in the posts schema, and their author indices."""
    import pyarrow.compute as pc

    from pipeline.core.schemas import conform

    base_us = (1717200000 + day * 86400) * 1_000_000  # 2024-06-01 + day
    created = base_us + np.sort(rng.integers(0, 86400 * 1_000_000, n))
    who = rng.integers(0, len(authors), n)
    post_id = pa.array(10**17 + (first_id + np.arange(n, dtype=np.int64)) * 7919).cast(pa.string())
    n_tags = np.minimum(1 + rng.poisson(1.2, n), 8).astype(np.int32)
    tag_values = VOCAB.take(pa.array(rng.integers(0, len(VOCAB), int(n_tags.sum()))))
    n_images = (1 + np.minimum(rng.poisson(0.35, n), 3)).astype(np.int32)
    owner = np.repeat(np.arange(n), n_images)
    image_no = np.arange(len(owner)) - np.repeat(np.cumsum(n_images) - n_images, n_images)
    urls = pc.binary_join_element_wise("https://files.mastodon.example/media_attachments/",
                                       post_id.take(pa.array(owner)),
                                       pa.array(image_no).cast(pa.string()), ".jpg", "")
    followers = np.clip(np.round(np.exp(rng.normal(6.5, 1.5, n))), 0, 10**7).astype(np.int64)
    language = pa.array(np.array(["en", "de", "fr", "es", "ja", "pt"])[rng.integers(0, 6, n)])
    language = pc.if_else(pa.array(rng.random(n) < 0.1), pa.scalar(None, pa.string()), language)
    ts = pa.timestamp("us", tz="UTC")
    rows = pa.table({
        "source": pa.array(["mastodon"] * n, pa.string()),
        "instance": pa.array(np.array(["https://mastodon.social", "https://mas.to", "https://fosstodon.org"])
                             [rng.integers(0, 3, n)]),
        "hashtag": pa.array(["selfie"] * n, pa.string()),
        "post_id": post_id,
        "created_at": pa.array(created).cast(ts),
        "author_key": authors.take(pa.array(who)),
        "author_followers": followers,
        "tags": list_array(tag_values, n_tags),
        "n_tags": n_tags,
        "likes": rng.poisson(0.1 * followers**0.8).astype(np.int64),
        "reposts": rng.poisson(1.0, n).astype(np.int64),
        "replies": rng.poisson(0.5, n).astype(np.int64),
        "views": pa.nulls(n, pa.int64()),
        "image_urls": list_array(urls, n_images),
        "sensitive": rng.random(n) < 0.05,
        "language": language,
        "scraped_at": pa.array(created + 3600 * 1_000_000).cast(ts),
    })
    return conform("posts", rows), who


def day_name(day: int) -> str:
    from datetime import date, timedelta

    return (date(2024, 6, 1) + timedelta(days=day)).isoformat()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet") if p.is_file())


def add_actions(storage) -> dict[str, int]:
    from pipeline.core import tables

    actions = pa.table(tables.open_table(storage, "posts").get_add_actions(flatten=True)).to_pydict()
    return dict(zip(actions["path"], actions["size_bytes"], strict=True))


def forget_delta(storage, doomed: pa.Table) -> dict:
    from pipeline.core import tables

    before = add_actions(storage)
    t0 = time.perf_counter()
    deleted = tables.delete_rows(storage, "posts", doomed)
    t1 = time.perf_counter()
    tables.vacuum_now(storage, "posts")
    seconds = time.perf_counter() - t0
    after = add_actions(storage)
    added = set(after) - set(before)
    return {"seconds": seconds, "delete_s": t1 - t0, "rows": deleted, "bytes": sum(after[p] for p in added),
            "files_added": len(added), "files_removed": len(set(before) - set(after))}


def forget_previous(storage, old_root: Path, doomed: pa.Table) -> dict:
    """The previous release's forget of ``posts``: every partition file read, each that has any of
    the authors' rows rewritten whole without them (atomic rename)."""
    import io

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.core.schemas import conform

    values = doomed["author_key"].combine_chunks()
    t0 = time.perf_counter()
    rows = written = rewritten = 0
    for path in sorted((old_root / "posts").glob("dt=*/data.parquet")):
        t = conform("posts", pq.read_table(path))
        drop = pc.fill_null(pc.is_in(t["author_key"], value_set=values), False)
        k = pc.sum(drop).as_py() or 0
        if k:
            buf = io.BytesIO()
            pq.write_table(t.filter(pc.invert(drop)), buf, compression="zstd")
            storage.put_bytes(str(path.relative_to(old_root)), buf.getvalue())
            rows, written, rewritten = rows + k, written + buf.tell(), rewritten + 1
    return {"seconds": time.perf_counter() - t0, "rows": rows, "bytes": written, "files": rewritten}


def bench_forget(a, work: Path) -> bool:
    import pyarrow.parquet as pq

    from pipeline.core import tables
    from pipeline.core.storage import LocalStorage

    days = 365
    print(f"\n== 2. forget 100 authors of {a.rows:,} posts over {days} daily partitions (load {load()})")
    rng = np.random.default_rng(20250602)
    authors = hex_strings(rng.integers(0, 256, size=(a.authors, 8), dtype=np.uint8))
    delta_root, old_root = work / "forget-delta", work / "forget-previous"
    storage, old = LocalStorage(delta_root), LocalStorage(old_root)
    used = np.zeros(a.authors, dtype=bool)
    t0 = time.perf_counter()
    first = 0
    for d in range(days):
        n = a.rows // days + (d < a.rows % days)
        rows, who = synthetic_posts(d, n, first, authors, rng)
        first += n
        used[who] = True
        tables.write_partition(storage, "posts", day_name(d), rows)
        path = old_root / f"posts/dt={day_name(d)}/data.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows, path, compression="zstd")  # the previous release's write_partition
        if d % 100 == 99:
            tables.open_table(storage, "posts").create_checkpoint()  # as table maintenance does
        del rows, who
    tables.open_table(storage, "posts").create_checkpoint()
    print(f"generated and wrote both layouts in {time.perf_counter() - t0:.0f} s (not timed): Delta "
          f"{len(add_actions(storage))} files, {folder_bytes(delta_root / 'posts') / 2**20:,.0f} MB; previous "
          f"{days} files, {folder_bytes(old_root / 'posts') / 2**20:,.0f} MB; {int(used.sum()):,} authors with posts")
    picked = rng.choice(np.flatnonzero(used), size=100 * a.forget_runs, replace=False)
    delta_runs, old_runs = [], []
    ok = True
    for k in range(a.forget_runs):
        doomed = pa.table({"author_key": authors.take(pa.array(picked[100 * k:100 * (k + 1)]))})
        order = ("delta", "previous") if k % 2 == 0 else ("previous", "delta")
        for mode in order:
            if mode == "delta":
                r = forget_delta(storage, doomed)
                delta_runs.append(r)
                print(f"run {k + 1} Delta delete+vacuum : {r['seconds']:6.2f} s (delete {r['delete_s']:.2f} s), "
                      f"{r['rows']:,} rows deleted, {r['bytes'] / 2**20:,.1f} MB rewritten in {r['files_added']} "
                      f"files ({r['files_removed']} files replaced)")
            else:
                r = forget_previous(old, old_root, doomed)
                old_runs.append(r)
                print(f"run {k + 1} previous rewrite    : {r['seconds']:6.2f} s, {r['rows']:,} rows deleted, "
                      f"{r['bytes'] / 2**20:,.1f} MB rewritten in {r['files']} files")
        ok &= delta_runs[-1]["rows"] == old_runs[-1]["rows"]
    dt = statistics.median(r["seconds"] for r in delta_runs)
    ot = statistics.median(r["seconds"] for r in old_runs)
    db = statistics.median(r["bytes"] for r in delta_runs)
    ob = statistics.median(r["bytes"] for r in old_runs)
    delta_mb, old_mb = folder_bytes(delta_root / "posts"), folder_bytes(old_root / "posts")
    print(f"Delta delete_rows + vacuum_now : {spread([r['seconds'] for r in delta_runs])} s, "
          f"{db / 2**20:,.1f} MB rewritten (median of {len(delta_runs)}; {db / delta_mb:.0%} of the table's "
          f"{delta_mb / 2**20:,.0f} MB)")
    print(f"previous full rewrite          : {spread([r['seconds'] for r in old_runs])} s, "
          f"{ob / 2**20:,.1f} MB rewritten (median of {len(old_runs)}; {ob / old_mb:.0%} of its {old_mb / 2**20:,.0f} MB)")
    print(f"ratio previous / Delta         : {ot / dt:.2f}x time, {ob / max(db, 1):.2f}x bytes rewritten; same rows "
          f"deleted: {'yes' if ok else 'NO'}   (goals: >= 5x less time: {'met' if ot / dt >= 5 else 'MISSED'}; "
          f"< 60 s: {'met' if dt < 60 else 'MISSED'})")
    shutil.rmtree(delta_root, ignore_errors=True)
    shutil.rmtree(old_root, ignore_errors=True)
    return ok


# --------------------------------------------------------------------------- 3. parallel scrape


SERVER = """
import sys
from simulator import build_world, start_server
world = build_world(seed=int(sys.argv[1]), posts=int(sys.argv[2]), hashtags=tuple(sys.argv[4].split(",")))
sim = start_server(world, image_cache_mb=1024)
sim.set_fault("slow", scope="media", delay_s=float(sys.argv[3]))
print(sim.url, flush=True)
sim.serve_until_stopped()
"""


def eligible(world, tag: str) -> set[str]:
    """Ids of the statuses a full crawl of ``tag`` keeps (the simulator's truth)."""
    now_ms = int(world.params.now.timestamp() * 1000)
    return {p.id for p in world.posts
            if p.created_ms <= now_ms and p.kind == "photo" and tag in p.tags
            and world.accounts[p.author].discoverable and world.accounts[p.author].indexable}


def scrape_cmd(root: Path, url: str, tag: str) -> list[str]:
    settings = [f"storage.root={root}", "scrape.allow_hosts=127.0.0.1", "scrape.backfill_days=100000",
                "scrape.per_host_rps=1000", "scrape.per_host_concurrency=8"]
    return [sys.executable, "-m", "likerank.cli.main", *[x for s in settings for x in ("--set", s)],
            "scrape", "--json", "--instance", url, "--tag", tag, "--date", DAY]


def scrape_run(root: Path, url: str, parallel: bool) -> float:
    from pipeline.core.pseudonym import register_simulator

    env = {k: v for k, v in os.environ.items() if not k.startswith("LIKERANK_")}
    register_simulator(url, env)  # started by this bench: the development key may hash its accounts

    def start(tag: str) -> subprocess.Popen:
        return subprocess.Popen(scrape_cmd(root, url, tag), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def finish(p: subprocess.Popen) -> None:
        out, err = p.communicate(timeout=1800)
        if p.returncode:
            raise SystemExit(f"scrape failed: {err[-2000:]}")

    t0 = time.perf_counter()
    if parallel:
        for p in [start(tag) for tag in TAGS]:
            finish(p)
    else:
        for tag in TAGS:
            finish(start(tag))
    return time.perf_counter() - t0


def stored(root: Path, want: set[str]) -> dict:
    from pipeline.core import tables
    from pipeline.core.storage import LocalStorage

    storage = LocalStorage(root)
    posts = tables.read_table(storage, "posts", columns=["instance", "post_id"])
    refs = posts.group_by(["instance", "post_id"]).aggregate([])
    downloads = tables.read_table(storage, "downloads", columns=["post_id", "url"])
    ids = set(refs["post_id"].to_pylist())
    return {"rows": posts.num_rows, "lost": len(want - ids), "extra": len(ids - want),
            "dup": posts.num_rows - refs.num_rows,
            "dup_downloads": downloads.num_rows - downloads.group_by(["post_id", "url"]).aggregate([]).num_rows}


def bench_scrape(a, work: Path) -> bool:
    from simulator import build_world

    print(f"\n== 3. parallel scrape: {len(TAGS)} hashtags ({', '.join(TAGS)}) of a {a.posts:,}-status world, "
          f"media delayed {a.media_delay} s (load {load()})")
    world = build_world(seed=a.seed, posts=a.posts, hashtags=TAGS)
    want = set().union(*(eligible(world, t) for t in TAGS))
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(a.seed), str(a.posts), str(a.media_delay),
                               ",".join(TAGS)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    ok = True
    try:
        url = server.stdout.readline().strip()
        print(f"simulator {url}: {len(want)} eligible posts "
              f"({', '.join(f'{t} {len(eligible(world, t))}' for t in TAGS)})")
        t = scrape_run(work / "scrape-warm", url, parallel=True)
        shutil.rmtree(work / "scrape-warm", ignore_errors=True)
        print(f"warm-up (parallel, renders every image; not counted): {t:.1f} s")
        ratios, serial, parallel = [], [], []
        for k in range(1, a.runs + 1):
            times = {}
            for mode in ("serial", "parallel") if k % 2 else ("parallel", "serial"):
                root = work / f"scrape-{mode}-{k}"
                times[mode] = scrape_run(root, url, parallel=mode == "parallel")
                got = stored(root, want)
                shutil.rmtree(root, ignore_errors=True)
                ok &= got["lost"] == 0 and got["dup"] == 0 and got["dup_downloads"] == 0 and got["extra"] == 0
                print(f"run {k} {mode:8}: {times[mode]:6.1f} s; posts {got['rows']} of {len(want)} expected: lost "
                      f"{got['lost']}, unexpected {got['extra']}, duplicated {got['dup']}; duplicated downloads "
                      f"{got['dup_downloads']}")
            serial.append(times["serial"])
            parallel.append(times["parallel"])
            ratios.append(times["serial"] / times["parallel"])
        print(f"serial (previous release's mode): {spread(serial, '.1f')} s; parallel: {spread(parallel, '.1f')} s")
        print(f"ratio serial / parallel, per run: {spread(ratios)}x on {os.cpu_count()} cores   "
              f"(goal: 0 rows lost or duplicated: {'met' if ok else 'MISSED'})")
    finally:
        server.terminate()
        server.wait(timeout=10)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("commits", "forget", "scrape"), action="append",
                    help="run only this part (repeatable; default: all three)")
    ap.add_argument("--procs", type=int, default=4, help="concurrent writers (commits)")
    ap.add_argument("--commits", type=int, default=50, help="commits per writer")
    ap.add_argument("--batch", type=int, default=1000, help="rows per commit")
    ap.add_argument("--commit-runs", type=int, default=3, help="runs of each layout (commits); medians are quoted")
    ap.add_argument("--rows", type=int, default=10_000_000, help="posts in the forget table")
    ap.add_argument("--authors", type=int, default=1_000_000, help="distinct authors in the forget table")
    ap.add_argument("--forget-runs", type=int, default=3, help="forgets of 100 other authors each (medians quoted)")
    ap.add_argument("--posts", type=int, default=1200, help="statuses in the simulator's world (scrape)")
    ap.add_argument("--media-delay", type=float, default=0.3, help="seconds the simulator delays each media request")
    ap.add_argument("--seed", type=int, default=5, help="the simulator world's seed")
    ap.add_argument("--runs", type=int, default=3, help="(serial, parallel) scrape pairs; medians are quoted")
    ap.add_argument("--workdir", default=None, help="folder for the tables (default: a temporary one)")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _, mode, root, proc, commits, batch = a.child
        return child_commits(mode, root, int(proc), int(commits), int(batch))

    only = a.only or ["commits", "forget", "scrape"]
    work = Path(tempfile.mkdtemp(prefix="likerank-bench-tables-", dir=a.workdir))
    print(f"{os.cpu_count()} cores; load average (1, 5, 15 min) at start: {load()}")
    ok = True
    try:
        if "commits" in only:
            ok &= bench_commits(a, work)
        if "forget" in only:
            ok &= bench_forget(a, work)
        if "scrape" in only:
            ok &= bench_scrape(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average (1, 5, 15 min) at the end: {load()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

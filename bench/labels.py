"""Benchmark: the labeler on N synthetic posts vs a naive pandas ``groupby().apply()`` of the same rule.

    .venv/bin/python bench/labels.py              # 10 million posts (goals: <= 5 s, <= 3.5 GB, >= 20x naive)
    .venv/bin/python bench/labels.py --rows 200000

What is timed: :func:`labeling.build_labels.label_run` on an in-memory candidates table
(filters, duplicate-image collapse, exposure, the two sorts, ranks, splits) and every slice of
the LABELS rows it yields, built as ``build_labels`` builds them to write them; not the data
generation, not Parquet encoding or I/O. The candidates are generated once and written to a
temporary Arrow file; each timed run is a fresh process that reads it and labels it, so the
median and the spread of ``--runs`` runs are reported, and each run's peak RSS includes the
resident input, as a real run's would. One untimed warm-up run goes first (``--warmup``; its
time is printed): on this kind of VM the first process to touch gigabytes after a pause took
up to twice as long, the host faulting back memory the guest had freed. Posts look like the project's: 18-digit Mastodon ids,
16-hex author keys (one author per 5 posts), 64-hex image sha256s with 0.1% re-posted images,
log-normal followers, 5% too young, 2% without a face; 70% from one source, 30% from another
(groups never mix sources); rows in post_id order, as the pipeline reads them (``--shuffled``:
random order, which costs one more sort).

The naive reference runs the same rule (filters, duplicate collapse, exposure sort per source,
then ``groupby(group_id).apply`` ranking each group) on the first ``--naive-rows`` posts and is
scaled linearly to N. Its cost is dominated by the per-group Python call, linear in the number
of groups, while its sorts grow n log n, so the linear scaling flatters the naive side. It also
skips the split assignment. Both are checked to give the same (group, rank) on the sample.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labeling.build_labels import label_candidates, label_run  # noqa: E402
from labeling.eligibility import CANDIDATES  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402

HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hex_strings(raw: np.ndarray) -> pa.Array:
    """Fixed-width lowercase hex strings from a (n, k) uint8 matrix, built straight into Arrow buffers."""
    n, k = raw.shape
    chars = np.empty((n, 2 * k), dtype=np.uint8)
    chars[:, 0::2], chars[:, 1::2] = HEX[raw >> 4], HEX[raw & 15]
    offsets = np.arange(n + 1, dtype=np.int32) * (2 * k)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(chars)])


def synthetic_candidates(n: int, seed: int = 0, shuffled: bool = False) -> pa.Table:
    """Candidates in post_id order, as :func:`labeling.eligibility.read_candidates` returns them;
    ``shuffled``: in random order, as a bring-your-own file may be."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64)
    post_id = pa.array(10**17 + (rng.permutation(ids) if shuffled else ids) * 7919).cast(pa.string())
    n_authors = max(n // 5, 1)
    authors = hex_strings(rng.integers(0, 256, size=(n_authors, 8), dtype=np.uint8))
    author_key = authors.take(pa.array(rng.integers(0, n_authors, n)))
    raw = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    reposted = rng.random(n) < 0.001
    raw[reposted] = raw[rng.integers(0, n, int(reposted.sum()))]
    sha = hex_strings(raw)
    del raw
    followers = np.clip(np.round(np.exp(rng.normal(6.5, 1.5, n))), 0, 10**7).astype(np.int64)
    n_tags = np.minimum(1 + rng.poisson(1.0, n), 12).astype(np.int32)
    likes = rng.poisson(0.1 * followers**0.8 * np.exp(rng.normal(0, 1, n))).astype(np.int64)
    age = np.where(rng.random(n) < 0.05, rng.uniform(0, 30, n), rng.uniform(30, 400, n))
    n_faces = np.where(rng.random(n) < 0.02, 0, 1).astype(np.int32)
    source = pa.DictionaryArray.from_arrays((rng.random(n) < 0.3).astype(np.int32), ["mastodon", "bluesky"])
    return pa.table({
        "post_id": post_id, "source": source, "author_key": author_key, "image_sha256": sha, "likes": likes,
        "followers": followers, "n_tags": n_tags, "age_days": age, "views": pa.nulls(n, pa.int64()),
        "n_faces": n_faces, "face_share": np.full(n, 0.1),
    }).cast(CANDIDATES)


def naive_labels(df: pd.DataFrame, cfg) -> pd.DataFrame:
    """The rule with pandas and one Python call per group: the reference implementation."""
    lab, G = cfg.labeling, cfg.labeling.group_size
    df = df[(df["age_days"] >= lab.min_age_days) & df["followers"].between(lab.min_followers, lab.max_followers)
            & (df["n_tags"] <= lab.max_tags) & (df["n_faces"] >= cfg.faces.min_faces)]
    df = df.sort_values("post_id").drop_duplicates("image_sha256", keep="first")
    df = df.assign(exposure=df["followers"] * (1 + lab.tag_bonus * (df["n_tags"] - 1).clip(lower=0)),
                   source=df["source"].astype(str))
    parts = []
    for _, part in sorted(df.groupby("source"), key=lambda kv: kv[0]):  # groups never mix sources
        part = part.sort_values(["exposure", "post_id"], ascending=[False, True], kind="stable")
        parts.append(part.iloc[: len(part) // G * G])
    df = pd.concat(parts)
    df = df.assign(group_id=np.arange(len(df)) // G)

    def rank_group(g: pd.DataFrame) -> pd.DataFrame:
        g = g.sort_values(["likes", "post_id"])
        ranks = np.arange(1, len(g) + 1)
        return g.assign(rank_in_group=ranks, label=(ranks > G // 2).astype(int))

    # Grouping by the values, not the column name, keeps group_id in each group (pandas 3).
    return df.groupby(df["group_id"].to_numpy(), group_keys=False).apply(rank_group)


def fresh_memory_seconds_per_gb() -> float:
    """Seconds to allocate and first touch 1 GB: what each new large array costs on this machine.

    The labeler allocates a few GB at 10M rows, so on a VM that faults pages in slowly this,
    not the arithmetic, sets the spread between runs.
    """
    t0 = time.perf_counter()
    block = np.ones(1 << 27)  # 2**27 float64 = 1 GiB, written once
    seconds = time.perf_counter() - t0
    del block
    return seconds


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(path: str, cfg) -> int:
    """One timed run in this fresh process: read the candidates, label them, print JSON."""
    import json

    import pyarrow.feather as feather

    cands = feather.read_table(path, memory_map=False)  # the input, resident like a real run's
    input_rss = peak_rss_mb()
    t0 = time.perf_counter()
    run = label_run(cands, cfg, "bench")
    for piece in run.slices():  # what build_labels hands the Parquet writer, one slice at a time
        del piece
    seconds = time.perf_counter() - t0
    summary = run.summary
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "input_rss_mb": input_rss,
                      "rows_out": summary["rows_out"], "groups": summary["groups"],
                      "dropped": summary["rows_dropped"]}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--naive-rows", type=int, default=200_000, help="sample the naive reference runs on")
    ap.add_argument("--runs", type=int, default=3, help="timed runs, each in a fresh process (the median is reported)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed runs first (printed): on a VM whose host takes back freed memory, the first "
                         "process to touch gigabytes after a while pays the host's page faults, up to 2x")
    ap.add_argument("--shuffled", action="store_true",
                    help="rows in random order (a bring-your-own file) instead of post_id order (the pipeline's)")
    ap.add_argument("--child", metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = load_config(env={})
    if args.child:
        return child(args.child, cfg)

    import json
    import statistics
    import subprocess
    import tempfile

    import pyarrow.feather as feather

    t0 = time.perf_counter()
    cands = synthetic_candidates(args.rows, shuffled=args.shuffled)
    with tempfile.TemporaryDirectory(prefix="likerank-bench-labels-") as tmp:
        path = f"{tmp}/candidates.arrow"
        feather.write_feather(cands, path, compression="uncompressed")
        print(f"generated {args.rows:,} candidates in {'random' if args.shuffled else 'post_id'} order ({cands.nbytes / 2**20:,.0f} MB in memory) in "
              f"{time.perf_counter() - t0:.1f} s (not timed)")
        k = min(args.naive_rows, args.rows)
        sample = cands.slice(0, k).combine_chunks()  # a copy: the full table is freed before the timed runs
        del cands
        # Flushed before timing: the kernel's write-back of the 1.6 GB file must not overlap the first run.
        with open(path, "rb+") as written:
            os.fsync(written.fileno())
        runs = []
        for _ in range(args.warmup + args.runs):
            out = subprocess.run([sys.executable, __file__, "--child", path, "--rows", str(args.rows)],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        warmups, runs = runs[:args.warmup], runs[args.warmup:]
        if warmups:
            shown = ", ".join(f"{r['seconds']:.2f}" for r in warmups)
            print(f"warm-up run{'s' if len(warmups) > 1 else ''} (not counted): {shown} s")
    times = [r["seconds"] for r in runs]
    rss = [r["peak_rss_mb"] for r in runs]
    fast = statistics.median(times)
    last = runs[-1]
    print(f"likerank labeler : {fast:6.2f} s median of {len(runs)} fresh processes for {args.rows:,} posts "
          f"({args.rows / fast / 1e6:.2f} M posts/s; runs {', '.join(f'{t:.2f}' for t in times)} s, "
          f"spread {max(times) - min(times):.2f} s) -> {last['rows_out']:,} labels in {last['groups']:,} groups; "
          f"dropped {last['dropped']:,}")
    print(f"peak RSS         : {statistics.median(rss):,.0f} MB median (runs {', '.join(f'{r:,.0f}' for r in rss)} MB), "
          f"including the input ({last['input_rss_mb']:,.0f} MB once read); fresh memory here costs "
          f"{fresh_memory_seconds_per_gb():.2f} s/GB to first touch")

    frame = sample.to_pandas()
    t0 = time.perf_counter()
    ref = naive_labels(frame, cfg)
    naive_k = time.perf_counter() - t0
    naive = naive_k * args.rows / k
    ours, _ = label_candidates(sample, cfg, "bench")
    got = ours.select(["post_id", "group_id", "rank_in_group"]).to_pandas().set_index("post_id").sort_index()
    want = ref[["post_id", "group_id", "rank_in_group"]].set_index("post_id").sort_index()
    same = got.index.equals(want.index) and (got.to_numpy() == want.to_numpy()).all()
    print(f"naive groupby    : {naive_k:6.2f} s for {k:,} posts -> {naive:.1f} s scaled to {args.rows:,} "
          f"(same groups and ranks as likerank on the sample: {'yes' if same else 'NO'})")
    print(f"speed-up         : {naive / fast:.0f}x   (goals: <= 5 s median for 10M rows, <= 3,500 MB peak RSS, >= 20x)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

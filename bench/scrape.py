"""Download throughput against img2dataset, and memory at 2,000 vs 10,000 images.

    .venv/bin/python bench/scrape.py                 # 2,000 images, 16 threads, 3 pairs, + RSS at 10,000
    .venv/bin/python bench/scrape.py --images 500 --big 0 --pairs 1   # quick look

What it does, all on loopback:

1. starts the simulator in its own process (a world big enough for ``--images`` photo posts)
   and reads the image URLs from its ``#selfie`` timeline (the first image of each kept post);
2. fetches every URL once to warm the simulator's render cache, so neither client pays for
   rendering (timed and reported separately);
3. **likerank**: in a child process, ``Downloader.run`` over the URLs with ``--threads``
   threads (per-host limits opened up: one host), checking each image's header (format,
   dimensions, PNG checksums), storing it content-addressed and writing the ``downloads`` and
   ``images`` partitions; images/s is wall time from the first request to the tables being
   written. Pixels are first decoded by the face stage (its bench includes that decode and
   the perceptual hash), not here;
4. **img2dataset** (rom1504/img2dataset) fetches the same URL list at the same thread count
   with ``resize_mode="no"`` and ``output_format="files"``, in the Python given by
   ``$IMG2DATASET_PYTHON`` (default ``/tmp/i2d/bin/python``; install with
   ``python3 -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset`` — its pins clash with
   ours). If it is missing, the bench says so and still prints likerank's figures;
5. steps 3 and 4 alternate ``--pairs`` times (likerank, img2dataset, likerank, ...), each run a
   fresh process writing to an empty folder, so a busy moment on a shared machine slows both
   sides of a pair rather than one client; each pair prints its own ratio;
6. peak RSS of the likerank child at ``--images`` and at ``--big`` URLs (the big list repeats
   the rendered images under distinct URLs, ``?copy=k``, so the simulator renders no more;
   content addressing then stores each once, but every URL is a full download and a row).

Prints images/s for both, per pair and as the median (min..max) over pairs, and the median of
the per-pair ratios (goal: likerank >= 1.2x img2dataset while also writing its tables); the
two peak RSS figures (goal: flat); and the load average before and after, since the figures
mean little on a machine that something else keeps busy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

I2D_PYTHON = os.environ.get("IMG2DATASET_PYTHON", "/tmp/i2d/bin/python")

SERVER = """
import sys
from simulator import start_server
sim = start_server(seed=7, posts=int(sys.argv[1]), image_cache_mb=int(sys.argv[2]))
print(sim.url, flush=True)
sim.serve_until_stopped()
"""

I2D = """
import json, sys, time
from img2dataset import download
urls, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
download(url_list=urls, input_format="txt", output_folder=out, output_format="files", resize_mode="no",
         thread_count=threads, processes_count=1, distributor="multiprocessing", timeout=10, retries=0,
         number_sample_per_shard=100000, enable_wandb=False, disallowed_header_directives=[])
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def child_likerank(urls_file: str, threads: int, root: str) -> None:
    """Runs in a fresh process: download, hash, store, write tables; print JSON figures."""
    import pyarrow as pa

    from pipeline.core.config import load_config
    from pipeline.core.schemas import TABLES
    from pipeline.core.storage import LocalStorage
    from pipeline.scrape.download import Downloader
    from pipeline.scrape.scrape import merge_partition

    cfg = load_config(overrides=[f"storage.root={root}"])
    s = cfg.scrape
    s.allow_hosts = ["127.0.0.1"]
    s.threads, s.per_host_concurrency, s.per_host_rps = threads, threads, 1e6
    s.retries = 0
    urls = Path(urls_file).read_text().split()
    storage = LocalStorage(root)
    downloads, images = [], {}
    t0 = time.perf_counter()
    with Downloader(s, storage) as d:
        for r in d.run((f"p{i}", u) for i, u in enumerate(urls)):
            downloads.append(r.download)
            if r.image:
                images[r.image["sha256"]] = r.image
    merge_partition(storage, "downloads", "2025-06-02", downloads)
    merge_partition(storage, "images", "2025-06-02", list(images.values()))
    seconds = time.perf_counter() - t0
    ok = sum(r["status"] == "ok" for r in downloads)
    assert pa and TABLES
    print(json.dumps({"seconds": seconds, "ok": ok, "urls": len(urls), "unique": len(images),
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_img2dataset(urls_file: Path, out: Path, threads: int) -> float | None:
    """img2dataset's images/s over ``urls_file`` (files written into ``out``), or None if it failed."""
    res = subprocess.run([I2D_PYTHON, "-c", I2D, str(urls_file), str(out), str(threads)], capture_output=True, text=True)
    if res.returncode:
        print(f"img2dataset: FAILED to run ({I2D_PYTHON}): {res.stderr.strip().splitlines()[-1:]}")
        return None
    secs = json.loads(res.stdout.strip().splitlines()[-1])["seconds"]
    # resize_mode="no" still re-encodes to the output format: PNGs may land as .jpg, so count both.
    got = len(list(out.rglob("*.jpg"))) + len(list(out.rglob("*.png")))
    return got / secs


def spread(values: list[float], fmt: str = ".0f") -> str:
    """``median (min..max)``: the median is the figure to quote, the range says how noisy it was."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


def load() -> str:
    """The machine's load averages: the bench shares its cores, so say how busy they were."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def collect_urls(url: str, n: int) -> list[str]:
    from pipeline.core.config import load_config
    from pipeline.scrape.http import HttpClient
    from pipeline.scrape.sources.mastodon import MastodonSource

    cfg = load_config()
    cfg.scrape.allow_hosts = ["127.0.0.1"]
    out: list[str] = []
    with HttpClient(cfg.scrape) as client:
        src = MastodonSource(url, client, author_key=lambda u: "", page_limit=40)
        for page in src.pages("selfie"):
            out += [it.post.image_urls[0] for it in page.items if it.post]
            if len(out) >= n:
                break
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--big", type=int, default=10000, help="URLs for the second RSS figure; 0 = skip")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved (likerank, img2dataset) runs; medians are quoted")
    ap.add_argument("--child", nargs=3, metavar=("URLS", "THREADS", "ROOT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_likerank(a.child[0], int(a.child[1]), a.child[2])

    import requests

    work = Path(tempfile.mkdtemp(prefix="likerank-bench-"))
    posts = int(a.images / 0.5) + 300  # ~52% of statuses are kept photo posts
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(posts), "4096"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        url = server.stdout.readline().strip()
        print(f"simulator: {url} ({posts} statuses)")
        urls = collect_urls(url, a.images)
        if len(urls) < a.images:
            print(f"note: the world has only {len(urls)} eligible images")
        (work / "urls.txt").write_text("\n".join(urls) + "\n")
        print(f"load average (1, 5, 15 min) at start: {load()}")
        t0 = time.perf_counter()
        with requests.Session() as sess, ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda u: sess.get(u, timeout=60).content, urls))
        print(f"warm-up (simulator renders {len(urls)} images, not counted): {time.perf_counter() - t0:.1f} s")

        # Interleaved pairs, each run in a fresh process writing to a fresh folder, so a slow
        # moment on the machine hits both sides of a pair; the figures are medians over pairs.
        i2d_ok = Path(I2D_PYTHON).exists()
        if not i2d_ok:
            print(f"img2dataset: NOT INSTALLED at {I2D_PYTHON} (set IMG2DATASET_PYTHON, or "
                  "`python3 -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset`); baseline skipped")
        lr_rates: list[float] = []
        lr_rss: list[float] = []  # MB
        i2d_rates: list[float] = []
        ratios: list[float] = []
        for k in range(1, a.pairs + 1):
            lr = run_child([str(work / "urls.txt"), str(a.threads), str(work / f"likerank-{k}")])
            shutil.rmtree(work / f"likerank-{k}")  # ~100 MB of images a run; the next run starts empty
            lr_rates.append(lr["ok"] / lr["seconds"])
            lr_rss.append(lr["rss_mb"])
            print(f"pair {k} likerank:    {lr['ok']}/{lr['urls']} ok in {lr['seconds']:.2f} s = {lr_rates[-1]:.0f} images/s "
                  f"(checked, stored, downloads+images tables written), peak RSS {lr['rss_mb']:.0f} MB")
            if not i2d_ok:
                continue
            i2d_rate = run_img2dataset(work / "urls.txt", work / f"i2d-{k}", a.threads)
            shutil.rmtree(work / f"i2d-{k}", ignore_errors=True)
            if i2d_rate is None:
                i2d_ok = False
                continue
            i2d_rates.append(i2d_rate)
            ratios.append(lr_rates[-1] / i2d_rate)
            print(f"pair {k} img2dataset: {i2d_rate:.0f} images/s; ratio {ratios[-1]:.2f}x  (load {load()})")
        print(f"likerank:    median {spread(lr_rates)} images/s over {len(lr_rates)} runs")
        if ratios:
            print(f"img2dataset: median {spread(i2d_rates)} images/s over {len(i2d_rates)} runs "
                  f"(resize_mode=no, output_format=files, thread_count={a.threads}, processes_count=1)")
            print(f"ratio likerank / img2dataset, per pair: median {spread(ratios, '.2f')}x (goal >= 1.2x)")

        if a.big:
            big = [f"{u}?copy={k}" for k in range(a.big // len(urls) + 1) for u in urls][:a.big]
            (work / "big.txt").write_text("\n".join(big) + "\n")
            lb = run_child([str(work / "big.txt"), str(a.threads), str(work / "likerank-big")])
            rss = statistics.median(lr_rss)
            print(f"peak RSS: {len(urls)} images {rss:.0f} MB (median of the runs above), {lb['urls']} images "
                  f"{lb['rss_mb']:.0f} MB (ratio {lb['rss_mb'] / rss:.2f}; goal: flat); {lb['ok'] / lb['seconds']:.0f} images/s")
        print(f"load average (1, 5, 15 min) at the end: {load()}")
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

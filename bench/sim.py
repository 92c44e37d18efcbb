"""Benchmark the simulator: world generation time and image requests served per second.

    .venv/bin/python bench/sim.py [--posts 5000] [--images 200] [--procs 2] [--threads 4] [--seconds 5]

The simulator (``likerank sim serve``) and the baseline run as child processes, so client and
server do not share one GIL. The baseline is the standard library's static-file server
(``SimpleHTTPRequestHandler`` on a ``ThreadingHTTPServer``, HTTP/1.1 keep-alive, TCP_NODELAY
like the simulator) serving the
very same image files from disk. Both are driven by the same client: ``--procs`` processes, each a
thread pool with one ``requests.Session`` per thread (requests costs more CPU per call than
the server does, so one GIL-bound client process would measure the client), cycling over
images already rendered once (so the simulator answers from its LRU cache). Figures are printed as ratios against the baseline;
the target is >= 1,000 image requests per second on loopback.
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STATIC_SERVER = """
import functools, socket, sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
class H(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # same as the simulator
    def log_message(self, *a): pass
class S(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
httpd = S(("127.0.0.1", 0), functools.partial(H, directory=sys.argv[1]))
print(f"http://127.0.0.1:{httpd.server_address[1]}", flush=True)
httpd.serve_forever()
"""


def start_child(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise RuntimeError(f"child {cmd[:4]} did not print its URL")
    return proc, url


def drive(urls: list[str], threads: int, seconds: float) -> tuple[int, int, float]:
    """(requests, bytes, elapsed seconds) of ``threads`` clients looping over ``urls``."""
    stop = threading.Event()
    counts: list[tuple[int, int]] = []

    def client(offset: int) -> None:
        s = requests.Session()
        n = nbytes = 0
        i = offset
        while not stop.is_set():
            r = s.get(urls[i % len(urls)], timeout=30)
            if r.status_code != 200:
                raise RuntimeError(f"{r.url} answered {r.status_code}")
            n += 1
            nbytes += len(r.content)
            i += 1
        counts.append((n, nbytes))

    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        futures = [pool.submit(client, k * 7) for k in range(threads)]
        time.sleep(seconds)
        stop.set()
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - t0
    return sum(c[0] for c in counts), sum(c[1] for c in counts), elapsed


def _drive_star(a: tuple[list[str], int, float]) -> tuple[int, int, float]:
    return drive(*a)


def drive_procs(urls: list[str], procs: int, threads: int, seconds: float) -> tuple[int, int, float]:
    """``drive`` in ``procs`` forked processes at once; (requests, bytes, longest elapsed)."""
    if procs <= 1:
        return drive(urls, threads, seconds)
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        parts = pool.map(_drive_star, [(urls[k::procs] or urls, threads, seconds) for k in range(procs)])
    return sum(p[0] for p in parts), sum(p[1] for p in parts), max(p[2] for p in parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posts", type=int, default=5000)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--threads", type=int, default=4, help="client threads per process")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()

    from simulator.world import WorldParams, generate_world

    t0 = time.perf_counter()
    generate_world(WorldParams(seed=7, posts=args.posts))
    gen_s = time.perf_counter() - t0

    sim, sim_url = start_child([sys.executable, "-m", "likerank.cli.main", "sim", "serve", "--seed", "7",
                                "--posts", str(args.posts)])
    base = None
    try:
        s = requests.Session()
        urls: list[str] = []
        page_url, params = f"{sim_url}/api/v1/timelines/tag/selfie", {"limit": 40, "only_media": "true"}
        while len(urls) < args.images:
            r = s.get(page_url, params=params, timeout=30)
            statuses = r.json()
            if not statuses:
                break
            urls += [m["url"] for st in statuses for m in st["media_attachments"] if m["type"] == "image"]
            page_url, params = r.links["next"]["url"], None
        urls = urls[: args.images]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            for u in urls:  # first request renders; keep the bytes for the baseline
                (Path(tmp) / u.rsplit("/", 1)[1]).write_bytes(s.get(u, timeout=30).content)
            render_s = time.perf_counter() - t0
            base, base_url = start_child([sys.executable, "-c", STATIC_SERVER, tmp])
            base_urls = [f"{base_url}/{u.rsplit('/', 1)[1]}" for u in urls]
            drive(base_urls[:20], args.threads, 0.5)  # warm up connections and page cache
            b_n, b_bytes, b_s = drive_procs(base_urls, args.procs, args.threads, args.seconds)
            drive(urls[:20], args.threads, 0.5)
            s_n, s_bytes, s_s = drive_procs(urls, args.procs, args.threads, args.seconds)
    finally:
        sim.terminate()
        sim.wait(timeout=20)
        if base is not None:
            base.terminate()
            base.wait(timeout=20)

    sim_rps, base_rps = s_n / s_s, b_n / b_s
    print(f"world generation ({args.posts} posts): {gen_s:.2f} s  = {gen_s / 60:.3f} x the 60 s budget")
    print(f"first render of {len(urls)} images: {render_s / len(urls) * 1000:.1f} ms/image")
    print(f"clients: {args.procs} process(es) x {args.threads} threads, {len(urls)} distinct images")
    print(f"baseline static-file server: {base_rps:,.0f} req/s, {b_bytes / b_s / 1e6:,.1f} MB/s")
    print(f"simulator (cached images):   {sim_rps:,.0f} req/s, {s_bytes / s_s / 1e6:,.1f} MB/s"
          f"  = {sim_rps / base_rps:.2f} x baseline")
    print(f"target 1,000 req/s: {'met' if sim_rps >= 1000 else 'NOT met'} ({sim_rps / 1000:.2f} x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-host politeness across worker processes: the busiest second at each host against its limit.

    .venv/bin/python bench/polite.py [--workers 2] [--hosts 10] [--requests 20] [--rps 5]

``--hosts`` small HTTP hosts, each on a loopback address of its own (127.0.0.2, 127.0.0.3, ...:
distinct host names, as the limiter keys on the host name), count when each request arrives.
``--workers`` scrape processes each fetch ``--requests`` pages from every host through
:class:`~pipeline.scrape.http.HttpClient` (two threads per host), once with
``scrape.limiter_url`` pointing at a real ``redis-server`` (the shared limiter) and once
without it (the baseline: each process keeps its own limits). Printed: each host's busiest
1-second window over ``--rps``. The goal for the shared limiter: at most the limit plus 10%
(requests leave evenly spaced, a little over 1 / rps apart: see
:data:`~pipeline.scrape.limiter.SPACING_MARGIN`). The baseline shows what N workers do without
it (each process's token bucket allows a second's burst on top of its rate, times N processes).
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from pipeline.core.config import load_config  # noqa: E402
from pipeline.scrape.http import HttpClient  # noqa: E402
from simulator.politeness import CountingHost, busiest_window  # noqa: E402

GOAL = 0.10  # the busiest second may pass the limit by this share, or by one request


def worker(limiter_url: str, urls: list[str], requests_n: int, rps: float) -> None:
    """One scrape process: two threads per host, ``requests_n`` pages per host in all."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(overrides=[f"storage.root={tmp}", f"scrape.per_host_rps={rps}",
                                     f"scrape.limiter_url={limiter_url}", "scrape.retries=0"])
    cfg.scrape.allow_hosts = [url.split("//")[1].split(":")[0] for url in urls]
    with HttpClient(cfg.scrape) as client:

        def loop(url: str, n: int) -> None:
            client.fetch(url + "/robots.txt")  # opens this thread's connection; not counted
            for i in range(n):
                res = client.fetch(f"{url}/page/{i}")
                if not res.ok:
                    raise RuntimeError(f"{url}: {res.error}")

        threads = [threading.Thread(target=loop, args=(url, requests_n // 2 + k * (requests_n % 2)))
                   for url in urls for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def run(limiter_url: str, workers: int, hosts: int, requests_n: int, rps: float) -> tuple[list[int], float]:
    """Busiest second per host, and the seconds the run took."""
    servers = [CountingHost(f"127.0.0.{2 + i}") for i in range(hosts)]
    try:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(limiter_url, [s.url for s in servers], requests_n, rps))
                 for _ in range(workers)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        seconds = time.monotonic() - t0
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a worker failed: exit codes {[p.exitcode for p in procs]}")
        for s in servers:
            if len(s.times) != workers * requests_n:
                raise RuntimeError(f"{s.url} got {len(s.times)} requests, expected {workers * requests_n}")
        return [busiest_window(s.times) for s in servers], seconds
    finally:
        for s in servers:
            s.close()


def redis_url(port: int) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench/polite.py: redis-server not found (Debian package redis-server)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.1)
    proc.terminate()
    sys.exit("bench/polite.py: redis-server did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="scrape processes")
    ap.add_argument("--hosts", type=int, default=10, help="hosts, each on a loopback address of its own")
    ap.add_argument("--requests", type=int, default=20, help="pages each worker fetches from each host")
    ap.add_argument("--rps", type=float, default=5.0, help="scrape.per_host_rps")
    args = ap.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = redis_url(port)
    try:
        shared, shared_s = run(f"redis://127.0.0.1:{port}/2", args.workers, args.hosts, args.requests, args.rps)
    finally:
        server.terminate()
        server.wait(timeout=30)
    alone, alone_s = run("", args.workers, args.hosts, args.requests, args.rps)
    print(f"{args.workers} workers x {args.hosts} hosts x {args.requests} pages each, limit {args.rps:g} "
          f"requests/s per host")
    print(f"{'host':<12} {'shared: busiest s / limit':>26} {'in-process only':>16}")
    for i, (a, b) in enumerate(zip(shared, alone, strict=True)):
        print(f"127.0.0.{2 + i:<4} {a / args.rps:>26.2f} {b / args.rps:>16.2f}")
    allowed = args.rps * (1 + GOAL)
    worst_shared, worst_alone = max(shared) / args.rps, max(alone) / args.rps
    print(f"\nworst host: shared {worst_shared:.2f} x limit (goal <= {allowed / args.rps:.2f}: +10%)"
          f", in-process only {worst_alone:.2f} x limit; run time {shared_s:.1f} s shared, "
          f"{alone_s:.1f} s in-process only")
    return 0 if max(shared) <= allowed else 1


if __name__ == "__main__":
    sys.exit(main())

"""``likerank serve`` under load: requests per second with batching across requests against
without, and the latency of normal requests while 50 stalled uploads are held open.

    .venv/bin/python bench/serve.py                       # goals: >= 2x at 16 clients, p95 < 2 s
    .venv/bin/python bench/serve.py --requests 96 --repeats 5 --best-crop

The model is a real ResNet-18 at the production input size (``training.image_size`` 224, or
``--image-size``; seeded weights: the speed of a trained one), exported to ONNX and served on onnxruntime as
``likerank serve --onnx`` serves it; the face detector is the shipped SCRFD-500MF. Requests are
the package face photos (insightface's t1.jpg and Tom Hanks, scikit-image's astronaut), posted
as bytes over loopback by ``--clients`` threads with keep-alive sessions, each waiting for its
answer before sending the next; without ``--best-crop`` they ask for the face crop's score only
(``?best_crop=0``), with it for the grid of ~100 crops too.

* throughput: the same server code twice in one process, one with requests sharing model calls
  (``ScoringService(batching=True)``, the default) and one scoring each request in a model call
  of its own (``batching=False``); ``--requests`` answers per measurement, runs interleaved, the
  median of ``--repeats`` runs per side; the headline is the median of per-run ratios.
* held connections: 50 clients that send the headers of a 2 MB upload and then nothing (the
  body timeout is raised so they stay held for the whole measurement), while 4 clients send
  normal requests; the 95th percentile of their latencies against the same load with none held,
  measured in the same run.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import Config, load_config  # noqa: E402
from scoring.model import OnnxModel  # noqa: E402
from scoring.serve import RunningServer, ScoringService, serve  # noqa: E402
from tests.fixtures.scoring import FACE_PHOTOS  # noqa: E402

HELD = 50


def build_model(folder: Path, image_size: int) -> OnnxModel:
    """A seeded ResNet-18 at ``image_size`` px, registered, exported to ONNX and loaded on onnxruntime."""
    import torch

    from pipeline.core import keys
    from pipeline.core.storage import LocalStorage
    from pipeline.core.tables import put_json
    from scoring.torch_model import export_onnx, load_registry_model
    from training import registry
    from training.model import build_model as build_net

    storage = LocalStorage(folder / "data")
    cfg = load_config(env={}, overrides=[f"storage.root={folder / 'data'}", f"training.image_size={image_size}"])
    torch.manual_seed(0)
    net, info = build_net("resnet18", "none", score_head=True)
    registry.save_checkpoint(storage, "bench-serve", {"model": net.state_dict(), "epoch": 1})
    put_json(storage, keys.model_metrics("bench-serve"), {"run_id": "bench-serve", "status": "complete",
                                                          "model": info, "config": cfg.to_dict()})
    registry.publish_model(storage, "bench-serve")
    return OnnxModel(export_onnx(load_registry_model(storage), folder / "model.onnx"), providers=["CPUExecutionProvider"])


def load(url: str, photos: list[bytes], clients: int, n: int, best_crop: bool) -> tuple[float, list[float]]:
    """``n`` answers from ``clients`` closed-loop clients: (seconds, each request's latency)."""
    counter = iter(range(n))
    lock = threading.Lock()
    latencies: list[float] = []
    params = {} if best_crop else {"best_crop": "0"}

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = session.post(f"{url}/score", data=photos[i % len(photos)], params=params, timeout=300)
                elapsed = time.perf_counter() - t0
                if r.status_code != 200:
                    raise RuntimeError(f"request {i}: {r.status_code} {r.text[:200]}")
                with lock:
                    latencies.append(elapsed)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    return time.perf_counter() - t0, latencies


def hold_stalled(server: RunningServer, count: int) -> list[socket.socket]:
    host, port = server.server_address[:2]
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
                     "Content-Length: 2000000\r\n\r\n".encode())
        socks.append(sock)
    return socks


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def start(cfg: Config, model: OnnxModel, *, batching: bool) -> tuple[ScoringService, RunningServer]:
    service = ScoringService(cfg, model, batching=batching)
    return service, serve(service, port=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48, help="answers per throughput measurement")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side; medians are reported")
    ap.add_argument("--image-size", type=int, default=224,
                    help="the model's input, pixels (224: production; a small one shows per-call overhead)")
    ap.add_argument("--best-crop", action="store_true", help="also search the best crop (~100 crops a request)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config overrides for both servers, e.g. serve.batch_max=64")
    args = ap.parse_args()
    photos = [Path(p).read_bytes() for p in FACE_PHOTOS]

    with tempfile.TemporaryDirectory(prefix="likerank-bench-serve-") as tmp:
        model = build_model(Path(tmp), args.image_size)
        cfg = load_config(env={}, overrides=["serve.body_timeout_s=3600", *args.overrides])
        print(f"model: ResNet-18 at {model.spec.image_size} px on onnxruntime "
              f"({model.session.get_providers()[0]}); {len(photos)} photos; best crop "
              f"{'on' if args.best_crop else 'off'}; serve.batch_max {cfg.serve.batch_max}, "
              f"batch_wait_ms {cfg.serve.batch_wait_ms:g}, max_concurrent {cfg.serve.max_concurrent}")
        servers = {True: start(cfg, model, batching=True), False: start(cfg, model, batching=False)}
        try:
            for _, server in servers.values():  # warm-up: sessions, allocators, connections
                load(server.url, photos, 4, 8, args.best_crop)
            for clients in (1, 16):
                rps: dict[bool, list[float]] = {True: [], False: []}
                for _ in range(args.repeats):
                    for batching, (service, server) in servers.items():
                        before = (service.batcher.stats.model_calls, service.batcher.stats.calls_served)
                        seconds, _ = load(server.url, photos, clients, args.requests, args.best_crop)
                        rps[batching].append(args.requests / seconds)
                        calls = service.batcher.stats.model_calls - before[0]
                        served = service.batcher.stats.calls_served - before[1]
                        print(f"  {clients:2d} clients, {'batched  ' if batching else 'unbatched'}: "
                              f"{args.requests / seconds:6.2f} req/s ({served / max(calls, 1):.1f} requests' "
                              f"calls per model call)")
                ratios = [b / u for b, u in zip(rps[True], rps[False], strict=True)]
                print(f"{clients:2d} clients: batched {statistics.median(rps[True]):.2f} req/s, unbatched "
                      f"{statistics.median(rps[False]):.2f} req/s: {statistics.median(ratios):.2f}x"
                      + ("  (goal >= 2x)" if clients == 16 else ""))

            service, server = servers[True]
            quiet, held_runs = [], []
            for _ in range(args.repeats):
                quiet.append(p95(load(server.url, photos, 4, args.requests, args.best_crop)[1]))
                socks = hold_stalled(server, HELD)
                try:
                    held_runs.append(p95(load(server.url, photos, 4, args.requests, args.best_crop)[1]))
                    still_open = sum(1 for s in socks if _open(s))
                finally:
                    for s in socks:
                        s.close()
                print(f"  p95 with {still_open} stalled uploads held: {held_runs[-1]:.3f} s; with none: "
                      f"{quiet[-1]:.3f} s")
            print(f"p95 latency, 4 clients, {HELD} stalled uploads held: {statistics.median(held_runs):.3f} s "
                  f"against {statistics.median(quiet):.3f} s with none "
                  f"({statistics.median(held_runs) / statistics.median(quiet):.2f}x)  (goal < 2 s)")
        finally:
            for _, server in servers.values():
                server.shutdown()
    return 0


def _open(sock: socket.socket) -> bool:
    """Whether the server still holds the connection unanswered (nothing to read, no end of file)."""
    sock.setblocking(False)
    try:
        sock.recv(1)  # an answer or the end of file: no longer held
        return False
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


if __name__ == "__main__":
    sys.exit(main())

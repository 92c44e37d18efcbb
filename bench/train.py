"""Training throughput: images/s per process, as ratios.

CPU (default): DDP training steps (forward, backward, gloo all-reduce, AdamW) on synthetic
images, with 1 process and with 2 processes under torchrun; prints images/s per process and
in total, and the 2-process/1-process ratios. Synthetic tensors leave out decoding and
storage, so this measures the model and the all-reduce. torchrun gives each of N > 1
processes one OpenMP thread; the 1-process run is measured with 1 thread (same per-process
budget) and with torch's default threads (what a 1-process run really gets).

    python bench/train.py                     # resnet18 at 64 px, CPU, 1 vs 2 processes
    python bench/train.py --device cuda       # resnet50 at 224 px, AMP (bf16), per GPU

GPU: ``--device cuda`` measures ResNet-50 at 224 px with bf16 autocast and channels_last
(batch 256 per GPU) and prints images/s against NVIDIA's published reference of about
2,470 images/s per A100 for ResNet-50 mixed-precision training (DeepLearningExamples). With
``--nproc N`` it runs N GPUs under torchrun and reports per-GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

A100_RESNET50_AMP_IMG_S = 2470.0  # NVIDIA DeepLearningExamples, ResNet-50 v1.5 training, AMP, per A100


def worker(args: argparse.Namespace) -> None:
    """One rank: time ``--steps`` DDP training steps after ``--warmup`` untimed ones."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from training.model import build_model

    ddp = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    torch.manual_seed(0)
    model, _ = build_model(args.backbone, "none", score_head=True)
    model = model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if ddp:
        model = DDP(model, device_ids=[device.index] if cuda else None)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    if cuda:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch,), device=device).float()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            logit, score = model(x)
        loss = F.binary_cross_entropy_with_logits(logit.float(), y) + F.mse_loss(torch.sigmoid(score.float()), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    if ddp:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if ddp:
        t = torch.tensor([seconds], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seconds = t.item()
    if rank == 0:
        per_proc = args.batch * args.steps / seconds
        Path(args.out).write_text(json.dumps({"world": world, "threads": torch.get_num_threads(),
                                              "per_process": per_proc, "total": per_proc * world}))
    if ddp:
        dist.destroy_process_group()


def measure(args: argparse.Namespace, nproc: int, threads: int | None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--worker", "--out", out.name, "--device", args.device, "--backbone", args.backbone,
               "--image-size", str(args.image_size), "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        else:
            env.pop("OMP_NUM_THREADS", None)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backbone", default=None, help="default: resnet18 on CPU, resnet50 on CUDA")
    p.add_argument("--image-size", type=int, default=None, help="default: 64 on CPU, 224 on CUDA")
    p.add_argument("--batch", type=int, default=None, help="per process; default: 16 on CPU, 256 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default: 10 on CPU, 50 on CUDA")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--nproc", type=int, default=1, help="CUDA: GPUs to use")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.backbone = args.backbone or ("resnet50" if cuda else "resnet18")
    args.image_size = args.image_size or (224 if cuda else 64)
    args.batch = args.batch or (256 if cuda else 16)
    args.steps = args.steps or (50 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    if args.worker:
        worker(args)
        return

    what = f"{args.backbone} at {args.image_size} px, batch {args.batch}/process, {args.steps} timed steps"
    if cuda:
        r = measure(args, args.nproc, None)
        print(f"train throughput, CUDA bf16, {what}, {args.nproc} GPU(s)")
        print(f"  {r['per_process']:.0f} images/s per GPU, {r['total']:.0f} total")
        print(f"  ratio vs NVIDIA's A100 reference ({A100_RESNET50_AMP_IMG_S:.0f} img/s per GPU): "
              f"{r['per_process'] / A100_RESNET50_AMP_IMG_S:.2f}x")
        return
    print(f"train throughput, CPU gloo DDP, {what}, {os.cpu_count()} cores visible")
    one_t1 = measure(args, 1, 1)
    one_default = measure(args, 1, None)
    two = measure(args, 2, 1)
    for name, r in (("1 process, 1 thread", one_t1), (f"1 process, {one_default['threads']} threads", one_default),
                    ("2 processes, 1 thread each", two)):
        print(f"  {name:<28} {r['per_process']:8.1f} images/s per process, {r['total']:8.1f} total")
    print(f"  2-proc / 1-proc (1 thread):      total {two['total'] / one_t1['total']:.2f}x, "
          f"per process {two['per_process'] / one_t1['per_process']:.2f}x")
    print(f"  2-proc / 1-proc (default threads): total {two['total'] / one_default['total']:.2f}x")


if __name__ == "__main__":
    main()

"""Training throughput on one GPU: torchvision ResNet-50, 224 px, bf16 autocast, channels_last.

    .venv/bin/python bench/gpu_train.py [--seconds 60] [--batch 256]
    .venv/bin/python bench/gpu_train.py --smoke      # CPU, 32 px, batch 2, half a second of steps

Without a CUDA device it says why and exits 0 (``make bench`` runs every ``bench/*.py``), or 2
with ``--require-gpu``, as ``bench/gpu.sh`` calls it.

Called by ``bench/gpu.sh``. Random init, synthetic images and labels already on the device
(so it measures the model, not a data loader), SGD with momentum and cross-entropy over 1,000
classes: the setting of NVIDIA's published figure, about 2,470 images/s per A100 80GB for
ResNet-50 v1.5 mixed-precision training (DeepLearningExamples, PyTorch; their run includes
DALI data loading). ``torch.backends.cudnn.benchmark`` picks the convolution algorithms during
the untimed warm-up steps. The timed loop stops after ``--seconds``.

likerank's own model under DDP is measured by ``bench/train.py --device cuda``.
Whether the CPUs can feed such a GPU from webdataset shards (``training.input = "shards"``) is
``bench/train_input.py --only shards --goal 2000``, ``bench/gpu.sh``'s ``input`` part.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

A100_RESNET50_AMP_IMG_S = 2470.0  # NVIDIA DeepLearningExamples, ResNet-50 v1.5, PyTorch AMP, per A100 80GB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1",
                    help="CPU, tiny sizes, a few steps (env SMOKE=1)")
    ap.add_argument("--require-gpu", action="store_true", help="no GPU is an error (exit 2), not a skip")
    ap.add_argument("--batch", type=int, default=256, help="images per step")
    ap.add_argument("--image-size", type=int, default=224, help="pixels, square")
    ap.add_argument("--warmup", type=int, default=15, help="untimed steps (cudnn.benchmark searches here)")
    ap.add_argument("--seconds", type=float, default=60.0, help="timed seconds")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.image_size, args.warmup, args.seconds = 2, 32, 1, 0.5

    import torch
    import torch.nn.functional as F
    import torchvision

    if args.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(f"gpu_train: {'' if args.require_gpu else 'skipped: '}torch {torch.__version__} sees no CUDA "
              f"device (built for CUDA {torch.version.cuda})", file=sys.stderr)
        return 2 if args.require_gpu else 0
    else:
        device = torch.device("cuda:0")
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"== ResNet-50 training, {name}, bf16 autocast, channels_last, batch {args.batch}, "
          f"{args.image_size} px, torch {torch.__version__}")
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    print(f"  warm-up: {args.warmup} steps in {time.perf_counter() - t0:.1f} s")
    steps, t0 = 0, time.perf_counter()
    while True:
        step()
        steps += 1
        if steps % 10 == 0 or args.smoke:  # a sync every step would stall the queue of kernels
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= args.seconds:
                break
    rate = steps * args.batch / elapsed
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    print(f"  {steps} steps in {elapsed:.1f} s: {rate:.0f} images/s"
          + (f", peak memory {peak:.1f} GiB" if peak else ""))
    print(f"  ratio vs NVIDIA's A100 reference ({A100_RESNET50_AMP_IMG_S:.0f} images/s): "
          f"{rate / A100_RESNET50_AMP_IMG_S:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune an image model on the published labels with PyTorch DDP.

One machine (gloo on CPU, NCCL on GPU; DDP is detected from torchrun's environment):

    python -m training.train --config likerank.toml                       # one process, no DDP
    torchrun --standalone --nproc_per_node=2 -m training.train --config likerank.toml

Several machines: run the same command on every node, node_rank 0..nnodes-1, the master's
address reachable from all of them:

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --master_addr=10.0.0.1 --master_port=29500 \\
        -m training.train --config likerank.toml --labels-run RUN --run-id ID

``likerank train`` / ``training.launch`` build these commands (locally, or as a Kubeflow
PyTorchJob on Kubernetes); ``make retrain`` goes through Airflow.

Options: ``--labels-run RUN`` must be the published run (default: the published one);
``--run-id ID`` names the outputs ``models/<ID>/`` — a restarted run with the same id resumes
from its last checkpoint (after every epoch) with the same step count and results;
``--truth FILE`` (Parquet: post_id, quality[, visual_quality], the simulator's truth file)
adds ROC-AUC and Spearman r against the hidden quality; ``--stop-after-epoch K`` exits with status 3 right after epoch K's checkpoint (a
simulated crash, for tests); ``--norm group|frozen`` removes BatchNorm's batch dependence
(exact N-process vs 1-process equivalence); ``--no-augment`` turns augmentation off.

What it does, top to bottom: set up DDP -> resolve config and labels -> data (global
``batch_size`` split evenly over processes and ``grad_accum`` micro-steps) -> model ->
resume -> train epochs (checkpoint each) -> predict val/test on all ranks -> rank 0 writes
metrics.json and moves models/latest.json. Only rank 0 writes files or logs at INFO.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset

from pipeline.core import keys
from pipeline.core.config import load_config
from pipeline.core.storage import open_storage
from pipeline.core.tables import put_json
from training import metrics as M
from training import registry
from training.data import LabeledImages, check_validated, load_examples, resolve_labels_run
from training.model import NORMS, build_model
from training.model_card import write_model_card

log = logging.getLogger("training.train")

#: Exit status of ``--stop-after-epoch`` (a simulated crash).
STOPPED = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", metavar="FILE", help="TOML config (default: $LIKERANK_CONFIG or ./likerank.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--labels-run", help="labels run id (must be the published one; default: the published one)")
    p.add_argument("--run-id", help="model run id; an existing one resumes from its checkpoint")
    p.add_argument("--truth", metavar="FILE", help="Parquet with post_id, quality (simulator ground truth)")
    p.add_argument("--stop-after-epoch", type=int, default=0, metavar="K", help="exit 3 after epoch K (simulated crash)")
    p.add_argument("--norm", choices=NORMS, default="batch", help="normalization layers (default: the backbone's BatchNorm)")
    p.add_argument("--no-augment", action="store_true", help="no flip / colour jitter on train images")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--log-every", type=int, default=10, metavar="STEPS")
    return p.parse_args(argv)


def lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up over the first 5% of steps (at least 1), then cosine decay to 10% of ``base``."""
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Per-rank, per-epoch seed: an epoch's randomness does not depend on whether the run resumed."""
    return seed + rank + 100_003 * (epoch + 1)


def compute_loss(label_logit: torch.Tensor, score_logit: torch.Tensor | None,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, BCE part), each the weighted mean over the batch; unreadable images weigh 0."""
    w = batch["weight"]
    bce = F.binary_cross_entropy_with_logits(label_logit.float(), batch["label"], reduction="none")
    each = bce
    if score_logit is not None:
        each = each + F.mse_loss(torch.sigmoid(score_logit.float()), batch["score"], reduction="none")
    denom = w.sum().clamp_min(1.0)
    return (each * w).sum() / denom, (bce * w).sum() / denom


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: LabeledImages, *, rank: int, world: int, batch_size: int,
            workers: int, device: torch.device, autocast) -> dict[str, np.ndarray]:
    """Eval-mode predictions for every item, each rank doing every world-th one; all ranks get all."""
    model.eval()
    part = Subset(dataset, list(range(rank, len(dataset), world)))
    loader = DataLoader(part, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    out: dict[str, list] = {"index": [], "prob": [], "score": [], "weight": []}
    for batch in loader:
        with autocast():
            label_logit, score_logit = model(batch["image"].to(device, non_blocking=True))
        out["index"].append(batch["index"].numpy())
        out["weight"].append(batch["weight"].numpy())
        out["prob"].append(torch.sigmoid(label_logit.float()).cpu().numpy())
        s = torch.sigmoid(score_logit.float()).cpu().numpy() if score_logit is not None else np.full(len(batch["index"]), np.nan)
        out["score"].append(s)
    mine = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = {k: np.concatenate([g[k] for g in gathered]) for k in mine}
    order = np.argsort(mine["index"], kind="stable")
    return {k: v[order] for k, v in mine.items()}


def split_metrics(ex, pred: dict[str, np.ndarray], score_head: bool) -> dict[str, Any]:
    ok = pred["weight"] > 0
    out = M.label_metrics(ex.label[ok], pred["prob"][ok])
    out["unreadable_images"] = int((~ok).sum())
    if score_head:
        out.update(M.score_metrics(ex.score[ok], pred["score"][ok]))
    return out


def predictions_parquet(examples: dict, preds: dict[str, dict[str, np.ndarray]]) -> bytes:
    """The val/test predictions as Parquet bytes, one row per labeled post (weight 0: unreadable image)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core.schemas import conform

    parts = []
    for split, pred in preds.items():
        ex = examples[split]
        parts.append(conform("predictions", pa.table({
            "post_id": pa.array(ex.post_id, pa.string()),
            "split": pa.array([split] * len(ex), pa.string()),
            "prob": pa.array(pred["prob"], pa.float32()),
            "pred_score": pa.array(pred["score"], pa.float32()),
            "label": pa.array(ex.label, pa.int8()),
            "weight": pa.array(pred["weight"], pa.float32()),
        })))
    buf = io.BytesIO()
    pq.write_table(pa.concat_tables(parts), buf)
    return buf.getvalue()


def read_truth(path: str) -> dict[str, dict[str, float]]:
    """column -> {post_id: value} for ``quality`` (and ``visual_quality`` when the file has it); nulls dropped."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    cols = [c for c in ("quality", "visual_quality") if c in names]
    if "post_id" not in names or "quality" not in cols:
        raise ValueError(f"--truth {path}: needs columns post_id and quality (has {', '.join(names)})")
    t = pq.read_table(path, columns=["post_id", *cols])
    ids = t["post_id"].to_pylist()
    return {c: {p: v for p, v in zip(ids, t[c].to_pylist(), strict=True) if v is not None} for c in cols}


def truth_split_metrics(truth: dict[str, dict[str, float]], ex, pred: dict[str, np.ndarray]) -> dict[str, Any]:
    """ROC-AUC / Spearman of predicted probabilities against each hidden truth column."""
    out: dict[str, Any] = {}
    for col, values in truth.items():
        keep = [i for i, p in enumerate(ex.post_id) if p in values and pred["weight"][i] > 0]
        m = M.truth_metrics(np.array([values[ex.post_id[i]] for i in keep], dtype=np.float64), pred["prob"][keep])
        out.update(m if col == "quality" else {f"{col}_{k}": v for k, v in m.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # ---- distributed setup: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("training.train: --device cuda but CUDA is not available")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    master = rank == 0
    logging.basicConfig(level=logging.INFO if master else logging.WARNING, stream=sys.stdout,
                        format=f"%(asctime)s [rank {rank}/{world}] %(levelname)s %(name)s: %(message)s")

    # ---- config, labels, run id
    cfg = load_config(args.config, overrides=args.overrides)
    tc = cfg.training
    storage = open_storage(cfg.storage)
    run_id = args.run_id
    if not run_id:
        box = [registry.new_run_id() if master else None]
        if ddp:
            dist.broadcast_object_list(box, src=0)
        run_id = box[0]
    registry.check_run_id(run_id)
    # A run id with a checkpoint resumes on the labels it started on, even if a newer run has
    # been published since (that one was checked when this run started).
    ckpt = registry.load_checkpoint(storage, run_id)
    if ckpt is not None:
        published = ckpt["labels_published"]
        if args.labels_run and args.labels_run != published["run_id"]:
            raise ValueError(f"model run {run_id!r} was started on labels run {published['run_id']!r}, not "
                             f"{args.labels_run!r}; use a new --run-id")
        check_validated(storage, published)  # the labels may have been rebuilt since the run started
    else:
        published = resolve_labels_run(storage, args.labels_run)
    labels_run = published["run_id"]
    truth = read_truth(args.truth) if args.truth else None  # before training: a bad file fails fast
    if tc.batch_size % (world * tc.grad_accum):
        raise ValueError(f"training.batch_size {tc.batch_size} must be divisible by processes ({world}) "
                         f"x grad_accum ({tc.grad_accum})")
    micro = tc.batch_size // (world * tc.grad_accum)
    log.info("run %s: labels run %s, %d process(es) on %s, global batch %d = %d x %d x %d accum",
             run_id, labels_run, world, device, tc.batch_size, world, micro, tc.grad_accum)

    # ---- data: only per-row arrays in memory; images are read per item inside the workers
    examples = load_examples(storage, labels_run, crop=tc.crop)
    make = lambda split, augment: LabeledImages(examples[split], cfg.storage, image_size=tc.image_size,  # noqa: E731
                                                crop=tc.crop, face_margin=tc.face_margin, augment=augment)
    train_set = make("train", not args.no_augment)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=tc.seed)
    loader_gen = torch.Generator()
    # drop_last: every optimizer step sees a full global batch (and BatchNorm never sees a batch of 1).
    loader = DataLoader(train_set, batch_size=micro, sampler=sampler, num_workers=tc.workers,
                        pin_memory=use_cuda, drop_last=True, generator=loader_gen)
    steps_per_epoch = len(loader) // tc.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"labels run {labels_run}: {len(train_set)} train rows are fewer than one global "
                         f"batch ({tc.batch_size}); lower training.batch_size")
    total_steps = steps_per_epoch * tc.epochs

    # ---- model: the same seed on every rank, so every rank starts identical (DDP also broadcasts rank 0's)
    torch.manual_seed(tc.seed)
    model, model_info = build_model(tc.backbone, tc.weights, score_head=tc.score_head, norm=args.norm)
    if args.norm == "sync" and ddp:
        if not use_cuda:
            raise ValueError("--norm sync needs CUDA (SyncBatchNorm has no CPU implementation); use group or frozen")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_cuda else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def autocast():
        return torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    # ---- resume: a run id that already has a checkpoint (loaded above) continues from it
    start_epoch, step, history, started_at = 0, 0, [], time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if ckpt is not None:
        if ckpt["world_size"] != world:
            log.warning("resuming run %s with %d processes (it ran with %d): data order changes",
                        run_id, world, ckpt["world_size"])
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, history, started_at = ckpt["epoch"], ckpt["step"], ckpt["history"], ckpt["started_at"]
        log.info("resuming run %s after epoch %d (step %d)", run_id, start_epoch, step)
    raw_model = model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if use_cuda else None)

    # ---- train
    for epoch in range(start_epoch, tc.epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(epoch_seed(tc.seed, rank, epoch))
        loader_gen.manual_seed(epoch_seed(tc.seed, rank, epoch))
        model.train()
        batches = iter(loader)
        t0, seen = time.perf_counter(), 0
        loss_sum = torch.zeros(2, device=device)  # total, bce, summed over micro-steps (no host sync per step)
        for _ in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, tc.lr)
            for micro_step in range(tc.grad_accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
                if ddp:  # all-reduce gradients only on the last micro-step
                    model.require_backward_grad_sync = micro_step == tc.grad_accum - 1
                x = batch["image"].to(memory_format=torch.channels_last) if use_cuda else batch["image"]
                with autocast():
                    label_logit, score_logit = model(x)
                loss, bce = compute_loss(label_logit, score_logit, batch)
                scaler.scale(loss / tc.grad_accum).backward()
                loss_sum += torch.stack([loss.detach(), bce.detach()])
                seen += len(batch["label"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if master and (step % args.log_every == 0 or step == total_steps):
                log.info("epoch %d step %d/%d loss %.4f lr %.2e", epoch + 1, step, total_steps, loss.item(),
                         optimizer.param_groups[0]["lr"])
        seconds = time.perf_counter() - t0
        stats = torch.tensor([*loss_sum.tolist(), seen, seconds], dtype=torch.float64, device=device)  # NCCL: GPU tensors
        if ddp:
            dist.all_reduce(stats)
        micro_steps = steps_per_epoch * tc.grad_accum * world
        history.append({"epoch": epoch + 1, "step": step, "train_loss": stats[0].item() / micro_steps,
                        "train_bce": stats[1].item() / micro_steps, "images": int(stats[2].item()),
                        "seconds": round(stats[3].item() / world, 3),
                        "images_per_s": round(stats[2].item() / max(stats[3].item() / world, 1e-9), 2)})
        log.info("epoch %d done: train loss %.4f, %d images, %.1f images/s", epoch + 1,
                 history[-1]["train_loss"], history[-1]["images"], history[-1]["images_per_s"])
        if master:
            registry.save_checkpoint(storage, run_id, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "step": step, "history": history, "labels_run": labels_run,
                "labels_published": published,
                "world_size": world, "started_at": started_at, "model_info": model_info,
                "config": cfg.to_dict(),
            })
            put_json(storage, keys.model_metrics(run_id), {"run_id": run_id, "status": "running",
                                                             "labels_run": labels_run, "history": history})
        if ddp:
            dist.barrier()  # nobody moves on (or exits) before the checkpoint is stored
        if args.stop_after_epoch and epoch + 1 == args.stop_after_epoch:
            log.warning("--stop-after-epoch %d: exiting with status %d (simulated crash)", epoch + 1, STOPPED)
            if ddp:
                dist.destroy_process_group()
            return STOPPED

    # ---- evaluate: eval mode, rank 0's BatchNorm statistics on every rank, predictions gathered
    if ddp:
        for buf in raw_model.buffers():
            dist.broadcast(buf, src=0)
    preds = {s: predict(raw_model, make(s, False), rank=rank, world=world, batch_size=max(micro, 1) * 2,
                        workers=tc.workers, device=device, autocast=autocast) for s in ("val", "test")}

    if master:
        detectors = sorted(set().union(*(e.detector_ids for e in examples.values())))
        result = {
            "run_id": run_id,
            "status": "complete",
            "labels_run": labels_run,
            "labels_published": published,
            "detector_ids": detectors,
            "code_version": registry.code_version(),
            "checkpoint_key": keys.model_checkpoint(run_id),
            "model": model_info,
            "augment": not args.no_augment,
            "world_size": world,
            "device": str(device.type),
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
            "global_batch": tc.batch_size, "micro_batch": micro, "grad_accum": tc.grad_accum,
            "epochs": tc.epochs, "steps_per_epoch": steps_per_epoch, "steps": step,
            "rows": {s: len(e) for s, e in examples.items()},
            "history": history,
            "val": split_metrics(examples["val"], preds["val"], tc.score_head),
            "test": split_metrics(examples["test"], preds["test"], tc.score_head),
            "truth": ({s: truth_split_metrics(truth, examples[s], preds[s]) for s in ("val", "test")}
                      if truth is not None else None),
            "truth_file": args.truth,
            "config": cfg.to_dict(),
            "started_at": started_at,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.put_bytes(keys.model_predictions(run_id), predictions_parquet(examples, preds))
        put_json(storage, keys.model_metrics(run_id), result)
        write_model_card(storage, run_id, result, cfg)
        storage.put_text(keys.model_config(run_id), cfg.to_toml())
        registry.publish_model(storage, run_id)
        log.info("run %s complete: val %s | test %s -> %s", run_id,
                 {k: round(v, 4) for k, v in result["val"].items() if isinstance(v, float)},
                 {k: round(v, 4) for k, v in result["test"].items() if isinstance(v, float)},
                 storage.uri(keys.model_metrics(run_id)))
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

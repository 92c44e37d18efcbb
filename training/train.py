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

What it does, top to bottom (the steps :func:`main` calls, sharing one :class:`TrainingRun`):
``setup`` (DDP, device, config, storage, run id) -> ``resume_labels`` (the checkpoint and the
labels run it was started on, else the published one) -> ``check_inputs`` (truth file; global
``batch_size`` split evenly over processes and ``grad_accum`` micro-steps) -> ``load_data`` ->
``init_model`` -> ``restore_progress`` (weights, optimizer, step count from the checkpoint) ->
``train_one_epoch`` + ``validate_epoch`` (the validation curve) + ``save_progress`` (checkpoint)
per epoch -> ``evaluate`` (predict val/test on all ranks; rank 0 scores them) -> ``publish``
(rank 0: metrics.json, predictions, model card, config, models/latest.json). Only rank 0 writes
files or logs at INFO.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset

from pipeline.core import keys
from pipeline.core.config import load_config
from pipeline.core.published import check_validated, require_published
from pipeline.core.storage import open_storage
from pipeline.core.tables import put_json
from pipeline.core.truth import load_truth, match_id
from training import metrics, registry
from training.data import ImageTransform, LabeledImages, load_examples
from training.model import NORMS, build_model
from training.model_card import write_model_card
from training.shards import ShardExport, ShardImages, open_export

if TYPE_CHECKING:
    from pipeline.core.config import Config, TrainingConfig
    from pipeline.core.storage import Storage
    from training.data import Examples

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
def predict(model: torch.nn.Module, dataset: LabeledImages | ShardImages, *, rank: int, world: int,
            batch_size: int, workers: int, device: torch.device, autocast, n_items: int) -> dict[str, np.ndarray]:
    """Eval-mode predictions for all ``n_items`` items, in index order, on every rank.

    Each rank predicts every world-th object item, or its share of the shards (a
    :class:`ShardImages` deals them itself); the predictions are gathered, and every index must
    come back exactly once.
    """
    model.eval()
    part = dataset if isinstance(dataset, ShardImages) else Subset(dataset, list(range(rank, len(dataset), world)))
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
    if not np.array_equal(mine["index"][order], np.arange(n_items)):
        raise RuntimeError(f"evaluation saw {len(order)} items ({len(np.unique(mine['index']))} distinct), "
                           f"not each of {n_items} once")
    return {k: v[order] for k, v in mine.items()}


def split_metrics(ex: Examples, pred: dict[str, np.ndarray], score_head: bool) -> dict[str, Any]:
    """Label metrics (and score metrics with the score head) over the readable images of one split."""
    ok = pred["weight"] > 0
    out = metrics.label_metrics(ex.label[ok], pred["prob"][ok])
    out["unreadable_images"] = int((~ok).sum())
    if score_head:
        out.update(metrics.score_metrics(ex.score[ok], pred["score"][ok]))
    return out


def predictions_parquet(examples: dict[str, Examples], preds: dict[str, dict[str, np.ndarray]]) -> bytes:
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
    """column -> {match_id: value} for ``quality`` (and ``visual_quality`` when the file has it);
    nulls dropped. Look a post up by :func:`pipeline.core.truth.match_id` of its id."""
    try:
        truth = load_truth(path, columns=("quality", "visual_quality"))
    except ValueError as exc:
        raise ValueError(f"--truth {path}: {exc}") from None
    cols = [c for c in ("quality", "visual_quality") if c in truth.columns]
    return {c: {k: float(v) for k, v in zip(truth["match_id"], truth[c], strict=True) if pd.notna(v)} for c in cols}


def truth_split_metrics(truth: dict[str, dict[str, float]], ex: Examples,
                        pred: dict[str, np.ndarray]) -> dict[str, Any]:
    """ROC-AUC / Spearman of predicted probabilities against each hidden truth column."""
    out: dict[str, Any] = {}
    ids = [match_id(p) for p in ex.post_id]
    scored = [i for i in range(len(ids)) if pred["weight"][i] > 0]
    for col, values in truth.items():
        keep = [i for i in scored if ids[i] in values]
        m = metrics.truth_metrics(np.array([values[ids[i]] for i in keep], dtype=np.float64), pred["prob"][keep])
        out.update(m if col == "quality" else {f"{col}_{k}": v for k, v in m.items()})
        if col == "quality":
            out["of"] = len(scored)  # n of them met the truth: the coverage
    return out


@dataclass
class TrainingRun:
    """One process's view of a training run, handed from step to step in :func:`main`.

    :func:`setup` fills the first block; the later blocks are filled by the step named above
    them and read by the steps after it.
    """

    # ---- setup
    args: argparse.Namespace
    cfg: Config
    storage: Storage
    ddp: bool  # launched by torchrun: one process group over all ranks
    rank: int  # global rank, 0..world-1; rank 0 alone writes files and logs at INFO
    local_rank: int  # rank on this machine: picks the GPU
    world: int  # number of processes
    device: torch.device
    run_id: str  # names the outputs models/<run_id>/; the same on every rank

    # ---- resume_labels
    checkpoint: dict[str, Any] | None = field(init=False)  # the run's last checkpoint; None for a fresh run
    published: dict[str, Any] = field(init=False)  # the labels publication record the run trains on

    # ---- check_inputs
    truth: dict[str, dict[str, float]] | None = field(init=False)  # --truth: column -> {match_id: value}
    micro: int = field(init=False)  # images per process per micro-step

    # ---- load_data
    examples: dict[str, Examples] = field(init=False)  # split -> its rows
    export: ShardExport | None = field(init=False)  # training.input = "shards": the checked export; else None
    sampler: DistributedSampler | None = field(init=False)  # objects: shuffles and splits; shards: None
    loader: DataLoader = field(init=False)  # this rank's share of the train split, micro-batches
    loader_gen: torch.Generator = field(init=False)  # the loader's shuffling, re-seeded every epoch
    steps_per_epoch: int = field(init=False)  # optimizer steps
    total_steps: int = field(init=False)

    # ---- init_model
    raw_model: torch.nn.Module = field(init=False)  # the model itself: checkpoints and evaluation use it
    model: torch.nn.Module = field(init=False)  # what training calls: raw_model, or DDP around it
    model_info: dict[str, Any] = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    scaler: torch.amp.GradScaler = field(init=False)  # loss scaling, active only with float16
    amp_dtype: torch.dtype | None = field(init=False)  # mixed precision on CUDA; None: float32

    # ---- restore_progress, then advanced by every epoch
    start_epoch: int = field(init=False)  # epochs already done
    step: int = field(init=False)  # optimizer steps already done
    history: list[dict[str, Any]] = field(init=False)  # one entry per finished epoch
    started_at: str = field(init=False)  # UTC, ISO 8601; kept across resumes

    @property
    def tc(self) -> TrainingConfig:
        return self.cfg.training

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def labels_run(self) -> str:
        return self.published["run_id"]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision around forward passes on CUDA; a no-op on CPU."""
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()


@dataclass
class Evaluation:
    """Rank 0's view of the finished model on val and test."""

    preds: dict[str, dict[str, np.ndarray]]  # split -> predict()'s arrays, in dataset order
    metrics: dict[str, dict[str, Any]]  # split -> split_metrics()
    truth: dict[str, dict[str, Any]] | None  # split -> truth_split_metrics(); None without --truth


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second (started_at / finished_at)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def setup(args: argparse.Namespace) -> TrainingRun:
    """Device, process group, logging, config, storage and the run id this process works on."""
    # torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is the only process.
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

    cfg = load_config(args.config, overrides=args.overrides)
    storage = open_storage(cfg.storage)
    run_id = args.run_id or agree_on_new_run_id(master=master, ddp=ddp)
    registry.check_run_id(run_id)
    return TrainingRun(args=args, cfg=cfg, storage=storage, ddp=ddp, rank=rank, local_rank=local_rank,
                       world=world, device=device, run_id=run_id)


def agree_on_new_run_id(*, master: bool, ddp: bool) -> str:
    """A fresh run id drawn on rank 0 and sent to every rank, so all write to the same models/<id>/."""
    from_rank0: list[Any] = [registry.new_run_id() if master else None]  # filled in place by the broadcast
    if ddp:
        dist.broadcast_object_list(from_rank0, src=0)
    return from_rank0[0]


def resume_labels(run: TrainingRun) -> None:
    """Load the run's checkpoint, if any, and pick the labels publication the run trains on.

    A run id with a checkpoint resumes on the labels it started on, even if a newer run has
    been published since (that one was checked when this run started).
    """
    run.checkpoint = registry.load_checkpoint(run.storage, run.run_id)
    if run.checkpoint is not None:
        published = run.checkpoint["labels_published"]
        if run.args.labels_run and run.args.labels_run != published["run_id"]:
            raise ValueError(f"model run {run.run_id!r} was started on labels run {published['run_id']!r}, not "
                             f"{run.args.labels_run!r}; use a new --run-id")
        check_validated(run.storage, published)  # the labels may have been rebuilt since the run started
    else:
        published = require_published(run.storage, run.args.labels_run)
    run.published = published


def check_inputs(run: TrainingRun) -> None:
    """Read --truth and split the global batch, before any image is read: bad input fails fast."""
    tc = run.tc
    run.truth = read_truth(run.args.truth) if run.args.truth else None
    if tc.batch_size % (run.world * tc.grad_accum):
        raise ValueError(f"training.batch_size {tc.batch_size} must be divisible by processes ({run.world}) "
                         f"x grad_accum ({tc.grad_accum})")
    run.micro = tc.batch_size // (run.world * tc.grad_accum)
    log.info("run %s: labels run %s, %d process(es) on %s, global batch %d = %d x %d x %d accum",
             run.run_id, run.labels_run, run.world, run.device, tc.batch_size, run.world, run.micro, tc.grad_accum)


def labeled_images(run: TrainingRun, split: str, *, augment: bool, batches: int | None = None
                   ) -> LabeledImages | ShardImages:
    """The split's images as a dataset, cropped and sized as the config says: read per object, or
    from the export's shards (``batches``: this rank's micro-batches per epoch when training)."""
    tc = run.tc
    if run.export is None:
        return LabeledImages(run.examples[split], run.cfg.storage, image_size=tc.image_size,
                             crop=tc.crop, face_margin=tc.face_margin, augment=augment)
    transform = ImageTransform(image_size=tc.image_size, crop=tc.crop, face_margin=tc.face_margin, augment=augment)
    return ShardImages(run.export, split, run.examples[split], transform, rank=run.rank, world=run.world,
                       batches=batches, batch_size=run.micro, shuffle_buffer=tc.shuffle_buffer, seed=tc.seed)


def load_data(run: TrainingRun) -> None:
    """The labels' rows and this rank's train loader.

    Only per-row arrays are held in memory; images are read per item (``training.input =
    "objects"``) or streamed from the export's shards (``"shards"``) inside the loader's workers.
    Both give every rank the same steps per epoch: ceil(train rows / processes) images, in
    whole micro-batches and optimizer steps.
    """
    tc = run.tc
    run.examples = load_examples(run.storage, run.labels_run, crop=tc.crop)
    n_train = len(run.examples["train"])
    per_rank = math.ceil(n_train / run.world)  # what DistributedSampler gives each rank
    run.steps_per_epoch = per_rank // run.micro // tc.grad_accum
    if run.steps_per_epoch == 0:
        raise ValueError(f"labels run {run.labels_run}: {n_train} train rows are fewer than one global "
                         f"batch ({tc.batch_size}); lower training.batch_size")
    run.total_steps = run.steps_per_epoch * tc.epochs
    run.export = None
    if tc.input == "shards":
        run.export = open_export(run.cfg, run.published, {s: len(e) for s, e in run.examples.items()})
        log.info("reading shards of %s: %s", run.export.where,
                 {s: len(run.export.files(s)) for s in ("train", "val", "test")})
    train_set = labeled_images(run, "train", augment=not run.args.no_augment,
                               batches=run.steps_per_epoch * tc.grad_accum)
    run.sampler = None
    if isinstance(train_set, LabeledImages):
        run.sampler = DistributedSampler(train_set, num_replicas=run.world, rank=run.rank, shuffle=True,
                                         seed=tc.seed)
    run.loader_gen = torch.Generator()
    # drop_last: every optimizer step sees a full global batch (and BatchNorm never sees a batch of 1).
    run.loader = DataLoader(train_set, batch_size=run.micro, sampler=run.sampler, num_workers=tc.workers,
                            pin_memory=run.use_cuda, drop_last=True, generator=run.loader_gen)


def init_model(run: TrainingRun) -> None:
    """Model, optimizer and loss scaler, on the run's device."""
    tc = run.tc
    # The same seed on every rank, so every rank starts identical (DDP also broadcasts rank 0's).
    torch.manual_seed(tc.seed)
    model, run.model_info = build_model(tc.backbone, tc.weights, score_head=tc.score_head, norm=run.args.norm)
    if run.args.norm == "sync" and run.ddp:
        if not run.use_cuda:
            raise ValueError("--norm sync needs CUDA (SyncBatchNorm has no CPU implementation); use group or frozen")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(run.device)
    if run.use_cuda:
        model = model.to(memory_format=torch.channels_last)
    run.raw_model = run.model = model
    run.optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    run.amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if run.use_cuda else None
    run.scaler = torch.amp.GradScaler("cuda", enabled=run.amp_dtype == torch.float16)


def restore_progress(run: TrainingRun) -> None:
    """Continue from the checkpoint :func:`resume_labels` loaded, if any; then wrap the model in DDP."""
    run.start_epoch, run.step, run.history, run.started_at = 0, 0, [], utc_now()
    ckpt = run.checkpoint
    if ckpt is not None:
        if ckpt["world_size"] != run.world:
            log.warning("resuming run %s with %d processes (it ran with %d): data order changes",
                        run.run_id, run.world, ckpt["world_size"])
        run.raw_model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scaler.load_state_dict(ckpt["scaler"])
        run.start_epoch, run.step, run.history, run.started_at = (ckpt["epoch"], ckpt["step"], ckpt["history"],
                                                                  ckpt["started_at"])
        log.info("resuming run %s after epoch %d (step %d)", run.run_id, run.start_epoch, run.step)
    if run.ddp:
        run.model = DDP(run.raw_model, device_ids=[run.local_rank] if run.use_cuda else None)


def train_one_epoch(run: TrainingRun, epoch: int) -> None:
    """Epoch ``epoch`` (0-based): steps_per_epoch optimizer steps, then its entry in run.history."""
    tc, model, optimizer, scaler = run.tc, run.model, run.optimizer, run.scaler
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    else:
        run.loader.dataset.set_epoch(epoch)
    torch.manual_seed(epoch_seed(tc.seed, run.rank, epoch))
    run.loader_gen.manual_seed(epoch_seed(tc.seed, run.rank, epoch))
    model.train()
    batches = iter(run.loader)
    t0, seen = time.perf_counter(), 0  # seconds, images
    loss_sum = torch.zeros(2, device=run.device)  # total, bce, summed over micro-steps (no host sync per step)
    for _ in range(run.steps_per_epoch):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(run.step, run.total_steps, tc.lr)
        for micro_step in range(tc.grad_accum):
            batch = {k: v.to(run.device, non_blocking=True) for k, v in next(batches).items()}
            if run.ddp:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro_step == tc.grad_accum - 1
            x = batch["image"].to(memory_format=torch.channels_last) if run.use_cuda else batch["image"]
            with run.autocast():
                label_logit, score_logit = model(x)
            loss, bce = compute_loss(label_logit, score_logit, batch)
            scaler.scale(loss / tc.grad_accum).backward()
            loss_sum += torch.stack([loss.detach(), bce.detach()])
            seen += len(batch["label"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        run.step += 1
        if run.master and (run.step % run.args.log_every == 0 or run.step == run.total_steps):
            log.info("epoch %d step %d/%d loss %.4f lr %.2e", epoch + 1, run.step, run.total_steps, loss.item(),
                     optimizer.param_groups[0]["lr"])
    seconds = time.perf_counter() - t0
    # Summed over ranks: losses, images, seconds. NCCL reduces GPU tensors only.
    stats = torch.tensor([*loss_sum.tolist(), seen, seconds], dtype=torch.float64, device=run.device)
    if run.ddp:
        dist.all_reduce(stats)
    micro_steps = run.steps_per_epoch * tc.grad_accum * run.world
    run.history.append({"epoch": epoch + 1, "step": run.step, "train_loss": stats[0].item() / micro_steps,
                        "train_bce": stats[1].item() / micro_steps, "images": int(stats[2].item()),
                        "seconds": round(stats[3].item() / run.world, 3),
                        "images_per_s": round(stats[2].item() / max(stats[3].item() / run.world, 1e-9), 2)})
    log.info("epoch %d done: train loss %.4f, %d images, %.1f images/s", epoch + 1,
             run.history[-1]["train_loss"], run.history[-1]["images"], run.history[-1]["images_per_s"])


def save_progress(run: TrainingRun, epoch: int) -> None:
    """Rank 0 stores the checkpoint and a "running" metrics.json after epoch ``epoch``; all ranks wait for it."""
    if run.master:
        registry.save_checkpoint(run.storage, run.run_id, {
            "model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(),
            "epoch": epoch + 1, "step": run.step, "history": run.history, "labels_run": run.labels_run,
            "labels_published": run.published,
            "world_size": run.world, "started_at": run.started_at, "model_info": run.model_info,
            "config": run.cfg.to_dict(),
        })
        put_json(run.storage, keys.model_metrics(run.run_id), {"run_id": run.run_id, "status": "running",
                                                               "labels_run": run.labels_run, "history": run.history})
    if run.ddp:
        dist.barrier()  # nobody moves on (or exits) before the checkpoint is stored


def simulate_crash(run: TrainingRun, epoch: int) -> int:
    """--stop-after-epoch: leave right after epoch ``epoch``'s checkpoint, as a crash would."""
    log.warning("--stop-after-epoch %d: exiting with status %d (simulated crash)", epoch + 1, STOPPED)
    if run.ddp:
        dist.destroy_process_group()
    return STOPPED


def predict_split(run: TrainingRun, split: str) -> dict[str, np.ndarray]:
    """:func:`predict` on one split, on every rank.

    Eval mode with rank 0's BatchNorm statistics on every rank (DDP broadcasts them from rank 0
    before each training forward anyway, so this changes nothing for training); each rank
    predicts every world-th item (or, from shards, its share of them) and the predictions are
    gathered.
    """
    if run.ddp:
        for buf in run.raw_model.buffers():
            dist.broadcast(buf, src=0)
    return predict(run.raw_model, labeled_images(run, split, augment=False), rank=run.rank, world=run.world,
                   batch_size=max(run.micro, 1) * 2, workers=run.tc.workers, device=run.device,
                   autocast=run.autocast, n_items=len(run.examples[split]))


def validate_epoch(run: TrainingRun, epoch: int) -> None:
    """The validation curve: the val split's label metrics after epoch ``epoch``, added to its
    history entry by rank 0 as ``val_log_loss``, ``val_roc_auc`` and ``val_accuracy``.

    No weights change, and every epoch re-seeds its randomness, so a run with or without these
    passes (or resumed between them) trains the same model.
    """
    pred = predict_split(run, "val")
    if not run.master:
        return
    val = split_metrics(run.examples["val"], pred, score_head=False)
    run.history[-1].update({f"val_{k}": val[k] for k in ("log_loss", "roc_auc", "accuracy")})
    log.info("epoch %d val: log-loss %.4f, ROC-AUC %.4f, accuracy %.4f", epoch + 1,
             val["log_loss"], val["roc_auc"], val["accuracy"])


def evaluate(run: TrainingRun) -> Evaluation | None:
    """Val/test predictions on every rank (:func:`predict_split`); rank 0 gets them with their
    metrics, the others None."""
    preds = {s: predict_split(run, s) for s in ("val", "test")}
    if not run.master:
        return None
    return Evaluation(
        preds=preds,
        metrics={s: split_metrics(run.examples[s], preds[s], run.tc.score_head) for s in ("val", "test")},
        truth=({s: truth_split_metrics(run.truth, run.examples[s], preds[s]) for s in ("val", "test")}
               if run.truth is not None else None),
    )


def publish(run: TrainingRun, evaluation: Evaluation) -> None:
    """Rank 0 only: metrics.json, predictions, model card and config; then models/latest.json moves to the run."""
    tc, storage, run_id, examples = run.tc, run.storage, run.run_id, run.examples
    detectors = sorted(set().union(*(e.detector_ids for e in examples.values())))
    result = {
        "run_id": run_id,
        "status": "complete",
        "labels_run": run.labels_run,
        "labels_published": run.published,
        "detector_ids": detectors,
        "code_version": registry.code_version(),
        "checkpoint_key": keys.model_checkpoint(run_id),
        "model": run.model_info,
        "augment": not run.args.no_augment,
        "world_size": run.world,
        "device": str(run.device.type),
        "amp": str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "none",
        "global_batch": tc.batch_size, "micro_batch": run.micro, "grad_accum": tc.grad_accum,
        "epochs": tc.epochs, "steps_per_epoch": run.steps_per_epoch, "steps": run.step,
        "rows": {s: len(e) for s, e in examples.items()},
        "history": run.history,
        "val": evaluation.metrics["val"],
        "test": evaluation.metrics["test"],
        "truth": evaluation.truth,
        "truth_file": run.args.truth,
        "config": run.cfg.to_dict(),
        "started_at": run.started_at,
        "finished_at": utc_now(),
    }
    storage.put_bytes(keys.model_predictions(run_id), predictions_parquet(examples, evaluation.preds))
    put_json(storage, keys.model_metrics(run_id), result)
    write_model_card(storage, run_id, result, run.cfg)
    storage.put_text(keys.model_config(run_id), run.cfg.to_toml())
    registry.publish_model(storage, run_id)
    log.info("run %s complete: val %s | test %s -> %s", run_id,
             {k: round(v, 4) for k, v in result["val"].items() if isinstance(v, float)},
             {k: round(v, 4) for k, v in result["test"].items() if isinstance(v, float)},
             storage.uri(keys.model_metrics(run_id)))


def finish(run: TrainingRun) -> None:
    """Every rank waits for rank 0's publishing, then leaves the process group."""
    if run.ddp:
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate and (rank 0) publish; 0 when complete, STOPPED after --stop-after-epoch."""
    run = setup(parse_args(argv))
    resume_labels(run)
    check_inputs(run)
    load_data(run)
    init_model(run)
    restore_progress(run)
    for epoch in range(run.start_epoch, run.tc.epochs):
        train_one_epoch(run, epoch)
        validate_epoch(run, epoch)
        save_progress(run, epoch)
        if run.args.stop_after_epoch and epoch + 1 == run.args.stop_after_epoch:
            return simulate_crash(run, epoch)
    evaluation = evaluate(run)
    if evaluation is not None:
        publish(run, evaluation)
    finish(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())

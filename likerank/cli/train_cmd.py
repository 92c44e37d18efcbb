"""``likerank train``: fine-tune on the published labels, here (torchrun) or on Kubernetes."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.core.config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune on the published labels (torchrun here, or a Kubeflow PyTorchJob)")
    p.add_argument("--labels-run", help="labels run id; must be the published one (default: the published one)")
    p.add_argument("--run-id", help="model run id (default: a new one); an existing one resumes from its checkpoint")
    p.add_argument("--backend", choices=("local", "kubernetes"), help="default: training.backend")
    p.add_argument("--truth", metavar="FILE", help="Parquet with post_id, quality: also score against the hidden truth")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command / PyTorchJob manifest only")
    p.add_argument("--no-wait", action="store_true", help="kubernetes: return once the PyTorchJob is created")
    p.set_defaults(handler=train)


def train(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.core.published import LabelsNotPublished
    from training.launch import TrainingFailed, launch, wait
    from training.registry import evaluate_run

    try:
        job = launch(cfg, labels_run=args.labels_run, run_id=args.run_id, backend=args.backend, truth=args.truth,
                     dry_run=args.dry_run, config_path=args.config)
        if args.dry_run or (job["backend"] == "kubernetes" and args.no_wait):
            print(json.dumps(job), file=sys.stderr)
            return 0
        wait(job, cfg)
    except LabelsNotPublished as exc:
        print(f"likerank train: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:
        print(f"likerank train: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(evaluate_run(job["run_id"], cfg), indent=2))
    return 0

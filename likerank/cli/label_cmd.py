"""``likerank label`` and ``likerank eval labels``.

- ``likerank label``: label the project's tables into ``labels/run=<id>/``, validate the run
  (Great Expectations) and publish it if it passes (``--no-publish``: stop after validation);
- ``likerank label --input F --output F``: label a Parquet/CSV file of one's own (docs/architecture.md
  columns); nothing is validated or published;
- ``likerank eval labels [--run RUN] [--truth FILE]``: AUC and Spearman of every labeler
  against ground truth (default run: the published one; default truth: the simulator world).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pipeline.core.config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="label posts by follower-normalized like rank, validate, publish")
    p.add_argument("--run", metavar="RUN_ID", help="run id (default: the UTC time, e.g. 20261123T101500Z)")
    p.add_argument("--input", metavar="FILE", help="label this Parquet/CSV file instead of the project's tables")
    p.add_argument("--output", metavar="FILE", help="with --input: where to write the labels (.parquet or .csv)")
    p.add_argument("--no-publish", action="store_true", help="validate but do not publish the run")
    p.add_argument("--as-of", metavar="RUN_ID", help="rebuild that run from the table versions, labeler and parameters "
                                                     "it recorded (into --run, default RUN_ID-asof); validated, "
                                                     "never published")
    p.set_defaults(handler=label_command)

    ev = sub.choices.get("eval") or sub.add_parser("eval", help="evaluate outputs against ground truth")
    actions = next((a for a in ev._actions if isinstance(a, argparse._SubParsersAction)), None) \
        or ev.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    lp = actions.add_parser("labels", help="AUC / Spearman of each labeler against true quality")
    lp.add_argument("--run", metavar="RUN_ID", help="labels run (default: the published run)")
    lp.add_argument("--truth", metavar="FILE", help="truth Parquet/CSV with post_id, quality [, has_face] "
                                                    "(default: the configured simulator world)")
    lp.set_defaults(handler=eval_labels_command)


def label_command(args: argparse.Namespace, cfg: Config) -> int:
    from labeling.build_labels import (
        NothingToLabel,
        build_labels,
        clean_run_id,
        label_file,
        new_run_id,
    )
    from labeling.eligibility import InputError
    from labeling.validate import ValidationFailed, validate_run
    from pipeline.core.labels_run import LabelsRunMissing
    from pipeline.core.published import publish

    run_id = clean_run_id(args.run) if args.run else (clean_run_id(f"{args.as_of}-asof") if args.as_of else new_run_id())
    if args.as_of and args.input:
        print("likerank label: --as-of rebuilds a run of the project's tables; it does not take --input", file=sys.stderr)
        return 2
    if bool(args.input) != bool(args.output):
        print("likerank label: --input and --output go together", file=sys.stderr)
        return 2
    if args.input:
        try:
            summary = label_file(args.input, args.output, cfg, run_id)
        except (InputError, ValueError) as exc:
            print(f"likerank label: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=2))
        return 0

    try:
        summary = build_labels(cfg, run_id, as_of=args.as_of)
    except NothingToLabel as exc:  # not an error: nothing was written, the published run stands
        print(f"likerank label: {exc}", file=sys.stderr)
        return 0
    except (ValueError, LabelsRunMissing) as exc:
        print(f"likerank label: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an --as-of version whose files were vacuumed
        print(f"likerank label: the table versions of run {args.as_of} can no longer be read (vacuumed after "
              f"storage.retention_hours): {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    try:
        report = validate_run(cfg, run_id)
    except ValidationFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"validation passed: {report['validation_uri']}")
    if not args.no_publish and not args.as_of:
        pointer = publish(cfg, run_id)
        print(f"published labels run {pointer['run_id']} ({pointer['rows']} rows)")
    return 0


def eval_labels_command(args: argparse.Namespace, cfg: Config) -> int:
    from labeling.evaluate import evaluate_run, format_report
    from pipeline.core.published import published_run_id
    from pipeline.core.storage import open_storage
    from pipeline.core.truth import load_truth

    storage = open_storage(cfg.storage)
    run_id = args.run or published_run_id(storage)
    if not run_id:
        print("likerank eval labels: no --run given and no labels run published yet", file=sys.stderr)
        return 2
    try:
        truth = load_truth(args.truth or simulator_truth_file(cfg))
    except (ValueError, OSError) as exc:
        print(f"likerank eval labels: {exc}", file=sys.stderr)
        return 2
    report = evaluate_run(cfg, run_id, truth, storage)
    print(format_report(report))
    print(f"saved: {storage.uri(report['key'])}")
    return 0


def simulator_truth_file(cfg: Config) -> Path:
    """The configured simulator world's ground truth, written to a temporary Parquet file."""
    if cfg.source.kind != "simulator":
        raise ValueError("no ground truth: pass --truth FILE (source.kind is not 'simulator')")
    from simulator import build_world, write_truth

    world = build_world(cfg.simulator.seed, cfg.simulator.posts, tuple(cfg.simulator.hashtags),
                        bluesky_share=cfg.simulator.bluesky_share)
    return write_truth(world, Path(tempfile.mkdtemp(prefix="likerank-truth-")) / "truth.parquet")

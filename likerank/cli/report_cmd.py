"""``likerank report``: the static HTML report of a labels run (and its model), readable offline."""

from __future__ import annotations

import argparse
import sys

from pipeline.core.config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the HTML report (funnel, distributions, validation, model, "
                                      "contact sheets) of a labels run to a folder")
    p.add_argument("--labels", metavar="RUN", help="labels run (default: the published run, else the newest)")
    p.add_argument("--model", metavar="RUN", help="model run (default: models/latest.json)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <storage root>/reports/<labels run>/ "
                                                "on local storage, else ./reports/<labels run>/); the folder "
                                                "is recorded in storage so `likerank forget` can delete it")
    p.set_defaults(handler=report)


def report(args: argparse.Namespace, cfg: Config) -> int:
    from likerank.report.build import build_report
    from pipeline.core.storage import StorageError, open_storage

    try:
        index = build_report(cfg, open_storage(cfg.storage), labels_run=args.labels, model_run=args.model,
                             out=args.out)
    except StorageError as exc:
        print(f"likerank report: {exc}", file=sys.stderr)
        return 1
    print(f"report: {index}")
    print(f"open:   file://{index}")
    return 0

"""``likerank export RUN --format webdataset|hf|parquet``: a published labels run as a dataset."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.core.config import Config
from pipeline.core.export_layout import FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a published labels run as a webdataset, Hugging Face or Parquet dataset")
    p.add_argument("run", metavar="RUN", help="labels run id; must be the published (validated) one")
    p.add_argument("--format", dest="fmt", required=True, choices=FORMATS)
    p.add_argument("--output", metavar="DIR_OR_S3_URI",
                   help="export folder (default: <storage root>/exports/<run>/<format>); an interrupted export "
                        "there resumes")
    p.set_defaults(handler=export)


def export(args: argparse.Namespace, cfg: Config) -> int:
    from likerank.export.export import ExportConflict, export
    from pipeline.core.labels_run import LabelsRunMissing
    from pipeline.core.pseudonym import MissingAuthorKey
    from pipeline.core.published import LabelsNotPublished

    try:
        result = export(cfg, args.run, args.fmt, args.output)
    except (LabelsNotPublished, ExportConflict, LabelsRunMissing, MissingAuthorKey) as exc:
        print(f"likerank export: {exc}", file=sys.stderr)
        return 2
    if result.already_complete:
        print(f"likerank export: {result.uri} already holds the complete {args.fmt} export of run {args.run}; "
              "nothing to do", file=sys.stderr)
    m = result.manifest
    print(json.dumps({"output": result.uri, "format": args.fmt, "run_id": args.run, "samples": m["samples"],
                      "splits": m["splits"], "excluded_by_tombstones": m["excluded_by_tombstones"],
                      "written": result.written, "already_complete": result.already_complete}, indent=2))
    return 0

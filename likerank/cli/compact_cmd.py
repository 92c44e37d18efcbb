"""``likerank compact``: compact, checkpoint and vacuum the tables (see :mod:`pipeline.core.maintain`)."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.core.config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compact", help="compact small table files, checkpoint, vacuum what storage.retention_hours allows")
    p.add_argument("tables", nargs="*", metavar="TABLE", help="only these tables (default: all)")
    p.set_defaults(handler=compact_command)


def compact_command(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.core.maintain import compact_all

    try:
        done = compact_all(cfg, tables=args.tables or None)
    except ValueError as exc:
        print(f"likerank compact: {exc}", file=sys.stderr)
        return 2
    for name, what in done.items():
        optimized = what.get("optimize") or {}
        print(f"{name:<11} version {what.get('version')}: {optimized.get('numFilesRemoved', 0)} file(s) compacted into "
              f"{optimized.get('numFilesAdded', 0)}, {what.get('vacuumed', 0)} vacuumed ({what['seconds']} s)")
    if args.verbose:
        print(json.dumps(done, indent=2, default=str))
    return 0

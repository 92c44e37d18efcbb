"""The ``likerank`` command line.

Each command lives in its own module exposing ``register(subparsers)``; the module adds a
parser whose ``handler`` is called as ``handler(args, cfg)`` with the resolved config and
returns an exit code. Heavy imports stay inside handlers so ``likerank --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.core.config import ConfigError, load_config
from pipeline.core.storage import StorageError

#: Modules that register commands, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "likerank.cli.config_cmd",
    "likerank.cli.query_cmd",
    "likerank.cli.report_cmd",
    "likerank.cli.findings_cmd",
    "likerank.cli.faces_cmd",
    "likerank.cli.sim_cmd",
    "likerank.cli.scrape_cmd",
    "likerank.cli.train_cmd",
    "likerank.cli.export_cmd",
    "likerank.cli.retrain_cmd",
    "likerank.cli.label_cmd",
    "likerank.cli.forget_cmd",
    "likerank.cli.compact_cmd",
    "likerank.cli.migrate_cmd",
    "likerank.cli.score_cmd",
]


def installed_version() -> str:
    """The installed distribution's version (pyproject.toml's ``version``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("likerank")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="likerank",
        description="Engagement-labeled face-photo datasets: scrape, detect faces, label, validate, train.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: $LIKERANK_CONFIG or ./likerank.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config value (repeatable); wins over file and environment")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"likerank {installed_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_config(args.config, overrides=args.overrides)
    except ConfigError as exc:
        print(f"likerank: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.handler(args, cfg) or 0)
    except StorageError as exc:  # already names the root or key and the problem: no traceback
        print(f"likerank {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("likerank: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

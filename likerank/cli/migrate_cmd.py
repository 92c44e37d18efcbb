"""``likerank migrate``: convert a storage root written by the previous release (one Parquet
file per partition, ``state/tombstones.json``, ``state/refs/**/dt=*.parquet``) to the Delta
tables, in place (see :mod:`pipeline.core.migrate`). Rerun it to resume; ``--dry-run`` lists."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipeline.core.config import Config

if TYPE_CHECKING:
    from pipeline.core.migrate import TableResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="convert the previous release's tables, tombstones and post references to Delta")
    p.add_argument("--dry-run", action="store_true", help="list what would be converted (tables, partitions, rows); "
                                                          "change nothing")
    p.set_defaults(handler=migrate_command)


def migrate_command(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.core.forget import salt_for
    from pipeline.core.migrate import BadInput, MigrationError, migrate
    from pipeline.core.storage import StorageError, open_storage
    from pipeline.core.tables import TableConflict

    storage = open_storage(cfg.storage)
    verb = "would convert" if args.dry_run else "converted"

    def report(result: TableResult) -> None:
        print(format_table(result, verb, details=args.dry_run), flush=True)

    try:
        results = migrate(storage, lambda: salt_for(cfg), dry_run=args.dry_run, progress=report)
    except BadInput as exc:
        print(f"likerank migrate: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:  # a count mismatch: that old file stays, for a look before a rerun
        print(f"likerank migrate: {exc}", file=sys.stderr)
        return 1
    except (StorageError, TableConflict) as exc:  # what was converted stays converted: a rerun resumes
        print(f"likerank migrate: {exc}; rerun to convert what is left", file=sys.stderr)
        return 1
    print(format_total(results, storage.root, dry_run=args.dry_run))
    return 0


def format_table(result: TableResult, verb: str, *, details: bool) -> str:
    """One line for a table (and, with ``details``, one per partition or file)."""
    if not result.files:
        return f"{result.table:<11} nothing to do"
    lines = [f"{result.table:<11} {verb} {len(result.files)} partition(s)/file(s), {result.rows} row(s)"]
    if details:
        lines += [f"  {f.where}: {f.rows} row(s)" + (f" from {f.key}" if f.key != f.where else "")
                  for f in result.files]
    lines += [f"  note: {note}" for note in result.notes]
    return "\n".join(lines)


def format_total(results: list[TableResult], root: str, *, dry_run: bool) -> str:
    files, rows = sum(len(r.files) for r in results), sum(r.rows for r in results)
    tables = sum(1 for r in results if r.files)
    if not files:
        return f"nothing to migrate: {root} is in the Delta layout"
    if dry_run:
        return (f"dry run: would convert {files} partition(s)/file(s), {rows} row(s) into {tables} table(s); "
                "nothing changed")
    return f"migrated {files} partition(s)/file(s), {rows} row(s) into {tables} Delta table(s) in {root}"

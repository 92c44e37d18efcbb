"""``likerank migrate``: convert a storage root written by the previous release (one Parquet
file per partition, ``state/tombstones.json``, ``state/refs/**/dt=*.parquet``) to the Delta
tables, in place (see :mod:`pipeline.core.migrate`), then strip the metadata of images stored
before the downloader did (:mod:`pipeline.core.clean_stored_images`). Rerun it to resume;
``--dry-run`` lists."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipeline.core.config import Config

if TYPE_CHECKING:
    from pipeline.core.clean_stored_images import ImageCleaning
    from pipeline.core.migrate import TableResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="convert the previous release's tables, tombstones and post references to Delta; "
                                       "strip the metadata of images stored before")
    p.add_argument("--dry-run", action="store_true", help="list what would be converted (tables, partitions, rows); "
                                                          "change nothing")
    p.set_defaults(handler=migrate_command)


def migrate_command(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.core.clean_stored_images import clean_stored_images
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
        print(format_total(results, storage.root, dry_run=args.dry_run), flush=True)
        cleaning = clean_stored_images(storage, dry_run=args.dry_run)
    except BadInput as exc:
        print(f"likerank migrate: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:  # a count mismatch: that old file stays, for a look before a rerun
        print(f"likerank migrate: {exc}", file=sys.stderr)
        return 1
    except (StorageError, TableConflict) as exc:  # what was converted stays converted: a rerun resumes
        print(f"likerank migrate: {exc}; rerun to convert what is left", file=sys.stderr)
        return 1
    print(format_cleaning(cleaning, dry_run=args.dry_run))
    if cleaning.failed:  # their bytes still carry metadata: say which, and fail so nobody misses it
        print(f"likerank migrate: {len(cleaning.failed)} stored image(s) could not be stripped and were left as they "
              "are (forget or delete them):\n  " + "\n  ".join(cleaning.failed), file=sys.stderr)
        return 1
    return 0


def format_table(result: TableResult, verb: str, *, details: bool) -> str:
    """One line for a table (and, with ``details``, one per partition or file)."""
    if not result.files:
        return "\n".join([f"{result.table:<11} nothing to do", *[f"  note: {note}" for note in result.notes]])
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


def format_cleaning(c: ImageCleaning, *, dry_run: bool) -> str:
    """What stripping the stored images did: counts, rows re-keyed per table, notes."""
    if dry_run:
        return (f"images      would strip the metadata of {c.todo} stored image(s)" if c.todo
                else "images      no stored image left to strip")
    if not (c.todo or c.resumed):
        return "images      no stored image left to strip"
    lines = [f"images      stripped {c.rewritten + c.unchanged} stored image(s): {c.rewritten} rewritten under "
             f"a new digest ({c.bytes_removed} bytes of metadata removed), {c.unchanged} had none"]
    if c.resumed:
        lines.append(f"  finished an interrupted batch of {c.resumed} image(s) first")
    if c.rows:
        lines.append("  rows re-keyed: " + ", ".join(f"{t} {n}" for t, n in sorted(c.rows.items())))
    if c.missing:
        lines.append(f"  {len(c.missing)} image(s) named by the images table are not in storage: left as they are")
    lines += [f"  note: {note}" for note in c.notes]
    return "\n".join(lines)

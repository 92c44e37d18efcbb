"""``likerank query "SQL"``: DuckDB over the tables, printed or written to a file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import Config

if TYPE_CHECKING:
    import pyarrow as pa


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="run SQL (DuckDB) over the tables: posts, engagement, images, "
                                     "downloads, faces, labels (latest published), labels_all")
    p.add_argument("sql", help='e.g. "select label, count(*) from labels group by label"')
    p.add_argument("--output", metavar="FILE", help="write the result to FILE.parquet or FILE.csv instead")
    p.add_argument("--max-rows", type=int, default=40, help="rows to print (default 40)")
    p.set_defaults(handler=query)


def query(args: argparse.Namespace, cfg: Config) -> int:
    import duckdb

    from pipeline.core.query import run_query
    from pipeline.core.storage import open_storage

    if args.output and not args.output.endswith((".parquet", ".csv")):
        print(f"likerank query: --output {args.output}: expected a .parquet or .csv file name", file=sys.stderr)
        return 2
    storage = open_storage(cfg.storage)
    storage.check_root()  # a mistyped root would otherwise answer every query with 0 rows
    try:
        result = run_query(storage, args.sql)
    except duckdb.Error as exc:
        print(f"likerank query: {exc}", file=sys.stderr)
        return 1
    if args.output:
        write_result(result, Path(args.output))
        print(f"{result.num_rows} row(s) -> {args.output}")
        return 0
    print(result.to_pandas().to_string(max_rows=args.max_rows, index=False))
    return 0


def write_result(result: pa.Table, path: Path) -> None:
    """``result`` as Parquet or CSV at ``path``, whole or not at all (written beside, then renamed).

    CSV has no lists or structs (``tags``, ``image_urls``, a face's box): such a column is
    written as JSON text, one value per cell, which DuckDB's and pandas' readers parse back.
    """
    import pyarrow.csv
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if path.suffix == ".parquet":
            pq.write_table(result, tmp)
        else:
            pyarrow.csv.write_csv(_flat_for_csv(result), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _flat_for_csv(result: pa.Table) -> pa.Table:
    import pyarrow as pa

    for i, fld in enumerate(result.schema):
        if pa.types.is_nested(fld.type):
            cells = [None if v is None else json.dumps(v, default=str) for v in result.column(i).to_pylist()]
            result = result.set_column(i, pa.field(fld.name, pa.string()), pa.array(cells, pa.string()))
    return result

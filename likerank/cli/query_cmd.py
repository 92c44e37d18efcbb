"""``likerank query "SQL"``: DuckDB over the tables, printed or written to a file."""

from __future__ import annotations

import argparse
import sys

from pipeline.core.config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="run SQL (DuckDB) over the tables: posts, engagement, images, "
                                     "downloads, faces, labels (latest published), labels_all")
    p.add_argument("sql", help='e.g. "select label, count(*) from labels group by label"')
    p.add_argument("--output", metavar="FILE", help="write the result to FILE.parquet or FILE.csv instead")
    p.add_argument("--max-rows", type=int, default=40, help="rows to print (default 40)")
    p.set_defaults(handler=query)


def query(args: argparse.Namespace, cfg: Config) -> int:
    import duckdb
    import pyarrow.csv
    import pyarrow.parquet as pq

    from pipeline.core.query import run_query
    from pipeline.core.storage import open_storage

    try:
        result = run_query(open_storage(cfg.storage), args.sql)
    except duckdb.Error as exc:
        print(f"likerank query: {exc}", file=sys.stderr)
        return 1
    if args.output:
        if args.output.endswith(".parquet"):
            pq.write_table(result, args.output)
        elif args.output.endswith(".csv"):
            pyarrow.csv.write_csv(result, args.output)
        else:
            print(f"likerank query: --output {args.output}: expected a .parquet or .csv file name", file=sys.stderr)
            return 2
        print(f"{result.num_rows} row(s) -> {args.output}")
        return 0
    print(result.to_pandas().to_string(max_rows=args.max_rows, index=False))
    return 0

"""Analyst access: DuckDB over views named after the tables.

Views: ``posts``, ``engagement``, ``images``, ``downloads``, ``faces`` (every partition, with
its partition column), ``labels`` (the latest *published* run) and ``labels_all`` (every run).
Tables are registered as pyarrow datasets, so the same code reads a local folder or S3 with
the storage layer's endpoint and credentials (DuckDB's httpfs extension is not needed).
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from pipeline.core.published import published_run_id
from pipeline.core.schemas import TABLES
from pipeline.core.storage import Storage
from pipeline.core.tables import dataset, list_partitions


def connect(storage: Storage) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for name, table in TABLES.items():
        view = "labels_all" if name == "labels" else name
        if list_partitions(storage, name):
            con.register(view, dataset(storage, name))
        else:  # an empty table with the right columns, so queries still parse
            con.register(view, table.schema.append(pa.field(table.partition, pa.string())).empty_table())
    run = published_run_id(storage)
    parts = [run] if run else []
    if parts:
        con.register("labels", dataset(storage, "labels", parts))
    else:
        con.execute("create view labels as select * from labels_all limit 0")
    return con


def run_query(storage: Storage, sql: str) -> pa.Table:
    con = connect(storage)
    try:
        rel = con.sql(sql)
        return rel.to_arrow_table() if rel is not None else pa.table({})
    finally:
        con.close()

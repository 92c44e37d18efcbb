"""Analyst access: DuckDB over views named after the tables.

Views: ``posts``, ``engagement``, ``images``, ``downloads``, ``faces`` (the current version of
each Delta table, every partition, with its partition column), ``labels`` (the latest
*published* run), ``labels_all`` (every run) and ``predictions`` (every model run's val/test
predictions, with its ``model_run``). Tables are registered as pyarrow datasets over the files
of their current version (never a raw glob, which would also see replaced files), so the same
code reads a local folder or S3 with the storage layer's endpoint and credentials (DuckDB's
httpfs extension is not needed).
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from pipeline.core.published import published_run_id
from pipeline.core.schemas import PREDICTIONS, TABLES
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
    con.register("predictions", predictions_dataset(storage))
    return con


def predictions_dataset(storage: Storage) -> ds.Dataset:
    """Every model run's ``predictions.parquet`` as one dataset with a ``model_run`` column."""
    import pyarrow.parquet as pq

    fs, base = storage.arrow_fs()
    files = [k for k in storage.list("models/") if k.endswith("/predictions.parquet")]
    schema = PREDICTIONS.append(pa.field("model_run", pa.string()))
    if not files:
        return ds.dataset(schema.empty_table())
    pieces = []
    for key in files:
        t = pq.read_table(f"{base}/{key}", filesystem=fs)
        pieces.append(t.append_column("model_run", pa.array([key.split("/")[1]] * t.num_rows, pa.string())))
    return ds.dataset(pa.concat_tables(pieces, promote_options="permissive"))


def run_query(storage: Storage, sql: str) -> pa.Table:
    con = connect(storage)
    try:
        rel = con.sql(sql)
        return rel.to_arrow_table() if rel is not None else pa.table({})
    finally:
        con.close()

"""Parquet tables on a :class:`~pipeline.core.storage.Storage`: atomic, idempotent partition writes
and hive-partitioned reads through pyarrow datasets.

Each partition is exactly one file, ``<table path>/<key>=<value>/data.parquet``. Writing a
partition replaces that one object atomically (see ``Storage.put_bytes``), so a reader sees the
old partition or the new one, never a mix, and a rerun for the same logical date replaces
rather than appends. A writer killed mid-write leaves the previous partition intact.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.core import keys
from pipeline.core.schemas import PREDICTIONS, TABLES, conform
from pipeline.core.storage import Storage

DATA_FILE = "data.parquet"


def partition_key(table: str, value: str) -> str:
    t = TABLES[table]
    if not value or "/" in value or "=" in value:
        raise ValueError(f"table {table}: bad partition value {value!r}")
    return f"{t.path}/{t.partition}={value}/{DATA_FILE}"


def write_partition(storage: Storage, table: str, value: str, data: pa.Table | Iterable[pa.Table]) -> str:
    """Check ``data`` against the table's schema and write it as partition ``value``; return its key.

    ``data`` may come in pieces (one row group or more each), so a large table is written
    without ever being whole in memory; the file is stored once all are written.
    """
    buf = io.BytesIO()
    if isinstance(data, pa.Table):
        pq.write_table(conform(table, data), buf, compression="zstd")
    else:
        with pq.ParquetWriter(buf, TABLES[table].schema, compression="zstd") as writer:
            for piece in data:
                writer.write_table(conform(table, piece))
    key = partition_key(table, value)
    storage.put_bytes(key, buf.getvalue())
    return key


def list_partitions(storage: Storage, table: str) -> list[str]:
    t = TABLES[table]
    head = f"{t.path}/{t.partition}="
    return sorted(
        k[len(head):].split("/", 1)[0] for k in storage.list(head) if k.endswith("/" + DATA_FILE)
    )


def dataset(storage: Storage, table: str, partitions: list[str] | None = None) -> ds.Dataset:
    """A pyarrow dataset over a table (all partitions, or the given ones), with its partition column."""
    t = TABLES[table]
    fs, base = storage.arrow_fs()
    values = list_partitions(storage, table) if partitions is None else partitions
    files = [f"{base}/{partition_key(table, v)}" for v in values]
    part = ds.partitioning(pa.schema([(t.partition, pa.string())]), flavor="hive")
    schema = t.schema.append(pa.field(t.partition, pa.string()))
    return ds.dataset(files, schema=schema, format="parquet", filesystem=fs,
                      partitioning=part, partition_base_dir=f"{base}/{t.path}")


def read_table(storage: Storage, table: str, partitions: list[str] | None = None,
               columns: list[str] | None = None, filter: Any = None) -> pa.Table:
    return dataset(storage, table, partitions).to_table(columns=columns, filter=filter)


def object_sha256(storage: Storage, key: str) -> str:
    """The sha256 of one stored object's bytes (e.g. a labels partition: what validation vouched for)."""
    return hashlib.sha256(storage.get_bytes(key)).hexdigest()


def put_json(storage: Storage, key: str, obj: Any) -> None:
    storage.put_text(key, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def get_json(storage: Storage, key: str, default: Any = None) -> Any:
    if not storage.exists(key):
        return default
    return json.loads(storage.get_text(key))


def markdown_reference() -> str:
    """README's table reference, generated so it cannot drift from the code."""
    out = []
    where = {t.name: (f"{t.path}/{t.partition}=…/", t.schema) for t in TABLES.values()}
    where["predictions"] = (keys.model_predictions("<run>"), PREDICTIONS)
    for name, (path, schema) in where.items():
        out.append(f"### `{name}` — `{path}`\n")
        out.append("| column | type | null | meaning |\n| --- | --- | --- | --- |")
        for fld in schema:
            doc = (fld.metadata or {}).get(b"doc", b"").decode()
            out.append(f"| `{fld.name}` | `{fld.type}` | {'yes' if fld.nullable else 'no'} | {doc} |")
        out.append("")
    return "\n".join(out)

"""Delta Lake tables on a :class:`~pipeline.core.storage.Storage`: every table read and write.

Each table of :data:`pipeline.core.schemas.TABLES` is a Delta table (Parquet data files plus a
transaction log, through ``deltalake``, delta-rs) at ``<storage root>/<table path>/``,
partitioned by its partition column. Many processes may write one table at once:

- **writes are commits**: a reader sees a table version, never a half-written one; a writer
  killed before its commit leaves the table as it was (its stray files are never referenced);
- **idempotent**: :func:`merge_rows` upserts on the table's identity key (a rerun or retry
  duplicates nothing, the newest row wins) and :func:`write_partition` replaces one
  partition (``replaceWhere``);
- **conflicts are retried**: a commit that lost a race with another writer is tried again, with
  exponential backoff and full jitter, at most :data:`COMMIT_ATTEMPTS` times, then
  :class:`TableConflict` says so;
- **each commit names its maker**: the Airflow DAG, run and task (from Airflow's
  ``AIRFLOW_CTX_*`` environment) or the command, in the commit's metadata;
- **streamed**: data goes in as Arrow record batches; no table is built whole in memory here;
- **nothing personal in the log**: data-skipping statistics cover only the columns of
  :data:`STATS_EXCLUDED`'s complement, so author keys, post ids and URLs never reach
  ``_delta_log``, and a forget that vacuums leaves no byte of them anywhere.

Every read goes through here too (:func:`dataset`, :func:`read_table`), optionally at a past
version (time travel, until :func:`vacuum` removes that version's files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline.core import keys
from pipeline.core.schemas import INTERNAL_TABLES, PREDICTIONS, TABLES, Table, conform
from pipeline.core.storage import Storage

log = logging.getLogger(__name__)

#: Tries of one commit that conflicts with concurrent writers before :class:`TableConflict`.
#: Writers that merge into one partition back to back conflict on most tries (a merge reads the
#: whole partition, so any commit there in the meantime wins); with jittered backoff a writer
#: gets through within a few dozen tries even against three others committing nonstop.
COMMIT_ATTEMPTS = 60
#: Backoff between conflicting tries: full jitter up to BASE * 2**try seconds, capped.
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 8.0
#: Columns that identify a person or a post: kept out of the data-skipping statistics, which
#: Delta stores in ``_delta_log`` (min/max per file) and which a vacuum never removes.
STATS_EXCLUDED = frozenset({"author_key", "post_id", "url", "image_urls", "sha256", "image_sha256",
                            "storage_key", "tags", "key_hash", "ref", "faces", "error", "phash"})


class TableConflict(RuntimeError):
    """A commit kept conflicting with concurrent writers; the message names the table."""


def spec(table: str) -> Table:
    try:
        return TABLES[table] if table in TABLES else INTERNAL_TABLES[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}") from None


def delta_schema(table: str) -> pa.Schema:
    """The table's schema as stored: its columns plus the partition column (a string). Every
    column is nullable in the Delta table: :func:`~pipeline.core.schemas.conform` enforces the
    declared nulls before each write, and validation checks them again before labels publish."""
    t = spec(table)
    schema = t.schema if not t.partition else t.schema.append(pa.field(t.partition, pa.string()))
    return pa.schema([f.with_nullable(True) for f in schema], metadata=schema.metadata)


def table_configuration(table: str) -> dict[str, str]:
    """Delta table properties every likerank table is created with."""
    t = spec(table)
    stats = [n for n in delta_schema(table).names if n not in STATS_EXCLUDED]
    return {"delta.dataSkippingStatsColumns": ",".join(stats) if stats else (t.partition or "")}


def location(storage: Storage, table: str) -> tuple[str, dict[str, str]]:
    """The table's URI and the ``storage_options`` delta-rs needs to reach it."""
    return storage.table_location(spec(table).path)


def commit_metadata(operation: str, table: str) -> dict[str, str]:
    """Who made a commit: the Airflow task (when run by Airflow) or the command, and what for."""
    meta = {"likerank.operation": operation, "likerank.table": table}
    airflow = {"dag_id": "AIRFLOW_CTX_DAG_ID", "run_id": "AIRFLOW_CTX_DAG_RUN_ID",
               "task_id": "AIRFLOW_CTX_TASK_ID", "try_number": "AIRFLOW_CTX_TRY_NUMBER"}
    for name, env in airflow.items():
        if os.environ.get(env):
            meta[f"airflow.{name}"] = os.environ[env]
    if "airflow.dag_id" not in meta:
        meta["likerank.command"] = " ".join(os.path.basename(a) for a in sys.argv[:2])[:200]
    return meta


def _writer_properties():
    """zstd, as the tables were before they were Delta: about 40% smaller than snappy here."""
    from deltalake import WriterProperties

    return WriterProperties(compression="ZSTD")


def _commit_properties(operation: str, table: str):
    from deltalake import CommitProperties

    # delta-rs retries a conflicting commit itself when it can rebase it (e.g. two appends);
    # what it cannot rebase reaches :func:`_with_retries`.
    return CommitProperties(custom_metadata=commit_metadata(operation, table), max_commit_retries=5)


#: Tries of one read, or of one write that failed on the network (a dropped connection, a 5xx,
#: a body cut short), before the error is raised: object_store retries requests, not bodies.
STORAGE_ATTEMPTS = 6


def _transient(exc: BaseException) -> bool:
    """A storage error worth another try: the network or the store, not the data or the table."""
    from deltalake.exceptions import (
        CommitFailedError,
        DeltaError,
        DeltaProtocolError,
        SchemaMismatchError,
    )

    if isinstance(exc, (CommitFailedError, DeltaProtocolError, SchemaMismatchError, FileNotFoundError)):
        return False
    text = str(exc)
    return isinstance(exc, (OSError, DeltaError)) and any(
        s in text for s in ("object store", "S3 error", "body error", "connection", "Connection", "timed out",
                            "HTTP error", "IO error", "Io error"))


def _with_retries(table: str, what: str, attempt) -> Any:
    """Run ``attempt()`` (a read, or a write until it commits). Commit conflicts are retried
    with backoff and jitter, up to :data:`COMMIT_ATTEMPTS`; a transient storage error, up to
    :data:`STORAGE_ATTEMPTS` (reads are always safe to repeat, and every write here is
    idempotent, so one that reached the store before the error is harmless to repeat)."""
    from deltalake.exceptions import CommitFailedError

    conflicts = failures = 0
    while True:
        try:
            return attempt()
        except CommitFailedError as exc:
            conflicts += 1
            if conflicts >= COMMIT_ATTEMPTS:
                raise TableConflict(f"table {table}: {what} conflicted with concurrent writers {COMMIT_ATTEMPTS} "
                                    f"times in a row; last: {exc}") from exc
            time.sleep(_backoff_s(conflicts))
        except Exception as exc:
            failures += 1
            if not _transient(exc) or failures >= STORAGE_ATTEMPTS:
                raise
            log.warning("table %s: %s met a storage error, trying again: %s", table, what, str(exc)[:200])
            time.sleep(_backoff_s(failures))


def _backoff_s(tries: int) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**tries)] seconds."""
    return random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** tries))


def open_table(storage: Storage, table: str, version: int | None = None):
    """The table's :class:`deltalake.DeltaTable` (at ``version``), or None if it has no commit yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    uri, options = location(storage, table)
    try:
        return _with_retries(table, "a read", lambda: DeltaTable(uri, version=version, storage_options=options))
    except TableNotFoundError:
        if version is not None:
            raise
        return None


def add_missing_columns(storage: Storage, table: str, dt=None) -> list[str]:
    """Add the columns the table's schema declares but its Delta table lacks (a column added
    to :mod:`~pipeline.core.schemas` since the table was created); return their names. New
    columns are nullable, so the rows already written read them as null. Run before every
    write, so a writer of this release never meets an older table's narrower schema."""
    from deltalake import Field

    dt = dt if dt is not None else open_table(storage, table)
    if dt is None:
        return []
    have = {f.name for f in dt.schema().fields}
    missing = [f for f in delta_schema(table) if f.name not in have]
    if missing:
        log.info("table %s: adding column(s) %s", table, ", ".join(f.name for f in missing))
        try:
            dt.alter.add_columns([Field.from_arrow(f) for f in missing],
                                 commit_properties=_commit_properties("add columns", table))
        except Exception:  # noqa: BLE001 - another writer may have added them first
            again = open_table(storage, table)
            if again is None or {f.name for f in missing} - {f.name for f in again.schema().fields}:
                raise
    return [f.name for f in missing]


def version(storage: Storage, table: str) -> int | None:
    """The table's current version, or None if it has no commit yet."""
    dt = open_table(storage, table)
    return None if dt is None else dt.version()


class _Stream:
    """The pieces conformed to the table's schema (plus its partition column), as a record
    batch stream. delta-rs reports an exception raised inside the stream as its own error;
    :meth:`reraise` gives back the original (a :class:`~pipeline.core.schemas.SchemaError`
    naming the table and column)."""

    def __init__(self, table: str, pieces: Iterable[pa.Table], partition_value: str | None):
        self.table, self.pieces, self.partition_value = table, pieces, partition_value
        self.error: BaseException | None = None

    def reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(delta_schema(self.table), self._batches())

    def _batches(self) -> Iterator[pa.RecordBatch]:
        schema, t = delta_schema(self.table), spec(self.table)
        try:
            for piece in self.pieces:
                data = conform(self.table, piece.drop_columns([t.partition]) if t.partition in piece.column_names
                               else piece)
                if t.partition:
                    data = data.append_column(schema.field(t.partition),
                                              pa.array([self.partition_value] * data.num_rows, pa.string()))
                yield from data.cast(schema).to_batches()
        except Exception as exc:
            self.error = exc
            raise

    def reraise(self, exc: BaseException) -> None:
        if self.error is not None:
            raise self.error from None
        raise exc


def _check_partition_value(table: str, value: str) -> None:
    if not value or "/" in value or "=" in value or "'" in value:
        raise ValueError(f"table {table}: bad partition value {value!r}")


def open_for_write(storage: Storage, table: str):
    """:func:`open_table`, after :func:`add_missing_columns`: delta-rs's MERGE silently drops a
    source column its target lacks, and an overwrite refuses the wider schema."""
    dt = open_table(storage, table)
    if dt is not None and add_missing_columns(storage, table, dt):
        dt = open_table(storage, table)
    return dt


def write_partition(storage: Storage, table: str, value: str,
                    data: pa.Table | Callable[[], Iterable[pa.Table]]) -> str:
    """Replace partition ``value`` of ``table`` with ``data`` in one commit; return its URI.

    ``data`` is a table, or a function returning its pieces (one row group or more each), so
    a large partition is written without ever being whole in memory; a commit that conflicts
    calls it again. Rerunning it replaces, never appends.
    """
    from deltalake import write_deltalake

    t = spec(table)
    _check_partition_value(table, value)
    pieces = (lambda: [data]) if isinstance(data, pa.Table) else data
    uri, options = location(storage, table)

    def attempt() -> None:
        exists = open_for_write(storage, table) is not None
        stream = _Stream(table, pieces(), value)
        try:
            write_deltalake(uri, stream.reader(), mode="overwrite" if exists else "append",
                            predicate=f"{t.partition} = '{value}'" if exists else None, partition_by=[t.partition],
                            configuration=None if exists else table_configuration(table), storage_options=options,
                            writer_properties=_writer_properties(),
                            commit_properties=_commit_properties(f"write {t.partition}={value}", table))
        except Exception as exc:  # noqa: BLE001 - a conflict propagates; a stream error comes back as itself
            stream.reraise(exc)

    _with_retries(table, f"writing partition {t.partition}={value}", attempt)
    return f"{uri}/{t.partition}={value}"


def merge_rows(storage: Storage, table: str, rows: pa.Table, *, partition_value: str | None = None,
               operation: str = "merge") -> MergeCounts:
    """Upsert ``rows`` on the table's identity key (newest wins) in one commit.

    Rows with the same key within ``rows`` keep the last one. A rerun of the same rows changes
    nothing but their values; it never duplicates a row.
    """
    t = spec(table)
    if partition_value is not None:
        _check_partition_value(table, partition_value)
    if not rows.num_rows:
        return MergeCounts(0, 0)
    batch = _Stream(table, [rows], partition_value).reader().read_all()
    batch = last_per_key(batch, t.identity)
    uri, options = location(storage, table)

    def attempt() -> MergeCounts:
        from deltalake import write_deltalake

        dt = open_for_write(storage, table)
        if dt is None:
            write_deltalake(uri, batch, mode="append", partition_by=[t.partition] if t.partition else None,
                            configuration=table_configuration(table), storage_options=options,
                            writer_properties=_writer_properties(), commit_properties=_commit_properties(operation, table))
            return MergeCounts(batch.num_rows, 0)
        # Equal partition values first: delta-rs prunes the target to the partitions the source has.
        on = [t.partition] if t.partition in t.identity else []
        predicate = " AND ".join(f"t.{c} = s.{c}" for c in [*on, *[c for c in t.identity if c not in on]])
        result = (dt.merge(batch, predicate, source_alias="s", target_alias="t", writer_properties=_writer_properties(),
                           commit_properties=_commit_properties(operation, table))
                  .when_matched_update_all().when_not_matched_insert_all().execute())
        return MergeCounts(int(result["num_target_rows_inserted"]), int(result["num_target_rows_updated"]))

    return _with_retries(table, f"{operation} of {batch.num_rows} row(s)", attempt)


@dataclass(frozen=True)
class MergeCounts:
    inserted: int
    updated: int


def delete_rows(storage: Storage, table: str, matching: pa.Table, *, operation: str = "forget") -> int:
    """Delete the rows whose columns equal one row of ``matching`` (its column names) in one
    MERGE commit; return how many went. The values travel as data, never as a predicate string,
    so none of them is written into the transaction log."""
    if not matching.num_rows:
        return 0
    dt = open_table(storage, table)
    if dt is None:
        return 0
    predicate = " AND ".join(f"t.{c} = s.{c}" for c in matching.column_names)
    source = matching.group_by(matching.column_names).aggregate([])  # a target row may match once only

    def attempt() -> int:
        current = open_table(storage, table)
        result = (current.merge(source, predicate, source_alias="s", target_alias="t",
                                writer_properties=_writer_properties(),
                                commit_properties=_commit_properties(operation, table))
                  .when_matched_delete().execute())
        return int(result["num_target_rows_deleted"])

    return _with_retries(table, f"{operation} (delete)", attempt)


def last_per_key(data: pa.Table, key: list[str]) -> pa.Table:
    """``data`` with one row per ``key``: the last one (the newest), in their original order."""
    import numpy as np

    if not data.num_rows:
        return data
    with_row = data.append_column("__row", pa.array(np.arange(data.num_rows)))
    last = with_row.group_by(key, use_threads=False).aggregate([("__row", "max")])["__row_max"]
    return data.take(np.sort(last.to_numpy()))


def list_partitions(storage: Storage, table: str) -> list[str]:
    """The partition values that hold rows now, sorted."""
    t = spec(table)
    dt = open_table(storage, table)
    if dt is None or not t.partition:
        return []
    return sorted({p[t.partition] for p in dt.partitions()})


def _dataset_filesystem(storage: Storage, table: str) -> pafs.FileSystem:
    """The table's folder on a native pyarrow filesystem, for :func:`dataset` to read through.

    Not deltalake's default, a Python filesystem (``PyFileSystem`` over its Rust store): with
    it, Arrow's reader threads call into Python for every read, and a read still in flight
    when the interpreter finalizes (left by a LIMIT query, a ``head()``, a reader not drained)
    asks for the GIL on a thread CPython no longer lets run. The process then aborts
    ("terminate called without an active exception"), segfaults or hangs in Arrow's
    thread-pool shutdown after its work is done, and Airflow marks its task failed. A native
    filesystem keeps Python off Arrow's threads. The log's file paths are relative to the
    table's folder, as a subtree filesystem rooted there expects.
    """
    fs, base = storage.arrow_fs()
    return pafs.SubTreeFileSystem(f"{base.rstrip('/')}/{spec(table).path}", fs)


def dataset(storage: Storage, table: str, partitions: list[str] | None = None,
            version: int | None = None) -> ds.Dataset:
    """A pyarrow dataset over the table's current (or ``version``'s) files, partition column
    included; all partitions, or the given ones. Empty, with the table's schema, before the
    first commit."""
    t = spec(table)
    dt = open_table(storage, table, version)
    if dt is None:
        return ds.dataset(delta_schema(table).empty_table())
    filters = [(t.partition, "in", list(partitions))] if partitions is not None and t.partition else None
    if partitions is not None and not partitions:
        return ds.dataset(delta_schema(table).empty_table())
    return dt.to_pyarrow_dataset(file_pruning_predicate=filters, filesystem=_dataset_filesystem(storage, table))


def read_table(storage: Storage, table: str, partitions: list[str] | None = None,
               columns: list[str] | None = None, filter: Any = None, version: int | None = None) -> pa.Table:
    """Rows of the table (or of some partitions, some columns, matching ``filter``), in the
    types of its schema. A column the schema gained after the table was written reads as null."""
    def read() -> pa.Table:
        data = dataset(storage, table, partitions, version)
        have = set(data.schema.names)
        wanted = columns if columns is not None else [*data.schema.names,
                                                      *[f.name for f in spec(table).schema if f.name not in have]]
        stored = [c for c in wanted if c in have]
        rows = (_declared_types(table, data.to_table(columns=stored)) if filter is None
                else _read_filtered(data, table, stored, filter))
        for name in wanted:
            if name not in have:  # only nullable columns are ever added to a schema
                field = spec(table).schema.field(name)
                rows = rows.append_column(field, pa.nulls(rows.num_rows, field.type))
        return rows.select(wanted)

    return _with_retries(table, "a read", read)


def _read_filtered(data: ds.Dataset, table: str, columns: list[str] | None, filter: Any) -> pa.Table:
    """Rows matching ``filter``, filtered batch by batch after the read rather than pushed down.

    A file that delta-rs's MERGE wrote keeps DataFusion's ``string_view`` as its Arrow type,
    while the table's schema says ``string``; pyarrow evaluates a pushed-down filter against
    each file's own types and has no kernel comparing the two. Reading each batch in the
    table's types first, then filtering, holds one batch plus the matches in memory.
    """
    pieces = []
    for batch in data.to_batches():
        rows = _declared_types(table, pa.Table.from_batches([batch])).filter(filter)
        pieces.append(rows.select(columns) if columns is not None else rows)
    if not pieces:
        empty = _declared_types(table, data.schema.empty_table())
        return empty.select(columns) if columns is not None else empty
    return pa.concat_tables(pieces)


def _declared_types(table: str, data: pa.Table) -> pa.Table:
    """``data`` in the fields of the table's schema: Delta stores every column nullable and has
    no fixed-size lists (a face's ten landmarks), so both come back as declared."""
    t = spec(table)
    declared = {f.name: f for f in t.schema}
    if t.partition:
        declared[t.partition] = pa.field(t.partition, pa.string(), nullable=False)
    target = pa.schema([declared.get(f.name, f) for f in data.schema])
    if data.schema.equals(target, check_metadata=True):
        return data
    return data.cast(target)


def _partition_files(storage: Storage, table: str, value: str) -> list[bytes]:
    """The bytes of one partition's data files at the current version, in path order (none
    for a partition written empty: Delta keeps no file for zero rows)."""
    t = spec(table)
    dt = open_table(storage, table)
    if dt is None:
        raise FileNotFoundError(f"table {table} does not exist at {location(storage, table)[0]}")
    actions = pa.table(dt.get_add_actions(flatten=True)).to_pydict()
    files = sorted(path for path, part in zip(actions["path"], actions[f"partition.{t.partition}"], strict=True)
                   if part == value)  # paths relative to the table's folder
    return [storage.get_bytes(f"{t.path}/{rel}") for rel in files]


def _sha256(blobs: list[bytes]) -> str:
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(blob)
    return digest.hexdigest()


def partition_sha256(storage: Storage, table: str, value: str) -> str:
    """The content hash of one partition: sha256 over its data files' bytes at the current
    version, in path order. What a labels run's record and its validation vouch for; any
    rewrite of the partition (a rebuild, a forget) changes it."""
    return _sha256(_partition_files(storage, table, value))


def read_partition_exact(storage: Storage, table: str, value: str) -> tuple[pa.Table, str]:
    """One partition's rows as written (its columns and types as they are in the files, no
    schema enforced: validation is the check) and the :func:`partition_sha256` of exactly the
    bytes they were read from."""
    import io

    import pyarrow.parquet as pq

    t = spec(table)
    blobs = _partition_files(storage, table, value)
    if not blobs:
        return t.schema.empty_table(), _sha256(blobs)
    rows = pa.concat_tables([pq.read_table(io.BytesIO(blob)) for blob in blobs], promote_options="permissive")
    return rows.drop_columns([t.partition]) if t.partition in rows.column_names else rows, _sha256(blobs)


def maintain(storage: Storage, table: str, *, retention_hours: float, optimize: bool = True) -> dict[str, Any]:
    """Compact small files (optimize), write a checkpoint, vacuum files older than
    ``retention_hours`` that the table no longer references, and drop log entries the checkpoint
    covers. Files never committed (a writer's in-flight data) are left alone: the vacuum is the
    log-driven ("lite") one, so it is safe beside running writers."""
    dt = open_table(storage, table)
    if dt is None:
        return {"table": table, "version": None}
    out: dict[str, Any] = {"table": table}
    if optimize:
        out["optimize"] = _with_retries(table, "compaction", lambda: open_table(storage, table).optimize.compact(
            writer_properties=_writer_properties(), commit_properties=_commit_properties("compact", table)))
    dt = open_table(storage, table)
    out["vacuumed"] = len(dt.vacuum(retention_hours=int(retention_hours), dry_run=False,
                                    enforce_retention_duration=False,
                                    commit_properties=_commit_properties("vacuum", table)))
    dt = open_table(storage, table)
    dt.create_checkpoint()
    dt.cleanup_metadata()
    out["version"] = open_table(storage, table).version()
    return out


def vacuum_now(storage: Storage, table: str) -> int:
    """Delete every file the current version no longer references, now (zero retention), then
    checkpoint: after a forget, the removed rows' old files must not outlive it. Returns the
    files deleted."""
    dt = open_table(storage, table)
    if dt is None:
        return 0
    deleted = dt.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False,
                        commit_properties=_commit_properties("vacuum after forget", table))
    open_table(storage, table).create_checkpoint()
    return len(deleted)


def object_sha256(storage: Storage, key: str) -> str:
    """The sha256 of one stored object's bytes."""
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
    where = {t.name: (f"{t.path}/ (Delta, partitioned by {t.partition})", t.schema) for t in TABLES.values()}
    where["predictions"] = (keys.model_predictions("<run>"), PREDICTIONS)
    for name, (path, schema) in where.items():
        out.append(f"### `{name}` — `{path}`\n")
        out.append("| column | type | null | meaning |\n| --- | --- | --- | --- |")
        for fld in schema:
            doc = (fld.metadata or {}).get(b"doc", b"").decode()
            out.append(f"| `{fld.name}` | `{fld.type}` | {'yes' if fld.nullable else 'no'} | {doc} |")
        out.append("")
    return "\n".join(out)

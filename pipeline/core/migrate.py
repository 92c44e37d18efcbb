"""Converting a storage root from the previous release's layout to the Delta tables, in place.

    results = migrate(storage, salt)            # or dry_run=True: list, change nothing

What the previous release wrote, and what each becomes:

- **table partitions**: one Parquet file per partition, ``<table path>/<col>=<value>/data.parquet``
  (``posts/dt=2026-11-02/data.parquet``, ``images/index/dt=…``, ``labels/run=<id>/…``). Each
  file is read a row group at a time, conformed to the table's schema
  (:func:`~pipeline.core.schemas.conform`) and written as that partition of the Delta table
  (:func:`~pipeline.core.tables.write_partition`): one partition in memory at most, never a table;
- **tombstones**: a JSON list at ``state/tombstones.json`` of records ``{"at", "reason",
  "authors", "posts", "images"}`` that named authors and posts in the clear. They become rows
  of the ``tombstones`` table holding only salted hashes (:func:`~pipeline.core.pseudonym.tombstone_hash`
  under the deployment's salt): one ``author`` row per author key, one ``post`` row per
  ``(instance, post_id)`` carrying its record's image digests. A key named by several records
  gets the images of all of them and the reason and time of the newest;
- **post references**: ``state/refs/<platform>/<host>/dt=<day>.parquet`` (``post_id``,
  ``author_key``, ``ref``; a port written ``host_8080``) become rows of the ``post_refs``
  table, merged day by day in date order so the newest reference of a post wins, as before.

Tombstones go first: the new release's scrapes and labels runs read the ``tombstones`` table,
so forgotten people must be covered there before anything else is converted.

**Counts are checked before anything is deleted.** After each partition is written, its rows
are read back through :func:`~pipeline.core.tables.read_table` and counted; only when the count
equals the old file's row count (from its Parquet footer) is the old file deleted. A mismatch
raises :class:`CountMismatch` naming table, partition and both counts, and leaves the old file
where it is. Tombstones and post references are checked the same way: every key converted must
be found in the table.

**Idempotent and resumable.** What has been converted is gone from the old layout, so a rerun
(after a crash, or on a root already converted) converts what is left and reports nothing to
do for the rest. A partition whose old file is still there is written again from it: it
replaces the partition rather than adding to it (the old file was the partition's whole
content), and merging tombstones and references twice duplicates nothing. A root that is
already Delta keeps its Delta rows; old files found beside them are merged in.

**Columns added since.** A table whose schema has gained (nullable) columns since it was written
gets them (:func:`~pipeline.core.tables.add_missing_columns`); its earlier rows read them as
null. An old partition file without them is converted with them null.

**Stored images lose their metadata.** Images stored before the downloader stripped EXIF, XMP,
IPTC and comments are stripped in place and re-keyed under their new digest
(:mod:`pipeline.core.clean_stored_images`); ``likerank migrate`` runs it after the tables.

Only the :class:`~pipeline.core.storage.Storage` interface is used, so local roots and S3 alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import published
from pipeline.core.pseudonym import tombstone_hash
from pipeline.core.schemas import INTERNAL_TABLES, TABLES, TOMBSTONES, SchemaError, conform
from pipeline.core.storage import Storage, StorageError
from pipeline.core.tables import add_missing_columns, merge_rows, read_table, spec, write_partition

log = logging.getLogger(__name__)

#: The previous release's file name of every table partition.
OLD_DATA_FILE = "data.parquet"
#: The previous release's tombstones: a JSON list of records naming authors and posts.
OLD_TOMBSTONES = "state/tombstones.json"
#: The previous release's post references: ``<platform>/<host>/dt=<day>.parquet`` below this.
OLD_REFS = "state/refs/"


class MigrationError(RuntimeError):
    """The migration stopped; the message says where and why."""


class BadInput(MigrationError):
    """The root, or a file of the previous layout in it, cannot be converted as it is."""


class CountMismatch(MigrationError):
    """Rows read back from a converted partition differ from the old file's: the old file stays."""


@dataclass(frozen=True)
class OldFile:
    """One file of the previous layout and where its rows go."""

    table: str  # the Delta table it becomes part of
    key: str  # its storage key
    part: str  # what it is within the table: a partition value, or platform/host/dt=day for refs
    rows: int  # rows it holds (tombstones: rows it will make)

    @property
    def where(self) -> str:
        """The file's place in its table, for people: ``dt=2026-11-02``, ``bluesky/host/dt=…``."""
        t = spec(self.table)
        return f"{t.partition}={self.part}" if t.partition else self.part


@dataclass
class TableResult:
    """What was (or, in a dry run, would be) converted into one table."""

    table: str
    files: list[OldFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


Progress = Callable[[TableResult], None]
Salt = str | Callable[[], str]


# --------------------------------------------------------------------------- finding the old layout


def old_partitions(storage: Storage, table: str) -> list[OldFile]:
    """The previous layout's partition files of ``table``, by partition value."""
    t = spec(table)
    head = f"{t.path}/{t.partition}="
    out = []
    for key in storage.list(head):
        value, _, rest = key[len(head):].partition("/")
        # Delta's own files in the same folders are named part-*.parquet; only data.parquet is old.
        if rest == OLD_DATA_FILE and value:
            out.append(OldFile(table, key, value, _parquet_rows(storage, key)))
    return out


def _host_from_folder(name: str) -> str:
    """The host a refs folder was named after: ``host_8080`` was ``host:8080`` (a port could not
    be a ':' in a path segment). Only a numeric tail is a port; other underscores stay."""
    head, sep, port = name.rpartition("_")
    return f"{head}:{port}" if sep and head and port.isdigit() else name


def old_ref_files(storage: Storage) -> list[OldFile]:
    """The previous layout's post reference files, oldest day first (so the newest wins)."""
    found = []
    for key in storage.list(OLD_REFS):
        parts = key[len(OLD_REFS):].split("/")
        # The post_refs Delta table lives in this same folder: its files are never three levels deep.
        if len(parts) == 3 and parts[2].startswith("dt=") and parts[2].endswith(".parquet"):
            platform, host, day = parts[0], _host_from_folder(parts[1]), parts[2][3:-len(".parquet")]
            found.append((day, platform, host, key))
    return [OldFile("post_refs", key, f"{platform}/{host}/dt={day}", _parquet_rows(storage, key))
            for day, platform, host, key in sorted(found)]


def _tombstone_records(storage: Storage) -> list[dict[str, Any]] | None:
    """The records of ``state/tombstones.json``, or None when there is no such file."""
    if not storage.exists(OLD_TOMBSTONES):
        return None
    try:
        records = json.loads(storage.get_text(OLD_TOMBSTONES)) or []
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{storage.uri(OLD_TOMBSTONES)} is not valid JSON ({exc}); "
                       "fix or restore it, then rerun") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise BadInput(f"{storage.uri(OLD_TOMBSTONES)}: expected a list of tombstone records")
    return records


def old_tombstones(storage: Storage) -> OldFile | None:
    """``state/tombstones.json`` as a file to convert (rows: the tombstone rows it makes), or None."""
    records = _tombstone_records(storage)
    if records is None:
        return None
    try:
        authors = {str(a) for r in records for a in r.get("authors", []) if a}
        posts = {(str(i), str(p)) for r in records for i, p in r.get("posts", [])}
    except (TypeError, ValueError):
        raise BadInput(f"{storage.uri(OLD_TOMBSTONES)}: a record's authors must be a list of author keys and "
                       "its posts a list of [instance, post_id] pairs") from None
    return OldFile("tombstones", OLD_TOMBSTONES, OLD_TOMBSTONES, len(authors) + len(posts))


def _has_delta_table(storage: Storage) -> bool:
    """Whether any table of the root already has a Delta log."""
    return any(storage.list(f"{t.path}/_delta_log/") for t in [*TABLES.values(), *INTERNAL_TABLES.values()])


# --------------------------------------------------------------------------- reading old Parquet


def _open_parquet(storage: Storage, key: str) -> pq.ParquetFile:
    """The old file, opened for reading row group by row group (the file is never read whole)."""
    fs, base = storage.arrow_fs()
    try:
        return pq.ParquetFile(fs.open_input_file(f"{base}/{key}"))
    except (OSError, pa.ArrowInvalid) as exc:
        raise BadInput(f"{storage.uri(key)}: cannot be read as Parquet ({exc})") from None


def _parquet_rows(storage: Storage, key: str) -> int:
    """Rows of an old Parquet file, from its footer."""
    with _open_parquet(storage, key) as source:
        return source.metadata.num_rows


def _row_groups(storage: Storage, key: str) -> Iterator[pa.Table]:
    with _open_parquet(storage, key) as source:
        for i in range(source.num_row_groups):
            yield source.read_row_group(i)


def _conformed_pieces(storage: Storage, old: OldFile) -> Callable[[], Iterator[pa.Table]]:
    """A function yielding the old partition's row groups conformed to the table's schema
    (called again if the commit conflicts). A file that does not conform is bad input, named."""
    t = spec(old.table)

    def pieces() -> Iterator[pa.Table]:
        for piece in _row_groups(storage, old.key):
            if t.partition in piece.column_names:  # the value is the folder's, not the file's
                piece = piece.drop_columns([t.partition])
            for fld in t.schema:  # a nullable column added to the schema since the file was written
                if fld.nullable and fld.name not in piece.column_names:
                    piece = piece.append_column(fld, pa.nulls(piece.num_rows, fld.type))
            try:
                yield conform(old.table, piece)
            except SchemaError as exc:
                raise BadInput(f"{storage.uri(old.key)}: {exc}") from None

    return pieces


def _check_count(table: str, where: str, old_rows: int, found: int) -> None:
    if found != old_rows:
        raise CountMismatch(f"table {table}, {where}: the old file has {old_rows} row(s) but {found} were read "
                            "back after converting it; the old file was left in place")


# --------------------------------------------------------------------------- converting


def convert_partition(storage: Storage, old: OldFile) -> None:
    """Write one old partition file into its Delta table, check the count, then delete the file."""
    t = spec(old.table)
    try:
        write_partition(storage, old.table, old.part, _conformed_pieces(storage, old))
    except ValueError as exc:  # a partition value Delta's predicate cannot carry (a quote)
        raise BadInput(f"{storage.uri(old.key)}: {exc}") from None
    found = read_table(storage, old.table, partitions=[old.part], columns=[t.partition]).num_rows
    _check_count(old.table, f"partition {t.partition}={old.part}", old.rows, found)
    storage.delete(old.key)


def _parse_time(at: Any) -> datetime:
    """A record's ``at`` (ISO 8601, UTC when it names no zone); now when it is missing."""
    if not at:
        return datetime.now(UTC)
    try:
        when = datetime.fromisoformat(str(at))
    except ValueError:
        raise BadInput(f"{OLD_TOMBSTONES}: bad time {at!r} in a record") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def tombstone_rows(records: list[dict[str, Any]], salt: str) -> dict[tuple[str, str], dict[str, Any]]:
    """One tombstone row per author and post the records name, keyed by (kind, key_hash)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def add(kind: str, key_hash: str, images: list[str], reason: str, at: datetime) -> None:
        row = rows.setdefault((kind, key_hash), {"kind": kind, "key_hash": key_hash, "images": [],
                                                 "reason": reason, "forgotten_at": at})
        row["images"] = sorted(set(row["images"]) | set(images))  # every image must still be cleaned
        if at >= row["forgotten_at"]:  # the newest record wins, as a merge of a new forget would
            row["reason"], row["forgotten_at"] = reason, at

    for r in records:
        at, reason = _parse_time(r.get("at")), str(r.get("reason") or "request")
        for author in r.get("authors", []):
            if author:
                add("author", tombstone_hash(salt, str(author)), [], reason, at)
        for instance, post_id in r.get("posts", []):
            # Kept exactly as recorded: the hash must match the instance as the posts table holds it.
            add("post", tombstone_hash(salt, str(instance), str(post_id)), list(r.get("images", [])), reason, at)
    return rows


def _keep_existing(storage: Storage, rows: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Fold in tombstone rows already in the table for the same keys (a forget run after the
    upgrade): their images stay, and a newer reason and time wins."""
    current = read_table(storage, "tombstones")
    wanted = pa.array(sorted({h for _, h in rows}), pa.string())
    for row in current.filter(pc.is_in(current["key_hash"], value_set=wanted)).to_pylist():
        ours = rows.get((row["kind"], row["key_hash"]))
        if ours is None:
            continue
        ours["images"] = sorted(set(ours["images"]) | set(row["images"] or []))
        if row["forgotten_at"] > ours["forgotten_at"]:
            ours["reason"], ours["forgotten_at"] = row["reason"], row["forgotten_at"]


def convert_tombstones(storage: Storage, old: OldFile, salt: str) -> None:
    """Merge ``state/tombstones.json`` into the ``tombstones`` table as salted hashes, check that
    every one is there, then delete the JSON file."""
    rows = tombstone_rows(_tombstone_records(storage) or [], salt)
    if rows:
        _keep_existing(storage, rows)
        merge_rows(storage, "tombstones", pa.Table.from_pylist(list(rows.values()), schema=TOMBSTONES),
                   operation="migrate tombstones")
        table = read_table(storage, "tombstones", columns=["kind", "key_hash"])
        found = len(rows.keys() & set(zip(table["kind"].to_pylist(), table["key_hash"].to_pylist(), strict=True)))
        _check_count("tombstones", OLD_TOMBSTONES, len(rows), found)
    storage.delete(old.key)


def convert_refs(storage: Storage, old: OldFile) -> None:
    """Merge one old post references file into the ``post_refs`` table, check that each of its
    posts is there, then delete the file."""
    platform, host, _ = old.part.split("/")
    data = pa.concat_tables(list(_row_groups(storage, old.key))) if old.rows else None
    post_ids = pa.array(sorted(set(data["post_id"].to_pylist())) if data is not None else [], pa.string())
    if data is not None:
        try:
            rows = conform("post_refs", pa.table({
                "platform": pa.array([platform] * data.num_rows, pa.string()),
                "host": pa.array([host] * data.num_rows, pa.string()),
                "post_id": data["post_id"], "author_key": data["author_key"], "ref": data["ref"]}))
        except (KeyError, SchemaError) as exc:
            raise BadInput(f"{storage.uri(old.key)}: not a post references file ({exc})") from None
        merge_rows(storage, "post_refs", rows, operation=f"migrate post refs {old.part}")
        table = read_table(storage, "post_refs", columns=["platform", "host", "post_id"])
        mine = pc.and_(pc.and_(pc.equal(table["platform"], platform), pc.equal(table["host"], host)),
                       pc.is_in(table["post_id"], value_set=post_ids))
        _check_count("post_refs", f"file {old.part}", len(post_ids), pc.sum(mine).as_py() or 0)
    storage.delete(old.key)


def _published_note(storage: Storage, converted: list[OldFile]) -> list[str]:
    """A published labels run that was converted no longer has the bytes its validation vouched
    for, so training refuses it until a run is labeled, validated and published again."""
    run = published.published_run_id(storage)
    if run and any(f.part == run for f in converted):
        return [f"labels run {run} is published, but its validation vouched for the old file's bytes: "
                "training refuses it until `likerank label` labels, validates and publishes a run again"]
    return []


# --------------------------------------------------------------------------- the whole root


def plan(storage: Storage) -> list[TableResult]:
    """Every old file of the root, per table, in conversion order (tombstones first)."""
    try:
        tombstones = old_tombstones(storage)
        out = [TableResult("tombstones", [tombstones] if tombstones else []),
               TableResult("post_refs", old_ref_files(storage))]
        out += [TableResult(name, old_partitions(storage, name)) for name in TABLES]
        if not any(r.files for r in out) and not _has_delta_table(storage):
            raise BadInput(f"storage root {storage.root} does not exist or holds no likerank tables "
                           "(neither the previous layout nor Delta): check storage.root")
    except StorageError as exc:
        raise BadInput(f"storage root {storage.root} cannot be read: {exc}") from None
    return out


def _resolve_salt(salt: Salt) -> str:
    try:
        return salt() if callable(salt) else salt
    except ValueError as exc:  # a real source without its pseudonym key (MissingAuthorKey)
        raise BadInput(f"{OLD_TOMBSTONES} can only be converted with the tombstone salt: {exc}") from None


def migrate(storage: Storage, salt: Salt, *, dry_run: bool = False,
            progress: Progress | None = None) -> list[TableResult]:
    """Convert every old file of the root (``dry_run``: only list them); return what was (or
    would be) converted per table. ``salt`` (or a function giving it, called only when there are
    tombstones to convert) hashes the tombstones. ``progress`` is told each table once it is done.

    Raises :class:`BadInput` for a root or file that cannot be converted and :class:`CountMismatch`
    when rows read back differ; everything converted before stays converted.
    """
    results = plan(storage)
    for result in results:
        if not dry_run:
            _convert(storage, result, salt)
            added = add_missing_columns(storage, result.table)
            if added:
                result.notes.append(f"added column(s) {', '.join(added)} (null in the rows written before)")
        if progress:
            progress(result)
    return results


def _convert(storage: Storage, result: TableResult, salt: Salt) -> None:
    for old in result.files:
        log.info("migrate %s: %s (%d row(s))", result.table, old.part, old.rows)
        if result.table == "tombstones":
            convert_tombstones(storage, old, _resolve_salt(salt) if old.rows else "")
        elif result.table == "post_refs":
            convert_refs(storage, old)
        else:
            convert_partition(storage, old)
    if result.table == "labels":
        result.notes += _published_note(storage, result.files)


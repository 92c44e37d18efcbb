"""Removing metadata from images stored before the downloader stripped it (``likerank migrate``).

    cleaning = clean_stored_images(storage)      # or dry_run=True: count, change nothing

Every ``images`` row whose ``metadata_stripped`` is not true names bytes that may still carry
EXIF (GPS, camera), XMP, IPTC or comments. Each such image is stripped
(:mod:`pipeline.core.strip_metadata`) and, since its content address is the sha256 of its
bytes, moves to a new address. Everything that names an image by its digest follows it:

- ``images``: a row under the new digest (``metadata_stripped`` true, the kinds removed, the
  EXIF orientation the old bytes carried) replaces the old one;
- ``downloads.sha256``, ``labels.image_sha256``: rewritten in place;
- ``faces``: the rows move to the new digest (same boxes: the pixels are the same, and the
  orientation they were detected in is now the recorded one, so nothing is detected again);
- ``tombstones.images``: a forgotten post's digests gain the new one, so a forget that was
  interrupted still cleans the image under its new name;

then the old bytes are deleted. A labels run whose rows were rewritten no longer matches the
file its validation vouched for: training refuses it until it is labeled, validated and
published again (:attr:`ImageCleaning.notes` says which run).

An image with no metadata keeps its digest; its rows are only marked stripped.

**Idempotent and resumable.** Work goes in batches of :data:`BATCH` images: the stripped bytes
are stored first (durably), then the batch's mapping is written to a journal
(:data:`~pipeline.core.keys.STRIP_JOURNAL`), then the tables are re-keyed (each step inserts
before it deletes and finds nothing left to do when rerun), then the old bytes are deleted and
the journal with them. A run killed anywhere is finished by the next: a journal found at the
start is completed first, so no old blob is left behind unreferenced. A root already clean
reports nothing to do. Run it while no DAG writes (the scrape and face stages read and write
the same rows).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import keys, published
from pipeline.core.storage import ImageStore, Storage, StorageError
from pipeline.core.strip_metadata import MetadataError, strip_metadata
from pipeline.core.tables import (
    delete_rows,
    get_json,
    list_partitions,
    merge_rows,
    put_json,
    read_table,
    spec,
)

log = logging.getLogger(__name__)

#: Images per batch: one journal, one read of each table naming images and about eight commits each.
BATCH = 1000
OPERATION = "migrate: strip image metadata"


@dataclass(frozen=True)
class Moved:
    """One image of a batch: its old and new digest and what stripping found."""

    old: str
    new: str
    bytes: int  # size of the stripped bytes
    removed: tuple[str, ...]
    orientation: int | None


@dataclass
class ImageCleaning:
    """What :func:`clean_stored_images` did (or, in a dry run, would do)."""

    todo: int = 0  # distinct stored images not yet marked stripped when the run started
    rewritten: int = 0  # images whose bytes changed: stored anew under their new digest
    unchanged: int = 0  # images that had no metadata: marked only
    bytes_removed: int = 0
    missing: list[str] = field(default_factory=list)  # digests whose bytes are not in storage
    failed: list[str] = field(default_factory=list)  # "digest: reason", bytes left as they are
    rows: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # rows re-keyed per table
    resumed: int = 0  # images of an interrupted run's batch finished first
    labels_runs: set[str] = field(default_factory=set)  # labels runs whose rows were rewritten
    notes: list[str] = field(default_factory=list)


def clean_stored_images(storage: Storage, *, dry_run: bool = False, batch: int = BATCH) -> ImageCleaning:
    """Strip every stored image not yet marked stripped and re-key it (see the module doc)."""
    out = ImageCleaning()
    journal = get_json(storage, keys.STRIP_JOURNAL)
    todo = _unstripped(storage)
    out.todo = len(todo)
    if dry_run:
        return out
    if journal:
        moved = [Moved(e["old"], e["new"], e["bytes"], tuple(e["removed"]), e["orientation"])
                 for e in journal["images"]]
        _apply(storage, moved, out)
        out.resumed = len(moved)
        todo = _unstripped(storage)
    images = ImageStore(storage)
    shas = sorted(todo)
    for start in range(0, len(shas), batch):
        moved = [m for m in (_strip_one(images, sha, todo[sha], out) for sha in shas[start:start + batch]) if m]
        if moved:
            put_json(storage, keys.STRIP_JOURNAL, {"images": [asdict(m) for m in moved]})
            _apply(storage, moved, out)
        log.info("migrate: stripped %d of %d stored image(s)", min(start + batch, len(shas)), len(shas))
    out.notes += _published_note(storage, out)
    return out


def _unstripped(storage: Storage) -> dict[str, str]:
    """sha256 -> format of every image whose rows are not all marked stripped."""
    if not list_partitions(storage, "images"):
        return {}
    t = read_table(storage, "images", columns=["sha256", "format", "metadata_stripped"])
    t = t.filter(pc.invert(pc.fill_null(t["metadata_stripped"], False)))
    return dict(zip(t["sha256"].to_pylist(), t["format"].to_pylist(), strict=True))


def _strip_one(images: ImageStore, sha: str, fmt: str, out: ImageCleaning) -> Moved | None:
    """Strip one stored image and store the result (durably: the journal that follows names it)."""
    try:
        data = images.get(sha)
    except StorageError as exc:
        if str(exc).endswith(": not found"):
            out.missing.append(sha)
            return None
        raise
    try:
        stripped = strip_metadata(data, fmt)
    except MetadataError as exc:
        out.failed.append(f"{sha}: {exc}")
        return None
    new, _ = images.put(stripped.data) if stripped.data != data else (sha, "")
    if new == sha:
        out.unchanged += 1
    else:
        out.rewritten += 1
        out.bytes_removed += len(data) - len(stripped.data)
    return Moved(sha, new, len(stripped.data), stripped.removed, stripped.orientation)


# --------------------------------------------------------------------------- re-keying one batch


def _apply(storage: Storage, moved: list[Moved], out: ImageCleaning) -> None:
    """Re-key the tables for ``moved``, delete the old bytes, then the journal. Each step finds
    nothing left to do when it already ran, so a journal may be applied again."""
    by_old = {m.old: m for m in moved}
    renamed = {m.old: m.new for m in moved if m.old != m.new}
    out.rows["images"] += _move_images(storage, by_old)
    if renamed:
        out.rows["downloads"] += _rewrite(storage, "downloads", "sha256", renamed)[0]
        out.rows["faces"] += _move_faces(storage, renamed)
        labels, runs = _rewrite(storage, "labels", "image_sha256", renamed)
        out.rows["labels"] += labels
        out.labels_runs.update(runs)
        out.rows["tombstones"] += _extend_tombstones(storage, renamed)
    for old in renamed:
        storage.delete(keys.image_bytes(old))  # nothing names it any more
    storage.delete(keys.STRIP_JOURNAL)


def _rows_with(storage: Storage, table: str, column: str, shas: list[str]) -> pa.Table:
    """The rows whose ``column`` is one of ``shas``. Filtered here, not pushed into the scan:
    on files a Delta merge rewrote, pyarrow's ``isin`` pushdown can fail comparing string with
    string_view (ArrowNotImplementedError)."""
    t = read_table(storage, table)
    return t.filter(pc.is_in(t[column], value_set=pa.array(sorted(shas), pa.string())))


def _merge_by_partition(storage: Storage, table: str, rows: list[dict[str, Any]]) -> list[str]:
    """Merge ``rows`` (partition column included) one partition at a time; return the partitions."""
    t = spec(table)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row.pop(t.partition)].append(row)
    for value, group in sorted(groups.items()):
        merge_rows(storage, table, pa.Table.from_pylist(group, schema=t.schema), partition_value=value,
                   operation=OPERATION)
    return sorted(groups)


def _move_images(storage: Storage, by_old: dict[str, Moved]) -> int:
    """``images`` rows of the old digests: the new digest's row first, then the old one goes."""
    t = _rows_with(storage, "images", "sha256", list(by_old))
    rows, gone = [], []
    for row in t.to_pylist():
        m = by_old[row["sha256"]]
        if m.old != m.new:
            gone.append({"dt": row["dt"], "sha256": m.old})
        rows.append({**row, "sha256": m.new, "storage_key": keys.image_bytes(m.new), "bytes": m.bytes,
                     "metadata_stripped": True, "metadata_removed": list(m.removed), "exif_orientation": m.orientation})
    _merge_by_partition(storage, "images", rows)
    if gone:
        delete_rows(storage, "images", pa.Table.from_pylist(gone), operation=OPERATION)
    return len(rows)


def _rewrite(storage: Storage, table: str, column: str, renamed: dict[str, str]) -> tuple[int, list[str]]:
    """Rows whose ``column`` names an old digest, rewritten to the new one (same identity);
    return how many and their partitions."""
    t = _rows_with(storage, table, column, list(renamed))
    rows = [{**row, column: renamed[row[column]]} for row in t.to_pylist()]
    return len(rows), _merge_by_partition(storage, table, rows)


def _move_faces(storage: Storage, renamed: dict[str, str]) -> int:
    """``faces`` rows of an old digest: the digest is part of their identity, so the new row is
    inserted and the old one deleted."""
    t = _rows_with(storage, "faces", "sha256", list(renamed))
    if not t.num_rows:
        return 0
    gone = t.select(["dt", "sha256", "detector_id"])
    rows = [{**row, "sha256": renamed[row["sha256"]]} for row in t.to_pylist()]
    _merge_by_partition(storage, "faces", rows)
    delete_rows(storage, "faces", gone, operation=OPERATION)
    return len(rows)


def _extend_tombstones(storage: Storage, renamed: dict[str, str]) -> int:
    """Tombstones listing an old digest also list its new one (the old stays: harmless)."""
    t = read_table(storage, "tombstones")
    rows = []
    for row in t.to_pylist():
        images = set(row["images"] or [])
        added = {renamed[s] for s in images if s in renamed} - images
        if added:
            rows.append({**row, "images": sorted(images | added)})
    if rows:
        merge_rows(storage, "tombstones", pa.Table.from_pylist(rows, schema=t.schema), operation=OPERATION)
    return len(rows)


def _published_note(storage: Storage, out: ImageCleaning) -> list[str]:
    """A published labels run whose rows were rewritten is not the file its validation vouched for."""
    run = published.published_run_id(storage)
    if run and run in out.labels_runs:
        return [f"labels run {run} is published, but its rows now name the stripped images' new digests: "
                "training refuses it until `likerank label` labels, validates and publishes a run again"]
    return []

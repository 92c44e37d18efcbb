"""``likerank export``: a published labels run as a webdataset, Hugging Face or Parquet dataset.

The steps, for one run and one format (layout: :mod:`pipeline.core.export_layout`):

1. refuse a run that is not the published one, or whose validation does not vouch for its
   bytes (:func:`pipeline.core.published.require_published`);
2. read its rows, leaving out every one a tombstone covers now (:mod:`likerank.export.samples`);
3. claim the output folder with the resume journal (``_progress.json``): a folder holding another
   run's or format's export, or files that are no export, is refused;
4. write each data file to ``<name>.tmp`` (or a local temp file for ``s3://``), then rename or
   upload it, and record it in the journal: a partial file never looks finished, and a rerun
   keeps and skips what the journal lists;
5. write ``croissant.json``, ``DATASHEET.md`` (and ``README.md`` for ``hf``), then the manifest
   ``export.json`` last: its presence marks the export complete.

A rerun of a complete export of the same rows is a no-op. When the rows changed since (a person
forgotten meanwhile), the earlier files are deleted and the export is written again: a
finished shard must not keep someone who asked to be removed.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from likerank.export import croissant, datasheet, hf_writer, parquet_writer, webdataset_writer
from likerank.export.facts import gather
from likerank.export.parts import Part, Written
from likerank.export.samples import StoredImage, load_samples
from pipeline.core import keys
from pipeline.core.config import Config
from pipeline.core.export_layout import CROISSANT, DATASHEET, FORMATS, HF_CARD, MANIFEST, PROGRESS
from pipeline.core.published import require_published
from pipeline.core.storage import ImageStore, LocalStorage, S3Storage, Storage, open_storage
from pipeline.core.tables import get_json, put_json

log = logging.getLogger(__name__)


class ExportConflict(RuntimeError):
    """The output folder holds another run's or format's export, or files that are no export."""


@dataclass(frozen=True)
class ExportResult:
    uri: str  # the export folder
    manifest: dict[str, Any]
    already_complete: bool  # nothing was written: the folder already held this export
    written: list[str]  # data files written by this call (the others were kept from an earlier one)


def likerank_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("likerank")
    except PackageNotFoundError:
        return "unknown"


def output_storage(cfg: Config, storage: Storage, run_id: str, fmt: str, output: str | None) -> Storage:
    """The export folder as a storage root: ``output``, or ``exports/<run>/<format>`` under the
    storage root. An ``s3://`` output uses the configured endpoint and credentials."""
    target = output or storage.uri(keys.export_folder(run_id, fmt))
    if target.startswith("s3://"):
        s = cfg.storage
        return S3Storage(target, endpoint_url=s.endpoint_url, region=s.region, access_key_id=s.access_key_id,
                         secret_access_key=s.secret_access_key, conditional_put=s.s3_conditional_put)
    return LocalStorage(target)


def _plan(fmt: str, samples, shard_size: int) -> list[Part]:
    if fmt == "webdataset":
        return webdataset_writer.plan(samples, shard_size)
    return hf_writer.plan(samples) if fmt == "hf" else parquet_writer.plan(samples)


_WRITERS = {"webdataset": webdataset_writer.write, "hf": hf_writer.write, "parquet": parquet_writer.write}


def _file_sha256(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):  # 1 MiB reads: a shard is hundreds of MB
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _same(record: dict[str, Any] | None, identity: dict[str, Any]) -> bool:
    return record is not None and all(record.get(k) == v for k, v in identity.items())


def _claim(out: Storage, identity: dict[str, Any], manifest: dict | None, journal: dict | None) -> None:
    """Refuse a folder that holds something else than an export of this run and format."""
    for what, record in ((MANIFEST, manifest), (PROGRESS, journal)):
        if record is not None and (record.get("run_id"), record.get("format")) != (identity["run_id"], identity["format"]):
            raise ExportConflict(f"{out.uri()} holds the {record.get('format')} export of labels run "
                                 f"{record.get('run_id')!r} ({what}); refusing to mix it with {identity['format']} of "
                                 f"run {identity['run_id']!r}: choose another --output or delete that folder")
    if manifest is None and journal is None:
        present = [k for k in out.list() if not k.endswith(".tmp")]
        if present:
            raise ExportConflict(f"{out.uri()} is not empty and holds no likerank export ({len(present)} file(s), "
                                 f"e.g. {present[0]!r}); choose an empty or new --output")


def export(cfg: Config, run_id: str, fmt: str, output: str | None = None, *,
           storage: Storage | None = None) -> ExportResult:
    """Export published labels run ``run_id`` as ``fmt``; see the module docstring."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    storage = storage or open_storage(cfg.storage)
    pointer = require_published(storage, run_id, use="export")
    out = output_storage(cfg, storage, run_id, fmt, output)
    samples = load_samples(storage, cfg, run_id)
    shard_size = cfg.export.shard_size
    identity = {"run_id": run_id, "format": fmt, "labels_sha256": pointer["labels_sha256"],
                "rows_sha256": samples.rows_sha256, "shard_size": shard_size if fmt == "webdataset" else None}

    manifest, journal = get_json(out, MANIFEST), get_json(out, PROGRESS)
    _claim(out, identity, manifest, journal)
    if _same(manifest, identity) and all(out.exists(f["name"]) for f in manifest["files"]):
        log.info("export of labels run %s as %s at %s is already complete: nothing to do", run_id, fmt, out.uri())
        return ExportResult(out.uri(), manifest, already_complete=True, written=[])
    if (manifest is not None or journal is not None) and not _same(journal, identity):
        # Same run and format, other rows (someone forgotten since) or shard size: start over.
        gone = out.delete_prefix("")
        log.warning("%s held an export of other rows of run %s (rows or shard size changed since): "
                    "deleted its %d file(s), writing it again", out.uri(), run_id, gone)
        journal = None

    finished = {name: Written.from_dict(d) for name, d in ((journal or {}).get("files") or {}).items()
                if out.exists(name)}
    exts: set[str] = set((journal or {}).get("exts") or [])

    def save_journal() -> None:
        put_json(out, PROGRESS, {**identity, "exts": sorted(exts),
                                 "files": {n: w.to_dict() for n, w in finished.items()}})

    save_journal()  # first: it claims the folder for this run and format
    images = ImageStore(storage)
    parts = _plan(fmt, samples, shard_size)
    written: list[str] = []
    staging = None if isinstance(out, LocalStorage) else Path(tempfile.mkdtemp(prefix="likerank-export-"))
    bar = _progress_bar(samples.total, f"export {run_id} {fmt}")

    def tick(image: StoredImage | None) -> None:
        if image is not None:
            exts.add(image.ext)
        bar.update(1)

    try:
        for part in parts:
            if part.name in finished:
                bar.update(len(part.samples))
                log.info("%s: kept (finished earlier, %d samples)", part.name, finished[part.name].samples)
                continue
            tmp = (out.file_of(part.name + ".tmp") if isinstance(out, LocalStorage)
                   else staging / (part.name.replace("/", "_") + ".tmp"))
            tmp.parent.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            n, missing = _WRITERS[fmt](part, images, tmp, tick)
            sha, size = _file_sha256(tmp)
            out.put_file(part.name, tmp)  # rename or upload: only now does the name exist
            finished[part.name] = Written(part.name, part.split, n, missing, size, sha)
            save_journal()
            written.append(part.name)
            elapsed = max(time.monotonic() - started, 1e-6)
            log.info("%s: %d samples, %d missing image(s), %.1f MB, %.0f images/s", part.name, n, missing,
                     size / 1e6, (n + missing) / elapsed)
    finally:
        bar.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)

    files = [finished[p.name] for p in parts]
    version = likerank_version()
    facts = gather(storage, pointer, samples)
    sheet = datasheet.render(facts, fmt, files, version)
    out.put_text(DATASHEET, sheet)
    if fmt == "hf":
        out.put_text(HF_CARD, hf_writer.card(run_id, files, sheet))
    put_json(out, CROISSANT, croissant.build(facts, fmt, files, sorted(exts), version))
    manifest = {
        **identity,
        "published_at": pointer.get("published_at"),
        "table_versions": facts.table_versions,
        "files": [w.to_dict() for w in files],
        "splits": {s: sum(w.samples for w in files if w.split == s) for s in samples.by_split},
        "samples": sum(w.samples for w in files),
        "missing_images": sum(w.missing for w in files),
        "excluded_by_tombstones": samples.excluded_by_tombstones,
        "metadata_files": [CROISSANT, DATASHEET, *([HF_CARD] if fmt == "hf" else [])],
        "likerank_version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    put_json(out, MANIFEST, manifest)  # last: the export is complete
    log.info("exported labels run %s as %s to %s: %d samples (%s), %d left out by tombstones",
             run_id, fmt, out.uri(), manifest["samples"], manifest["splits"], samples.excluded_by_tombstones)
    return ExportResult(out.uri(), manifest, already_complete=False, written=written)


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    # images/s on stderr; disable=None turns it off when stderr is no terminal (logs, CI), where
    # the per-file log line says the same.
    return tqdm(total=total, desc=desc, unit="img", unit_scale=False, file=sys.stderr, disable=None)

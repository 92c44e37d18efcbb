"""The files an HTML report owns, and every folder a report of a labels run was written to.

``likerank report`` writes a folder of its own choosing: ``<storage root>/reports/<run>/`` on
local storage, ``./reports/<run>/`` beside an S3 storage root, or any ``--out``. Its face
thumbnails (``thumbs/``) and the charts that draw them (``*.png``) show people, so a forget
must reach every copy. Each time a report is written, :func:`record_report` stores where
(``state/reports/<run>/<copy>.json``: the host name and the absolute folder, never anything
of the people in it); :func:`forget_reports` deletes the report files of every recorded copy
on this host, and names the copies on other hosts it could not reach, whose records it keeps
marked stale, until a forget running there deletes them (or a person does).

A report that showed a forgotten person is deleted whole rather than patched: its labels run
lost rows and is unpublished, so every chart and count in it is stale; ``likerank report``
writes a new one once the run is labeled again. Only the files the report owns go
(``index.html``, ``*.png``, ``thumbs/``): ``--out`` may name a folder holding other things.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core import keys
from pipeline.core.storage import Storage
from pipeline.core.tables import get_json, put_json

log = logging.getLogger(__name__)

REPORT_INDEX = "index.html"
THUMBS_DIR = "thumbs"


def owned_files(folder: Path) -> list[Path]:
    """The files of the report in ``folder``: its page, charts and thumbnails (a half-written
    page's temporary file too)."""
    if not folder.is_dir():
        return []
    files = [folder / REPORT_INDEX] if (folder / REPORT_INDEX).is_file() else []
    files += sorted(folder.glob("*.png")) + sorted(folder.glob(".tmp-*.html"))
    thumbs = folder / THUMBS_DIR
    files += sorted(p for p in thumbs.rglob("*") if p.is_file()) if thumbs.is_dir() else []
    return files


def clear_report(folder: Path) -> int:
    """Delete the report files in ``folder`` (and the folder, once empty); return the files deleted."""
    files = owned_files(folder)
    for f in files:
        f.unlink(missing_ok=True)
    shutil.rmtree(folder / THUMBS_DIR, ignore_errors=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return len(files)


def record_report(storage: Storage, run: str, folder: Path) -> None:
    """Remember that a report of labels run ``run`` is in ``folder`` on this host."""
    host, path = socket.gethostname(), str(folder.resolve())
    copy_id = hashlib.sha256(f"{host}\n{path}".encode()).hexdigest()[:16]
    put_json(storage, keys.report_location(run, copy_id),
             {"run": run, "host": host, "path": path, "written_at": datetime.now(UTC).isoformat()})


def recorded_reports(storage: Storage, run: str) -> list[tuple[str, dict[str, Any]]]:
    """(record key, record) of every recorded copy of the run's report."""
    out = []
    for key in storage.list(keys.report_locations(run)):
        if key.endswith(".json"):
            out.append((key, get_json(storage, key) or {}))
    return out


def forget_reports(storage: Storage, run: str, *, dry_run: bool = False) -> dict[str, Any]:
    """Delete every reachable copy of the run's report (or, ``dry_run``, count it); return
    ``{"deleted": [folders], "files": n, "thumbnails": n, "unreachable": ["host:folder"]}``."""
    out: dict[str, Any] = {"deleted": [], "files": 0, "thumbnails": 0, "unreachable": []}
    here = socket.gethostname()
    root = getattr(storage, "path", None)  # a local storage root: its reports/<run>/ is the copy below
    in_root = (Path(root) / keys.report_run(run)).resolve() if root is not None else None
    in_storage = storage.list(keys.report_run(run) + "/")  # a copy inside the storage root, local or S3
    if in_storage:
        out["deleted"].append(storage.uri(keys.report_run(run) + "/"))
        out["files"] += len(in_storage)
        out["thumbnails"] += sum(f"/{THUMBS_DIR}/" in k for k in in_storage)
        if not dry_run:
            storage.delete_prefix(keys.report_run(run) + "/")
    for key, record in recorded_reports(storage, run):
        host, path = str(record.get("host", "")), Path(str(record.get("path", "")))
        if host != here:
            out["unreachable"].append(f"{host}:{path}")
            if not dry_run:  # kept, marked: the next forget on that host deletes it
                put_json(storage, key, {**record, "stale": True})
            continue
        files = [] if path == in_root else owned_files(path)
        if files and str(path) not in out["deleted"]:
            out["deleted"].append(str(path))
            out["files"] += len(files)
            out["thumbnails"] += sum(THUMBS_DIR in f.relative_to(path).parts for f in files)
        if not dry_run:
            clear_report(path)
            storage.delete(key)
    _log_unreachable(run, out)
    return out


def forget_stale_reports_here(storage: Storage) -> dict[str, Any]:
    """Delete the copies on this host that an earlier forget, run elsewhere, marked stale."""
    out: dict[str, Any] = {"deleted": [], "files": 0, "thumbnails": 0, "unreachable": []}
    here = socket.gethostname()
    for key in storage.list(keys.report_records()):
        record = get_json(storage, key) if key.endswith(".json") else None
        if not record or not record.get("stale") or record.get("host") != here:
            continue
        path = Path(str(record.get("path", "")))
        files = owned_files(path)
        if files:
            out["deleted"].append(str(path))
            out["files"] += len(files)
            out["thumbnails"] += sum(THUMBS_DIR in f.relative_to(path).parts for f in files)
        clear_report(path)
        storage.delete(key)
    return out


def _log_unreachable(run: str, out: dict[str, Any]) -> None:
    if out["unreachable"]:
        log.warning("reports of labels run %s on other hosts were not deleted: %s", run, ", ".join(out["unreachable"]))

"""The published labels pointer ``labels/_published.json``: which validated run training reads.

This module owns the pointer: it is the only one that writes it (:func:`publish`,
:func:`unpublish`) and the one every reader goes through (:func:`published`,
:func:`require_published`).

The pointer is one small JSON object replaced atomically, so readers see the previous
published run or the new one, never a partial state:
``{"run_id", "published_at", "rows", "params_hash", "labeler", "validation_key", "labels_sha256"}``.
``labels_sha256`` is the content hash of the labels file the validation result vouches for;
training refuses a run whose file no longer has it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pipeline.core import keys
from pipeline.core.config import Config
from pipeline.core.labels_run import read_labels_run
from pipeline.core.storage import Storage, open_storage
from pipeline.core.tables import get_json, list_partitions, location, partition_sha256, put_json

log = logging.getLogger(__name__)


class NotValidated(RuntimeError):
    """A run without a passing validation result cannot be published."""


class LabelsNotPublished(RuntimeError):
    """No labels run is published, or the one asked for is not the published one, or its
    validation result is missing, failed, or vouches for other bytes."""


def publish(cfg: Config, run_id: str, storage: Storage | None = None) -> dict[str, Any]:
    """Publish ``run_id`` if its stored validation result passed; return the pointer written.

    The check reads ``validation/run=<run_id>/result.json`` itself rather than trusting a
    caller's flag, so no path can publish an unvalidated or failed run. The labeler and the
    parameters' hash come from the run's record, never from today's config.
    """

    storage = storage or open_storage(cfg.storage)
    key = keys.validation_result(run_id)
    result = get_json(storage, key)
    if result is None:
        raise NotValidated(f"labels run {run_id}: no validation result at {storage.uri(key)}; run validation first")
    if not result.get("success"):
        raise NotValidated(f"labels run {run_id}: validation failed ({result.get('failed_expectations')} "
                           f"expectation(s)); see {storage.uri(key)}")
    current = partition_sha256(storage, "labels", run_id)
    if result.get("labels_sha256") != current:
        raise NotValidated(f"labels run {run_id}: its labels file changed after validation (validated sha256 "
                           f"{str(result.get('labels_sha256'))[:12]}, now {current[:12]}); validate it again")
    run = read_labels_run(storage, run_id)
    pointer = {
        "run_id": run_id,
        "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": result["tables"]["labels"]["rows"],
        "params_hash": run.params_hash,
        "labeler": run.labeler,
        "validation_key": key,
        "labels_sha256": current,
    }
    put_json(storage, keys.PUBLISHED_LABELS, pointer)
    log.info("published labels run %s (%d rows)", run_id, pointer["rows"])
    return pointer


def unpublish(storage: Storage, run_id: str) -> bool:
    """Withdraw the pointer if it names ``run_id`` (a rebuilt or forgotten-in run must be
    validated again before training may read it); return whether it did."""
    if published_run_id(storage) != run_id:
        return False
    storage.delete(keys.PUBLISHED_LABELS)
    return True


def published(storage: Storage) -> dict[str, Any] | None:
    """The current pointer, or None if nothing was published yet."""
    return get_json(storage, keys.PUBLISHED_LABELS)


def published_run_id(storage: Storage) -> str | None:
    """The run id of the published labels run, or None."""
    return (published(storage) or {}).get("run_id")


def require_published(storage: Storage, run_id: str | None = None, *, use: str = "train") -> dict[str, Any]:
    """The pointer of the run to train on: the published one, or ``run_id`` if it is it.
    ``use`` is the verb the refusals name (``train``, ``export``).

    Training on an unpublished (unvalidated or failed) run is refused, by design: the
    validation gate is what makes a labels run trustworthy.
    """
    pointer = published(storage)
    if not pointer or not pointer.get("run_id"):
        raise LabelsNotPublished(
            f"no labels run is published: {storage.uri(keys.PUBLISHED_LABELS)} does not exist "
            "(label and validate first; a run is published only when its validation passes)"
        )
    if run_id and run_id != pointer["run_id"]:
        raise LabelsNotPublished(
            f"labels run {run_id!r} is not published (the published run is {pointer['run_id']!r} "
            f"per {storage.uri(keys.PUBLISHED_LABELS)}); refusing to {use} unvalidated labels"
        )
    check_validated(storage, pointer, use=use)
    return pointer


def check_validated(storage: Storage, pointer: dict[str, Any], *, use: str = "train") -> None:
    """Refuse a labels run whose validation result is missing or failed, or whose file is not
    the one validated (its sha256 differs from the result's and the publication's)."""
    run = pointer["run_id"]
    where = f"run={run} of {location(storage, 'labels')[0]}"
    if run not in list_partitions(storage, "labels"):
        raise LabelsNotPublished(f"{storage.uri(keys.PUBLISHED_LABELS)} names run {run!r} but {where} is missing")
    result = get_json(storage, keys.validation_result(run))
    if result is None:
        raise LabelsNotPublished(f"labels run {run!r}: no validation result at "
                                 f"{storage.uri(keys.validation_result(run))}; refusing to {use} unvalidated labels")
    if not result.get("success"):
        raise LabelsNotPublished(f"labels run {run!r}: its validation failed ({storage.uri(keys.validation_result(run))}); "
                                 f"refusing to {use} it")
    current = partition_sha256(storage, "labels", run)
    if not (pointer.get("labels_sha256") == result.get("labels_sha256") == current):
        raise LabelsNotPublished(f"labels run {run!r}: {where} is not the file that was validated and "
                                 f"published (sha256 now {current[:12]}, validated {str(result.get('labels_sha256'))[:12]}, "
                                 f"published {str(pointer.get('labels_sha256'))[:12]}); label, validate and publish again")

"""Publishing: point ``labels/_published.json`` at a validated run (what training reads).

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
from pipeline.core.storage import Storage, open_storage
from pipeline.core.tables import get_json, object_sha256, partition_key, put_json

log = logging.getLogger(__name__)



class NotValidated(RuntimeError):
    """A run without a passing validation result cannot be published."""


def publish(cfg: Config, run_id: str, storage: Storage | None = None) -> dict[str, Any]:
    """Publish ``run_id`` if its stored validation result passed; return the pointer written.

    The check reads ``validation/run=<run_id>/result.json`` itself rather than trusting a
    caller's flag, so no path can publish an unvalidated or failed run.
    """

    storage = storage or open_storage(cfg.storage)
    key = keys.validation_result(run_id)
    result = get_json(storage, key)
    if result is None:
        raise NotValidated(f"labels run {run_id}: no validation result at {storage.uri(key)}; run validation first")
    if not result.get("success"):
        raise NotValidated(f"labels run {run_id}: validation failed ({result.get('failed_expectations')} "
                           f"expectation(s)); see {storage.uri(key)}")
    current = object_sha256(storage, partition_key("labels", run_id))
    if result.get("labels_sha256") != current:
        raise NotValidated(f"labels run {run_id}: its labels file changed after validation (validated sha256 "
                           f"{str(result.get('labels_sha256'))[:12]}, now {current[:12]}); validate it again")
    summary = get_json(storage, keys.labels_summary(run_id), default={}) or {}
    pointer = {
        "run_id": run_id,
        "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": result["tables"]["labels"]["rows"],
        "params_hash": summary.get("params_hash", cfg.section_hash("labeling")),
        "labeler": result.get("labeler"),
        "validation_key": key,
        "labels_sha256": current,
    }
    put_json(storage, keys.PUBLISHED_LABELS, pointer)
    log.info("published labels run %s (%d rows)", run_id, pointer["rows"])
    return pointer


def published(storage: Storage) -> dict[str, Any] | None:
    """The current pointer, or None if nothing was published yet."""
    return get_json(storage, keys.PUBLISHED_LABELS)

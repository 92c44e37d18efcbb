"""The record of one labels run: what it was, written once by the labeler.

``labels/run=<id>/_summary.json`` holds the labeler, the ``[labeling]`` parameters the run
used with their hash, ``group_size``, the content hash of the labels file as written, the
counts per source, and the rows in and out with the drops by reason. Validation, publishing,
training, the model card and the report all read this record: none of them reads today's
config for a past run, or derives one of these values again from the labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core import keys
from pipeline.core.storage import Storage
from pipeline.core.tables import get_json, put_json


class LabelsRunMissing(RuntimeError):
    """A labels run has no record, or one written before the record held what is asked of it."""


#: What every record holds; a record without one of these was written by an older labeler.
REQUIRED = ("run_id", "labeler", "params", "params_hash", "group_size", "labels_sha256", "sources")


@dataclass(frozen=True)
class LabelsRunRecord:
    """One labels run's record, as the labeler wrote it."""

    run_id: str
    labeler: str
    params: dict[str, Any]  # the [labeling] section the run used, by field name
    params_hash: str  # Config.section_hash("labeling") of those parameters
    group_size: int  # rows per group: the rule's G, or every row for a global labeler
    labels_sha256: str  # tables.partition_sha256 of the run's labels partition as the labeler wrote it
    sources: dict[str, dict[str, int]]  # per source: rows_out, groups, positive
    record: dict[str, Any]  # the whole record (counts, drops by reason, splits, keys), to show

    @classmethod
    def from_record(cls, record: dict[str, Any], where: str) -> LabelsRunRecord:
        missing = [name for name in REQUIRED if name not in record]
        if missing:
            raise LabelsRunMissing(f"{where} has no {', '.join(missing)}: it was written by an older labeler; "
                                   "label the run again (`likerank label`)")
        return cls(run_id=record["run_id"], labeler=record["labeler"], params=dict(record["params"]),
                   params_hash=record["params_hash"], group_size=int(record["group_size"]),
                   labels_sha256=record["labels_sha256"], sources=record["sources"], record=record)


def write_labels_run(storage: Storage, record: dict[str, Any]) -> str:
    """Store a run's record (the labeler's summary, content hash included); return its key."""
    missing = [name for name in REQUIRED if name not in record]
    if missing:
        raise ValueError(f"labels run record for {record.get('run_id')!r} lacks {', '.join(missing)}")
    key = keys.labels_summary(record["run_id"])
    put_json(storage, key, record)
    return key


def read_labels_run(storage: Storage, run_id: str) -> LabelsRunRecord:
    """The record of ``run_id``; raises :class:`LabelsRunMissing` naming the file if there is none."""
    key = keys.labels_summary(run_id)
    record = get_json(storage, key)
    if record is None:
        raise LabelsRunMissing(f"labels run {run_id!r} has no record: {storage.uri(key)} does not exist "
                               "(the labeler writes it with the labels)")
    return LabelsRunRecord.from_record(record, storage.uri(key))

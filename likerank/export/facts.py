"""What likerank knows about an exported run, gathered once for the Croissant file, the datasheet
and the manifest: the run's record, the collection window, sources, opt-outs and tombstones.

Every value comes from a table or the run's record (:mod:`pipeline.core.labels_run`), never
from today's config: an export of an old run describes how that run was made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from likerank.export.samples import Samples
from pipeline.core.labels_run import read_labels_run
from pipeline.core.storage import Storage
from pipeline.core.tables import list_partitions, read_table, version

#: The tables an export reads, whose Delta versions the manifest records.
SOURCE_TABLES = ("labels", "images", "faces", "posts")


@dataclass
class Facts:
    run_id: str
    pointer: dict[str, Any]  # the published pointer (labels_sha256, published_at, ...)
    labeler: str
    params: dict[str, Any]  # the [labeling] parameters the run used
    params_hash: str
    group_size: int
    record: dict[str, Any]  # the run's whole record: rows in/out, drops by reason, group_exposure
    table_versions: dict[str, int | None]
    splits: dict[str, int]  # exported samples per split
    positives: int
    sources: dict[str, int]  # exported samples per platform
    instances: list[str] = field(default_factory=list)  # where the exported posts were read from
    hashtags: list[str] = field(default_factory=list)
    created: tuple[datetime, datetime] | None = None  # first and last post creation (UTC)
    scraped: tuple[datetime, datetime] | None = None  # first and last time a post was read (UTC)
    opted_out: dict[str, int] = field(default_factory=dict)  # downloads refused by reason (noai, robots, tdm)
    tombstoned: dict[str, int] = field(default_factory=dict)  # forgotten authors and posts, all time
    excluded_by_tombstones: int = 0  # rows of this run left out at export time


def _span(col: pa.ChunkedArray) -> tuple[datetime, datetime] | None:
    if not len(col) or col.null_count == len(col):
        return None
    mm = pc.min_max(col)
    return mm["min"].as_py(), mm["max"].as_py()


def gather(storage: Storage, pointer: dict[str, Any], samples: Samples) -> Facts:
    """The facts of the export of ``samples`` (a run published under ``pointer``)."""
    run = read_labels_run(storage, samples.run_id)
    rows = [s for split in samples.by_split.values() for s in split]
    sources: dict[str, int] = {}
    for s in rows:
        sources[s.fields["source"]] = sources.get(s.fields["source"], 0) + 1
    facts = Facts(
        run_id=samples.run_id, pointer=pointer, labeler=run.labeler, params=run.params, params_hash=run.params_hash,
        group_size=run.group_size, record=run.record,
        table_versions={t: version(storage, t) for t in SOURCE_TABLES},
        splits={k: len(v) for k, v in samples.by_split.items()},
        positives=sum(s.fields["label"] for s in rows), sources=sources,
        excluded_by_tombstones=samples.excluded_by_tombstones,
    )
    if list_partitions(storage, "posts"):
        posts = read_table(storage, "posts", columns=["instance", "hashtag", "post_id", "created_at", "scraped_at"])
        posts = posts.filter(pc.is_in(posts["post_id"], value_set=pa.array(sorted({s.post_id for s in rows}), pa.string())))
        facts.instances = sorted(set(posts["instance"].to_pylist()))
        facts.hashtags = sorted(set(posts["hashtag"].to_pylist()))
        facts.created, facts.scraped = _span(posts["created_at"]), _span(posts["scraped_at"])
    if list_partitions(storage, "downloads"):
        d = read_table(storage, "downloads", columns=["status", "opt_out_reason"])
        d = d.filter(pc.is_in(d["status"], value_set=pa.array(["opted_out", "robots_disallowed"])))
        for status, reason in zip(d["status"].to_pylist(), d["opt_out_reason"].to_pylist(), strict=True):
            why = reason or ("robots" if status == "robots_disallowed" else "unspecified")
            facts.opted_out[why] = facts.opted_out.get(why, 0) + 1
    t = read_table(storage, "tombstones", columns=["kind"])
    for kind in t["kind"].to_pylist():
        facts.tombstoned[kind] = facts.tombstoned.get(kind, 0) + 1
    return facts

"""Webdataset tar shards: ``<split>-000000.tar`` of ``export.shard_size`` samples each.

Each sample is two tar members named by :func:`~pipeline.core.export_layout.sample_key`:
``<key>.<ext>`` (the stored image bytes: jpg, png, webp) and ``<key>.json``
(:data:`~pipeline.core.export_layout.SAMPLE_FIELDS`). Samples go in ``post_id`` order and the
members' mtime is fixed, so the same rows give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from likerank.export.parts import Part, Tick, readable_samples
from likerank.export.samples import Samples, sample_fields
from pipeline.core.export_layout import SPLITS, shard_name
from pipeline.core.storage import ImageStore

#: The tar members' modification time, seconds since the epoch: fixed, so a shard's bytes
#: depend on its samples only (webdataset's TarWriter would stamp the current time).
MTIME = 0.0


def plan(samples: Samples, shard_size: int) -> list[Part]:
    """The shards: each split's samples cut into runs of ``shard_size``, in order."""
    parts = []
    for split in SPLITS:
        rows = samples.by_split[split]
        for index, start in enumerate(range(0, len(rows), shard_size)):
            parts.append(Part(shard_name(split, index), split, rows[start:start + shard_size]))
    return parts


def write(part: Part, images: ImageStore, path: Path, tick: Tick) -> tuple[int, int]:
    """Write ``part`` as a tar at ``path``; return (samples written, images missing)."""
    import webdataset as wds

    written = 0
    with open(path, "wb") as fh, wds.TarWriter(fh, mtime=MTIME, encoder=False) as tar:
        for sample, image in readable_samples(part, images, tick):
            fields = sample_fields(sample, image)
            tar.write({"__key__": sample.key, image.ext: image.data,
                       "json": json.dumps(fields, sort_keys=False).encode()})
            written += 1
    return written, len(part.samples) - written

"""Plain Parquet: ``<split>.parquet`` per split, the image bytes in a binary column beside the
:data:`~pipeline.core.export_layout.SAMPLE_FIELDS` columns (and the sample's ``key``).

:func:`write_rows` streams row groups, so a split of any size is written with a few images in
memory; the ``hf`` format writes through it with its own schema.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from likerank.export.parts import Part, Tick, readable_samples
from likerank.export.samples import Sample, Samples, StoredImage, sample_fields
from pipeline.core.export_layout import SPLITS, parquet_name
from pipeline.core.storage import ImageStore

#: Rows per Parquet row group: images are ~10 KB to a few MB each, so 100 keeps a group (what a
#: reader holds in memory at once) in the tens of MB, as `datasets` does for image columns.
ROWS_PER_GROUP = 100

#: The columns of the SAMPLE_FIELDS, typed.
FIELD_TYPES: dict[str, pa.DataType] = {
    "label": pa.int8(),
    "score": pa.float64(),
    "group_id": pa.int32(),
    "exposure": pa.float64(),
    "source": pa.string(),
    "split": pa.string(),
    "face_box": pa.list_(pa.float32(), 4),
    "image_width": pa.int32(),
    "image_height": pa.int32(),
    "orientation": pa.int8(),
    "image_sha256": pa.string(),
}

SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("image", pa.binary()),
                    *(pa.field(name, t) for name, t in FIELD_TYPES.items())])


def plan(samples: Samples, fmt: str = "parquet") -> list[Part]:
    """One file per split that has samples."""
    return [Part(parquet_name(fmt, split), split, samples.by_split[split])
            for split in SPLITS if samples.by_split[split]]


def write_rows(part: Part, images: ImageStore, path: Path, tick: Tick, schema: pa.Schema,
               row_of: Callable[[Sample, StoredImage], dict[str, Any]]) -> tuple[int, int]:
    """Write ``part``'s samples as rows of ``schema`` (``row_of`` makes one); return (written, missing)."""
    import pyarrow.parquet as pq

    written = 0
    batch: list[dict[str, Any]] = []
    with pq.ParquetWriter(path, schema) as writer:
        for sample, image in readable_samples(part, images, tick):
            batch.append(row_of(sample, image))
            written += 1
            if len(batch) == ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch or not written:  # an all-missing split still gets a readable (empty) file
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return written, len(part.samples) - written


def _row(sample: Sample, image: StoredImage) -> dict[str, Any]:
    return {"key": sample.key, "image": image.data, **sample_fields(sample, image)}


def write(part: Part, images: ImageStore, path: Path, tick: Tick) -> tuple[int, int]:
    return write_rows(part, images, path, tick, SCHEMA, _row)

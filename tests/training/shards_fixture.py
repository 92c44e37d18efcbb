"""A webdataset export of a published labels run, written the way ``likerank export`` lays it
out (:mod:`pipeline.core.export_layout`), for the shard-input tests and the benchmark.

A stand-in for the exporter: it writes only what training reads (the tar shards and
``export.json`` with run, labels hash, format and files), from the same tables. Swap it for the
real exporter once that exists.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from pipeline.core import export_layout as layout
from pipeline.core import keys
from pipeline.core.published import require_published
from pipeline.core.storage import ImageStore, Storage
from pipeline.core.tables import read_table
from training.data import load_examples


def image_ext(data: bytes) -> str:
    """The member extension of stored image bytes, from their magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"  # unreadable bytes: training makes them a zero-weight item


def write_shards(storage: Storage, *, run_id: str | None = None, prefix: str | None = None,
                 shard_size: int = 1000, manifest: dict[str, Any] | None = None) -> str:
    """Export the published run (or ``run_id``) as webdataset shards under ``prefix`` (default:
    ``keys.export_folder(run, "webdataset")``); ``manifest`` overrides manifest fields. Returns
    the prefix. Samples are in the labels' order (post_id), the manifest written last."""
    import webdataset as wds

    published = require_published(storage, run_id)
    run = published["run_id"]
    prefix = (prefix if prefix is not None else keys.export_folder(run, "webdataset")).strip("/")
    t = read_table(storage, "labels", partitions=[run]).sort_by([("post_id", "ascending")]).to_pylist()
    examples = load_examples(storage, run, crop="face")
    where = {}
    for ex in examples.values():
        for i, post in enumerate(ex.post_id):
            where[post] = (ex, i)
    images = ImageStore(storage)
    files = []
    for split in layout.SPLITS:
        rows = [r for r in t if r["split"] == split]
        for n, start in enumerate(range(0, len(rows), shard_size)):
            chunk = rows[start:start + shard_size]
            buf = io.BytesIO()
            with wds.TarWriter(buf) as sink:
                for r in chunk:
                    ex, i = where[r["post_id"]]
                    data = images.get(r["image_sha256"])
                    box, frame = ex.box[i], ex.frame[i]
                    meta = {
                        "label": int(r["label"]), "score": float(r["score"]), "group_id": int(r["group_id"]),
                        "exposure": float(r["exposure"]), "source": r["source"], "split": split,
                        "face_box": [float(v) for v in box] if np.isfinite(box).all() else None,
                        "image_width": int(frame[0]) if np.isfinite(frame[0]) else None,
                        "image_height": int(frame[1]) if np.isfinite(frame[1]) else None,
                        "orientation": int(ex.orientations.get(r["image_sha256"], 1)),
                        "image_sha256": r["image_sha256"],
                    }
                    assert set(meta) == set(layout.SAMPLE_FIELDS)
                    sink.write({"__key__": layout.sample_key(r["post_id"]), image_ext(data): data,
                                "json": json.dumps(meta).encode()})
            name = layout.shard_name(split, n)
            storage.put_bytes(f"{prefix}/{name}" if prefix else name, buf.getvalue(), durable=False)
            files.append({"name": name, "split": split, "samples": len(chunk)})
    storage.sync()
    doc = {"run_id": run, "labels_sha256": published["labels_sha256"], "format": "webdataset", "files": files,
           **(manifest or {})}
    storage.put_bytes(f"{prefix}/{layout.MANIFEST}" if prefix else layout.MANIFEST, json.dumps(doc, indent=1).encode())
    return prefix

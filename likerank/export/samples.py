"""The rows an export ships: a published labels run, joined with what a user of the images needs.

:func:`load_samples` reads the run's labels, drops every row a tombstone covers *now* (a person
forgotten after the run was labeled must not leave in an export), and joins each row with its
largest face box and frame (:mod:`pipeline.core.largest_face`) and the recorded EXIF orientation
(:mod:`pipeline.core.orientation`), in ``post_id`` order. Only these small rows live in memory;
:func:`read_image` fetches one image's bytes at a time while a writer streams them out.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.config import Config
from pipeline.core.export_layout import SAMPLE_FIELDS, SPLITS, sample_key
from pipeline.core.forget import load_tombstones, salt_for
from pipeline.core.largest_face import largest_faces
from pipeline.core.orientation import orientation_of, recorded_orientations, swaps_axes
from pipeline.core.storage import ImageStore, Storage, StorageError
from pipeline.core.tables import list_partitions, read_table

log = logging.getLogger(__name__)

#: Pillow's format name -> the file extension a sample's image gets (webdataset decodes by it).
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
#: The MIME type of each extension, for Croissant's encodingFormat.
MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif", "bmp": "image/bmp"}

LABEL_COLUMNS = ["post_id", "source", "image_sha256", "author_key", "label", "score", "group_id", "exposure", "split"]


@dataclass(frozen=True)
class Sample:
    """One exported row. ``fields`` holds :data:`SAMPLE_FIELDS` except what only the image's
    bytes tell (orientation when none was recorded, the frame when no face row gave it)."""

    post_id: str
    key: str  # sample_key(post_id)
    image_sha256: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Samples:
    """The rows of one export by split, and what was left out."""

    run_id: str
    by_split: dict[str, list[Sample]]
    excluded_by_tombstones: int
    #: sha256 of the ordered (post_id, image, split) list: changes when a forget removes a row,
    #: so a resumed or repeated export can tell its finished files still hold the same people.
    rows_sha256: str

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.by_split.values())


@dataclass(frozen=True)
class StoredImage:
    data: bytes  # the stored bytes, metadata already stripped
    ext: str  # jpg, png, webp...
    orientation: int  # EXIF orientation (1-8) to apply to the bytes
    width: int  # upright width, pixels
    height: int  # upright height, pixels


def tombstoned(storage: Storage, cfg: Config, labels: pa.Table) -> pa.ChunkedArray:
    """True for the rows of ``labels`` a tombstone covers: their author, or their post on any
    instance that stored a post with that id (labels carry no instance; checking every one the
    id is known on errs on the side of leaving a row out)."""
    tomb = load_tombstones(storage, salt_for(cfg))
    if not tomb or not labels.num_rows:
        return pa.chunked_array([pa.array([False] * labels.num_rows, pa.bool_())])
    instances: dict[str, list[str]] = {}
    if list_partitions(storage, "posts"):
        posts = read_table(storage, "posts", columns=["instance", "post_id"])
        for inst, pid in zip(posts["instance"].to_pylist(), posts["post_id"].to_pylist(), strict=True):
            instances.setdefault(pid, []).append(inst)
    rows, authors, post_ids, insts = [], [], [], []
    for i, (pid, author) in enumerate(zip(labels["post_id"].to_pylist(), labels["author_key"].to_pylist(), strict=True)):
        for inst in instances.get(pid) or [""]:  # "": no stored post, the author check still applies
            rows.append(i)
            authors.append(author)
            post_ids.append(pid)
            insts.append(inst)
    hit = tomb.mask(pa.table({"author_key": authors, "instance": insts, "post_id": post_ids})).to_pylist()
    covered = [False] * labels.num_rows
    for i, h in zip(rows, hit, strict=True):
        covered[i] = covered[i] or bool(h)
    return pa.chunked_array([pa.array(covered, pa.bool_())])


def load_samples(storage: Storage, cfg: Config, run_id: str) -> Samples:
    """The rows of published labels run ``run_id`` to export, by split, sorted by ``post_id``."""
    t = read_table(storage, "labels", partitions=[run_id], columns=LABEL_COLUMNS)
    t = t.sort_by([("post_id", "ascending"), ("image_sha256", "ascending")])  # deterministic shards
    gone = tombstoned(storage, cfg, t)
    excluded = pc.sum(gone).as_py() or 0
    if excluded:
        log.info("labels run %s: %d row(s) left out, their author or post forgotten since it was labeled",
                 run_id, excluded)
        t = t.filter(pc.invert(gone))
    unknown = sorted(set(t["split"].to_pylist()) - set(SPLITS))
    if unknown:
        raise ValueError(f"labels run {run_id!r}: unknown split value(s) {unknown} (expected {SPLITS})")
    shas = t["image_sha256"].to_pylist()
    faces = largest_faces(storage, set(shas))
    orientations = recorded_orientations(storage, shas)
    by_split: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    digest = hashlib.sha256()
    for row in t.to_pylist():
        sha = row["image_sha256"]
        box, width, height, _detector = faces.get(sha, (None, math.nan, math.nan, ""))
        fields = {
            "label": int(row["label"]),
            "score": float(row["score"]),
            "group_id": int(row["group_id"]),
            "exposure": float(row["exposure"]),
            "source": row["source"],
            "split": row["split"],
            "face_box": [float(v) for v in box] if box is not None else None,
            "image_width": int(width) if math.isfinite(width) else None,
            "image_height": int(height) if math.isfinite(height) else None,
            "orientation": orientations.get(sha),  # None: read from the bytes (an image stored before stripping)
            "image_sha256": sha,
        }
        assert list(fields) == list(SAMPLE_FIELDS)  # the layout's order, so JSON and columns read alike
        by_split[row["split"]].append(Sample(post_id=row["post_id"], key=sample_key(row["post_id"]),
                                             image_sha256=sha, fields=fields))
        digest.update(f"{row['post_id']}\t{sha}\t{row['split']}\n".encode())
    return Samples(run_id=run_id, by_split=by_split, excluded_by_tombstones=excluded, rows_sha256=digest.hexdigest())


def read_image(images: ImageStore, sample: Sample) -> StoredImage | None:
    """The stored bytes of ``sample``'s image with their extension and upright size, or None when
    the store no longer has them (the writer counts it; an export is not failed by one image).
    Pillow reads the header only: nothing is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = images.get(sample.image_sha256)
    except StorageError as exc:
        log.warning("image %s of post %s: %s", sample.image_sha256, sample.post_id, exc)
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            orientation = orientation_of(im, sample.fields["orientation"])
            w, h = im.size
    except (UnidentifiedImageError, OSError) as exc:
        log.warning("image %s of post %s: unreadable header: %s", sample.image_sha256, sample.post_id, exc)
        return None
    if swaps_axes(orientation):
        w, h = h, w
    return StoredImage(data=data, ext=EXTENSIONS.get(fmt, fmt.lower() or "bin"), orientation=orientation,
                       width=w, height=h)


def sample_fields(sample: Sample, image: StoredImage) -> dict[str, Any]:
    """The sample's :data:`SAMPLE_FIELDS`, completed from its image: the orientation applied, and
    the upright frame where no face row recorded one."""
    fields = dict(sample.fields)
    fields["orientation"] = image.orientation
    if fields["image_width"] is None or fields["image_height"] is None:
        fields["image_width"], fields["image_height"] = image.width, image.height
    return fields

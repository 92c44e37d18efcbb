"""Training input from a webdataset export (``training.input = "shards"``).

``likerank export RUN --format webdataset`` writes the published run as tar shards
(:mod:`pipeline.core.export_layout`): a few sequential reads of large files instead of one GET
per image, the way to feed a GPU from S3. This module reads them:

- :func:`open_export` — the export's manifest, found at ``training.shards`` (a folder or an
  ``s3://`` URI, reached with the ``[storage]`` endpoint and credentials) or, when that is
  empty, at ``<storage root>/exports/<run>/webdataset``. It must name the run and the
  ``labels_sha256`` of the published pointer training uses, and hold as many samples per split
  as the labels have rows; anything else is refused (:class:`ExportMismatch`): re-export.
- :class:`ShardImages` — an ``IterableDataset`` (a ``webdataset.DataPipeline``: shard list ->
  tar stream -> samples -> shuffle buffer -> items). The item is what
  :class:`training.data.LabeledImages` gives for the same image (one
  :class:`~training.data.ImageTransform`), ``index`` being the row's position in the split's
  :class:`~training.data.Examples`; an unreadable image is a zero-weight item.

Who reads what. The readers are (rank, DataLoader worker) pairs, ``slots = world x workers``.
Each epoch the shard list is shuffled with ``seed`` + epoch (the same order on every rank) and
dealt out round-robin, one shard to one reader; with fewer shards than readers, the readers of
one shard each keep every m-th sample of it. Either way every sample goes to exactly one
reader. (``webdataset.split_by_node`` / ``split_by_worker`` deal whole shards only, so a rank
would get nothing when shards < ranks: this dealing replaces them.) Each reader shuffles its
samples in a buffer of ``shuffle_buffer`` samples, seeded by ``seed``, epoch and reader.

Training (``batches`` given): every rank yields exactly ``batches`` micro-batches per epoch, so
DDP ranks take the same number of steps. A reader whose share runs short starts its shards
again (a new shuffle); one with more stops at its quota. Evaluation (``batches`` None): no
shuffle, every sample exactly once over all ranks and workers, no padding.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.core import export_layout as layout
from pipeline.core import keys
from pipeline.core.storage import LocalStorage, S3Storage, Storage, StorageError, open_storage
from training.data import ImageTransform

if TYPE_CHECKING:
    from pipeline.core.config import Config, StorageConfig
    from training.data import Examples

log = logging.getLogger(__name__)

#: The image members a sample may carry (the stored bytes' format).
IMAGE_EXTS = ("jpg", "png", "webp")


class ExportMismatch(ValueError):
    """The export cannot be trained on: missing, unfinished, of another run, or not these labels."""


@dataclass(frozen=True)
class ShardExport:
    """A checked webdataset export: where it is and what its manifest says."""

    storage: StorageConfig  # reaches the export (its root may be the export folder itself)
    prefix: str  # the export folder's key prefix under that root: '' or 'exports/<run>/webdataset/'
    where: str  # the folder's URI, for messages
    manifest: dict[str, Any]

    def files(self, split: str) -> list[tuple[str, int]]:
        """(storage key, samples) of each shard of ``split``, in the manifest's order."""
        return [(self.prefix + f["name"], int(f["samples"])) for f in self.manifest["files"] if f["split"] == split]

    def samples(self, split: str) -> int:
        return sum(n for _, n in self.files(split))

    def url(self, key: str) -> str:
        """The URI of a shard's storage ``key`` (as :meth:`files` gives it): names samples in messages."""
        return self.where + "/" + key[len(self.prefix):]


def export_location(cfg: Config, run_id: str) -> tuple[StorageConfig, str]:
    """(storage config, key prefix) of the export training reads: ``training.shards`` with the
    ``[storage]`` endpoint and credentials, or the default folder under the storage root."""
    if cfg.training.shards:
        return replace(cfg.storage, root=cfg.training.shards), ""
    return cfg.storage, keys.export_folder(run_id, layout.FORMATS[0]).rstrip("/") + "/"


def open_export(cfg: Config, published: dict[str, Any], rows: dict[str, int] | None = None) -> ShardExport:
    """The export of ``published`` (the labels publication record training uses), checked.

    ``rows``: split -> labels rows; each split's sample count must match it.
    """
    storage_cfg, prefix = export_location(cfg, published["run_id"])
    storage = open_storage(storage_cfg)
    where = storage.uri(prefix.rstrip("/"))
    run = published["run_id"]
    try:
        manifest = json.loads(storage.get_bytes(prefix + layout.MANIFEST))
    except StorageError as exc:
        raise ExportMismatch(f"no export at {where} ({exc}): run `likerank export {run} --format webdataset` "
                             f"(the manifest is written last: an export without it is unfinished)") from None
    if manifest.get("format") != "webdataset":
        raise ExportMismatch(f"export at {where} is format {manifest.get('format')!r}, not 'webdataset': "
                             f"re-export with --format webdataset")
    if manifest.get("run_id") != run:
        raise ExportMismatch(f"export at {where} is of run {manifest.get('run_id')}; the published run is {run}: "
                             f"re-export")
    if manifest.get("labels_sha256") != published.get("labels_sha256"):
        raise ExportMismatch(f"export at {where} is of run {run} with labels {manifest.get('labels_sha256')}; the "
                             f"published labels are {published.get('labels_sha256')}: re-export")
    export = ShardExport(storage_cfg, prefix, where, manifest)
    for split, n in (rows or {}).items():
        if export.samples(split) != n:
            raise ExportMismatch(f"export at {where} holds {export.samples(split)} {split} samples; labels run {run} "
                                 f"has {n} {split} rows: re-export")
    return export


def reader_shards(files: list[tuple[str, int]], slot: int, slots: int) -> list[tuple[str, int, int]]:
    """What reader ``slot`` of ``slots`` reads: (shard key, stride, offset) — samples ``i`` with
    ``i % stride == offset`` of that shard. Over all readers, every sample exactly once."""
    n = len(files)
    if n == 0:
        return []
    if n >= slots:
        return [(key, 1, 0) for key, _ in files[slot::slots]]
    shard = slot % n  # fewer shards than readers: readers slot, slot+n, ... share a shard
    return [(files[shard][0], len(range(shard, slots, n)), slot // n)]


def open_stream(storage: Storage, key: str) -> IO[bytes]:
    """A sequential read of ``key``: a local file, or an S3 GET's body streamed as it arrives."""
    try:
        if isinstance(storage, S3Storage):
            return storage.client.get_object(Bucket=storage.bucket, Key=storage.object_key(key))["Body"]
        if isinstance(storage, LocalStorage):
            return open(storage.file_of(key), "rb")
        return io.BytesIO(storage.get_bytes(key))
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - named: which shard, and why
        raise StorageError(f"{storage.uri(key)}: {type(exc).__name__}: {exc}") from None


class ShardImages(IterableDataset):
    """One split of a webdataset export as training items (see the module doc for who reads what).

    ``examples`` is the split's rows (their order gives ``index``); ``rank``/``world`` default to
    torch.distributed's. ``batches`` (training): micro-batches of ``batch_size`` this rank yields
    per epoch; None (evaluation): every sample once, in shard order. Call :meth:`set_epoch`
    before each epoch's ``iter(loader)``.
    """

    def __init__(self, export: ShardExport, split: str, examples: Examples, transform: ImageTransform, *,
                 rank: int | None = None, world: int | None = None, batches: int | None = None,
                 batch_size: int = 1, shuffle_buffer: int = 0, seed: int = 0):
        super().__init__()
        if rank is None or world is None:
            dist = torch.distributed
            up = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if up else (0, 1)
        self.export, self.split, self.transform = export, split, transform
        self.files = export.files(split)
        self.index_of = {layout.sample_key(p): i for i, p in enumerate(examples.post_id)}
        self.rank, self.world, self.batches, self.batch_size = rank, world, batches, batch_size
        self.shuffle_buffer = shuffle_buffer if batches is not None else 0
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def reader(self) -> tuple[int, int, int, int]:
        """(slot, slots, worker, workers) of the calling process."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world * workers, worker, workers

    def assignment(self, slot: int, slots: int) -> list[tuple[str, int, int]]:
        """This epoch's shards of reader ``slot``; training deals a shuffled list, the same on every rank."""
        files = list(self.files)
        if self.batches is not None:
            random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(files)
        return reader_shards(files, slot, slots)

    def pipeline(self, storage: Storage, slot: int, slots: int, repeat: int) -> Iterator[dict[str, Any]]:
        """One pass over reader ``slot``'s samples as items (``repeat``: which pass, for the shuffle seed)."""
        import webdataset as wds
        from webdataset.tariterators import group_by_keys, tar_file_expander

        plan = self.assignment(slot, slots)
        keep = {self.export.url(key): (stride, offset) for key, stride, offset in plan}

        def streams():
            for key, _stride, _offset in plan:
                with contextlib.closing(open_stream(storage, key)) as stream:
                    yield {"url": self.export.url(key), "stream": stream}

        def strided(samples):
            url, i = None, 0
            for sample in samples:
                i = i + 1 if sample["__url__"] == url else 0
                url = sample["__url__"]
                stride, offset = keep[url]
                if i % stride == offset:
                    yield sample

        stages: list[Any] = [streams, tar_file_expander, group_by_keys, strided]
        if self.shuffle_buffer > 1:
            rng = random.Random(f"samples:{self.seed}:{self.epoch}:{slot}:{repeat}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng))
        stages.append(lambda samples: map(self.item, samples))  # not wds.map: it adds __key__ to the item
        return iter(wds.DataPipeline(*stages))

    def item(self, sample: dict[str, Any]) -> dict[str, Any]:
        """A sample (``<key>.<image ext>`` + ``<key>.json``) as a dataset item."""
        key, url = sample["__key__"], sample["__url__"]
        try:
            meta = json.loads(sample["json"])
        except (KeyError, ValueError) as exc:
            raise ExportMismatch(f"{url}: sample {key} has no readable .json ({exc}): re-export") from None
        index = self.index_of.get(key)
        if index is None or meta.get("split") != self.split:
            raise ExportMismatch(f"{url}: sample {key} is not a {self.split} row of the published labels: re-export")
        ext = next((e for e in IMAGE_EXTS if e in sample), None)

        def read() -> bytes:
            if ext is None:
                raise ValueError(f"no image member ({'/'.join(IMAGE_EXTS)})")
            return sample[ext]

        box = meta.get("face_box")
        box = np.asarray(box, dtype=np.float32) if box else np.full(4, np.nan, dtype=np.float32)
        frame = np.asarray([meta.get("image_width") or np.nan, meta.get("image_height") or np.nan], dtype=np.float32)
        return self.transform.item(read, box, frame, meta.get("orientation"), label=meta["label"],
                                   score=meta["score"], index=index,
                                   what=f"{meta.get('image_sha256')} (sample {key} of {url})")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots, worker, workers = self.reader()
        storage = open_storage(self.export.storage)  # here, in the worker: no S3 client is pickled
        if self.batches is None:
            yield from self.pipeline(storage, slot, slots, 0)
            return
        want = (self.batches // workers + (worker < self.batches % workers)) * self.batch_size
        got = 0
        for repeat in itertools.count():
            if got >= want:
                return
            before = got
            for item in self.pipeline(storage, slot, slots, repeat):
                yield item
                got += 1
                if got >= want:
                    return
            if got == before:
                raise ExportMismatch(f"export at {self.export.where}: reader {slot} of {slots} (rank {self.rank}, "
                                     f"worker {worker}) has no {self.split} sample: fewer {self.split} samples "
                                     f"({self.export.samples(self.split)}) than ranks x workers")

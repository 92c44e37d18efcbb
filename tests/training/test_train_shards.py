"""Shard input (``training.input = "shards"``): the same items as per-object reads, every sample
read once per epoch over ranks and workers, equal steps per rank, stale exports refused."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.core import export_layout as layout
from pipeline.core.config import load_config
from pipeline.core.published import require_published
from pipeline.core.storage import ImageStore, S3Storage, open_storage
from tests.training.shards_fixture import write_shards
from tests.training.test_train_data import LABELS_RUN, make_labels_run
from training import shards
from training.data import ImageTransform, LabeledImages, load_examples
from training.shards import ExportMismatch, ShardImages, open_export, reader_shards

N = {"train": 24, "val": 7, "test": 5}


@pytest.fixture
def world(tmp_path):
    """A published run (24/7/5 rows) and its export in 5-sample shards; the config to read them."""
    cfg = load_config(overrides=[f"storage.root={tmp_path / 'data'}", "training.input=shards"])
    storage = open_storage(cfg.storage)
    make_labels_run(storage, n=N)
    write_shards(storage, shard_size=5)
    return SimpleNamespace(cfg=cfg, storage=storage, examples=load_examples(storage, LABELS_RUN),
                           published=require_published(storage))


def shard_set(w, split, *, batches=None, rank=0, world=1, augment=False, **kw) -> ShardImages:
    export = open_export(w.cfg, w.published, {s: len(e) for s, e in w.examples.items()})
    return ShardImages(export, split, w.examples[split], ImageTransform(image_size=32, augment=augment),
                       rank=rank, world=world, batches=batches, **kw)


def as_worker(monkeypatch, worker: int, workers: int) -> None:
    monkeypatch.setattr(shards, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))


def test_items_equal_per_object_items(world):
    for split in ("train", "val", "test"):
        objects = LabeledImages(world.examples[split], world.storage, image_size=32)
        items = list(shard_set(world, split))
        assert sorted(int(it["index"]) for it in items) == list(range(len(objects)))
        for it in items:
            ref = objects[int(it["index"])]
            for k in ("image", "label", "score", "weight", "index"):
                assert torch.equal(it[k], ref[k]), (split, k, int(it["index"]))


@pytest.mark.parametrize("world_size, workers", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 2), (2, 4)])
def test_evaluation_reads_every_sample_exactly_once(world, monkeypatch, world_size, workers):
    # val: 7 samples in 2 shards (5 + 2): fewer shards than readers in most cases here
    seen = []
    for rank, worker in itertools.product(range(world_size), range(workers)):
        as_worker(monkeypatch, worker, workers)
        seen += [int(it["index"]) for it in shard_set(world, "val", rank=rank, world=world_size)]
    assert sorted(seen) == list(range(N["val"]))


@pytest.mark.parametrize("files, slots", [(5, 2), (5, 5), (2, 5), (3, 7), (1, 4)])
def test_readers_share_shards_without_overlap(files, slots):
    shard_list = [(f"s{i}", 10) for i in range(files)]
    seen = [(key, i) for slot in range(slots) for key, stride, offset in reader_shards(shard_list, slot, slots)
            for i in range(10) if i % stride == offset]
    assert sorted(seen) == sorted((f"s{i}", j) for i in range(files) for j in range(10))


@pytest.mark.parametrize("world_size, workers, batches", [(1, 1, 6), (2, 2, 3), (3, 1, 2), (2, 3, 5), (1, 2, 3)])
def test_training_epoch_every_rank_the_same_batches(world, monkeypatch, world_size, workers, batches):
    """Every rank yields ``batches`` micro-batches, a reader with a short share starting its
    shards again; a reader whose share covers its quota reads no sample twice."""
    micro = 4
    every, padded = [], False
    for rank in range(world_size):
        got = []
        for worker in range(workers):
            as_worker(monkeypatch, worker, workers)
            ds = shard_set(world, "train", rank=rank, world=world_size, batches=batches, batch_size=micro,
                           shuffle_buffer=8, seed=3)
            mine = [int(it["index"]) for it in ds]
            slot, slots, _, _ = ds.reader()
            share = sum(len(range(offset, n, stride)) for (key, stride, offset), n in
                        ((plan, dict(ds.files)[plan[0]]) for plan in ds.assignment(slot, slots)))
            padded |= len(mine) > share
            assert len(set(mine)) == min(len(mine), share)
            got += mine
        assert len(got) == batches * micro
        every += got
    assert set(every) <= set(range(N["train"]))
    if not padded:
        assert len(set(every)) == len(every)


def test_training_shuffle_is_seeded_by_epoch(world):
    ds = shard_set(world, "train", batches=6, batch_size=4, shuffle_buffer=10, seed=1)
    ds.set_epoch(0)
    first = [int(it["index"]) for it in ds]
    again = [int(it["index"]) for it in ds]
    ds.set_epoch(1)
    second = [int(it["index"]) for it in ds]
    assert first == again and first != second
    assert sorted(first) == sorted(second) == list(range(N["train"]))  # one rank, one reader: each once


@pytest.mark.parametrize("change, message", [
    ({"run_id": "lbl-old"}, "is of run lbl-old; the published run is lbl-test-1: re-export"),
    ({"labels_sha256": "0" * 64}, "with labels 0000.*the published labels are .*: re-export"),
    ({"format": "hf"}, "is format 'hf', not 'webdataset'"),
])
def test_an_export_of_other_labels_is_refused(world, change, message):
    write_shards(world.storage, shard_size=5, manifest=change)
    with pytest.raises(ExportMismatch, match=message):
        shard_set(world, "train")


def test_a_missing_or_short_export_is_refused(world):
    with pytest.raises(ExportMismatch, match="holds 7 val samples; labels run lbl-test-1 has 8 val rows"):
        open_export(world.cfg, world.published, {"val": 8})
    world.storage.delete(f"exports/{LABELS_RUN}/webdataset/{layout.MANIFEST}")
    with pytest.raises(ExportMismatch, match="no export at .*likerank export lbl-test-1 --format webdataset"):
        shard_set(world, "train")


def test_training_shards_names_the_export_folder(world, tmp_path):
    """training.shards: any folder (or s3:// URI), read with the [storage] settings."""
    other = open_storage(load_config(overrides=[f"storage.root={tmp_path / 'elsewhere'}"]).storage)
    for name in world.storage.list(f"exports/{LABELS_RUN}/webdataset/"):
        other.put_bytes(name.rsplit("/", 1)[1], world.storage.get_bytes(name))
    cfg = load_config(overrides=[f"storage.root={tmp_path / 'data'}", f"training.shards={tmp_path / 'elsewhere'}"])
    export = open_export(cfg, world.published)
    assert export.prefix == "" and export.samples("val") == N["val"]


def test_unreadable_image_is_a_zero_weight_item(world):
    bad = world.examples["val"].sha256[2]
    ImageStore(world.storage).storage.put_bytes(f"images/{bad[:2]}/{bad}", b"not an image")
    write_shards(world.storage, shard_size=5)
    items = {int(it["index"]): it for it in shard_set(world, "val")}
    assert items[2]["weight"] == 0.0 and float(items[2]["image"].abs().sum()) == 0.0
    assert all(it["weight"] == 1.0 for i, it in items.items() if i != 2)


def test_a_dataloader_with_workers_reads_each_sample_once(world):
    ds = shard_set(world, "test")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert all(set(b) == {"image", "label", "score", "weight", "index"} for b in batches)  # what training moves
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(seen) == list(range(N["test"]))


@pytest.mark.s3
def test_shards_on_s3(seaweed, tmp_path):
    root = f"s3://{seaweed['bucket']}/shards-{tmp_path.name}"
    cfg = load_config(overrides=[f"storage.root={root}", f"storage.endpoint_url={seaweed['endpoint']}",
                                 "storage.region=us-east-1", f"storage.access_key_id={seaweed['key']}",
                                 f"storage.secret_access_key={seaweed['secret']}", "training.input=shards"])
    storage = open_storage(cfg.storage)
    assert isinstance(storage, S3Storage)
    make_labels_run(storage, n=N)
    write_shards(storage, shard_size=5)
    w = SimpleNamespace(cfg=cfg, storage=storage, examples=load_examples(storage, LABELS_RUN),
                        published=require_published(storage))
    items = list(shard_set(w, "val"))
    objects = LabeledImages(w.examples["val"], cfg.storage, image_size=32)
    assert sorted(int(it["index"]) for it in items) == list(range(N["val"]))
    assert all(torch.equal(it["image"], objects[int(it["index"])]["image"]) for it in items)
    # the whole export, through the s3:// URI in training.shards
    cfg2 = load_config(overrides=[*(f"storage.{k}={v}" for k, v in (("root", root), ("endpoint_url", seaweed["endpoint"]),
                                  ("region", "us-east-1"), ("access_key_id", seaweed["key"]),
                                  ("secret_access_key", seaweed["secret"]))),
                                  f"training.shards={root}/exports/{LABELS_RUN}/webdataset"])
    assert json.loads(json.dumps(open_export(cfg2, w.published).manifest))["run_id"] == LABELS_RUN
    assert np.isfinite(w.examples["val"].box).all()


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_training_on_shards_learns_as_training_on_objects(tmp_path):
    """The same run trained from objects and from shards (torchrun, 2 processes, a DataLoader
    worker each): different sample orders, so not the same numbers, but the same skill on the
    separable images. Evaluation from shards must score every val/test row."""
    from tests.training.test_train_data import TINY
    from training import registry
    from training.launch import launch

    storage = open_storage(load_config(overrides=[f"storage.root={tmp_path / 'data'}"]).storage)
    make_labels_run(storage, n={"train": 192, "val": 64, "test": 64})
    write_shards(storage, shard_size=40)  # 5 train shards over 2 ranks x 1 worker: unequal shares
    results = {}
    for how in ("objects", "shards"):
        cfg = load_config(overrides=[f"storage.root={tmp_path / 'data'}", *TINY, "training.epochs=2",
                                     "training.workers=1", f"training.input={how}", "training.shuffle_buffer=64"])
        lines: list[str] = []
        launch(cfg, run_id=f"r-{how}", echo=lines.append)
        results[how] = registry.read_metrics(storage, f"r-{how}")
    o, s = results["objects"], results["shards"]
    print({how: {"val_auc": round(m["val"]["roc_auc"], 3), "test_auc": round(m["test"]["roc_auc"], 3)}
           for how, m in results.items()})  # measured: objects 0.970 / 0.997, shards 0.964 / 0.960
    assert o["steps"] == s["steps"] == 2 * (192 // 16)
    for split in ("val", "test"):
        assert o[split]["n"] == s[split]["n"] == 64 and s[split]["unreadable_images"] == 0
        assert o[split]["roc_auc"] > 0.8 and s[split]["roc_auc"] > 0.8
        assert abs(o[split]["roc_auc"] - s[split]["roc_auc"]) < 0.15
    assert s["config"]["training"]["input"] == "shards"

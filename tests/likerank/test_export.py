"""``likerank export``: each format loads with its own library, tombstones are re-checked at
export time, an interrupted export resumes, and a complete one is not written again."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from likerank.cli.main import main
from likerank.export import export as export_mod
from likerank.export.export import ExportConflict, export
from pipeline.core import keys
from pipeline.core.config import Config, load_config
from pipeline.core.export_layout import (
    CROISSANT,
    DATASHEET,
    HF_CARD,
    MANIFEST,
    PROGRESS,
    SAMPLE_FIELDS,
    parquet_name,
    sample_key,
    shard_name,
)
from pipeline.core.forget import forget, load_tombstones, salt_for
from pipeline.core.storage import ImageStore, LocalStorage, S3Storage
from pipeline.core.tables import partition_sha256, put_json, read_table
from tests.fixtures.scrape import STAND_IN_AUTHOR_KEY
from tests.training.test_train_data import LABELS_RUN, make_labels_run

COUNTS = {"train": 64, "val": 16, "test": 16}  # make_labels_run's rows per split
SHARD = 16  # samples per shard in these tests: train makes 4 shards


@pytest.fixture(autouse=True)
def _author_key(monkeypatch):
    # Tombstones are salted from the pseudonym key: the forget and the export must agree on it.
    monkeypatch.setenv("LIKERANK_AUTHOR_KEY", STAND_IN_AUTHOR_KEY)


@pytest.fixture
def world(tmp_path: Path) -> tuple[Config, LocalStorage]:
    root = tmp_path / "data"
    cfg = load_config(overrides=[f"storage.root={root}", f"export.shard_size={SHARD}"])
    storage = LocalStorage(root)
    make_labels_run(storage)
    return cfg, storage


def republish(storage, run_id: str = LABELS_RUN) -> None:
    """Validate and publish ``run_id`` again as it now is (as labeling's validate + publish would)."""
    sha = partition_sha256(storage, "labels", run_id)
    put_json(storage, keys.validation_result(run_id), {"run_id": run_id, "success": True, "labels_sha256": sha})
    put_json(storage, keys.PUBLISHED_LABELS, {"run_id": run_id, "published_at": "2026-01-03T00:00:00Z",
                                              "rows": read_table(storage, "labels", partitions=[run_id]).num_rows,
                                              "params_hash": "p" * 16, "labeler": "groups",
                                              "validation_key": keys.validation_result(run_id), "labels_sha256": sha})


def webdataset_samples(folder: str | Path, split: str) -> list[dict]:
    import webdataset as wds

    urls = sorted(glob.glob(f"{folder}/{split}-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


# --------------------------------------------------------------------------- refusals


def test_an_unpublished_run_is_refused_saying_why(tmp_path, capsys):
    root = tmp_path / "data"
    storage = LocalStorage(root)
    make_labels_run(storage, publish=False)
    code = main(["--set", f"storage.root={root}", "export", LABELS_RUN, "--format", "webdataset"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("likerank export: no labels run is published") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (root / keys.export_folder(LABELS_RUN, "webdataset")).exists()


def test_a_run_other_than_the_published_one_is_refused(world, capsys):
    cfg, storage = world
    assert main(["--set", f"storage.root={storage.root}", "export", "lbl-nope", "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "labels run 'lbl-nope' is not published" in err and "refusing to export unvalidated labels" in err


def test_a_failed_validation_is_refused(world, capsys):
    cfg, storage = world
    put_json(storage, keys.validation_result(LABELS_RUN), {"run_id": LABELS_RUN, "success": False})
    assert main(["--set", f"storage.root={storage.root}", "export", LABELS_RUN, "--format", "parquet"]) == 2
    assert "its validation failed" in capsys.readouterr().err


def test_a_folder_holding_another_runs_export_is_refused(world, tmp_path):
    cfg, storage = world
    out = str(tmp_path / "out")
    export(cfg, LABELS_RUN, "parquet", out, storage=storage)
    make_labels_run(storage, run_id="lbl-other", seed=3)  # now the published run
    with pytest.raises(ExportConflict, match="labels run 'lbl-test-1'"):
        export(cfg, "lbl-other", "parquet", out, storage=storage)
    with pytest.raises(ExportConflict, match="not empty and holds no likerank export"):
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "notes.txt").write_text("mine")
        export(cfg, "lbl-other", "parquet", str(tmp_path / "elsewhere"), storage=storage)


# --------------------------------------------------------------------------- formats


def test_webdataset_loads_with_its_splits_labels_and_fields(world, capsys):
    cfg, storage = world
    labels = read_table(storage, "labels", partitions=[LABELS_RUN]).to_pylist()
    by_key = {sample_key(r["post_id"]): r for r in labels}
    assert main(["--set", f"storage.root={storage.root}", "--set", f"export.shard_size={SHARD}",
                 "export", LABELS_RUN, "--format", "webdataset"]) == 0
    out = Path(json.loads(capsys.readouterr().out)["output"])
    assert out == Path(storage.root) / keys.export_folder(LABELS_RUN, "webdataset")
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == sorted([CROISSANT, DATASHEET, MANIFEST, PROGRESS, *(shard_name("train", i) for i in range(4)),
                            shard_name("val", 0), shard_name("test", 0)])
    images = ImageStore(storage)
    for split, n in COUNTS.items():
        samples = webdataset_samples(out, split)
        assert len(samples) == n
        keys_in_order = [s["__key__"] for s in samples]
        assert keys_in_order == [sample_key(r["post_id"]) for r in sorted(
            (r for r in labels if r["split"] == split), key=lambda r: r["post_id"])]  # post_id order
        for s in samples:
            row, meta = by_key[s["__key__"]], s["json"]
            assert list(meta) == list(SAMPLE_FIELDS)
            assert meta["label"] == row["label"] and meta["split"] == split
            assert meta["image_sha256"] == row["image_sha256"] and meta["orientation"] == 1
            assert meta["image_width"] == meta["image_height"] == 64 and len(meta["face_box"]) == 4
            assert s["png"].size == (64, 64)  # decoded by its extension
    import webdataset as wds

    raw = next(iter(wds.WebDataset([str(out / shard_name("val", 0))], shardshuffle=False)))
    assert raw["png"] == images.get(json.loads(raw["json"])["image_sha256"])  # the stored bytes, as they are
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["splits"] == COUNTS and manifest["excluded_by_tombstones"] == 0
    assert manifest["labels_sha256"] == partition_sha256(storage, "labels", LABELS_RUN)
    assert set(manifest["table_versions"]) == {"labels", "images", "faces", "posts"}
    assert manifest["table_versions"]["labels"] is not None
    assert [f["name"] for f in manifest["files"]][:4] == [shard_name("train", i) for i in range(4)]


def test_hf_folder_loads_with_datasets(world, tmp_path):
    import datasets

    cfg, storage = world
    result = export(cfg, LABELS_RUN, "hf", storage=storage)
    out = Path(result.uri)
    for split in COUNTS:
        assert (out / parquet_name("hf", split)).is_file()
    card = (out / HF_CARD).read_text()
    assert card.startswith("---\n") and "configs:" in card and "task_categories:" in card and "license: other" in card
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf-cache"))
    assert {k: len(v) for k, v in ds.items()} == COUNTS
    label = ds["train"].features["label"]
    assert isinstance(label, datasets.ClassLabel) and label.names == ["negative", "positive"]
    assert isinstance(ds["train"].features["image"], datasets.Image)
    row = ds["val"][0]
    assert row["image"].size == (64, 64) and row["split"] == "val" and len(row["face_box"]) == 4
    labels = {r["image_sha256"]: r["label"] for r in read_table(storage, "labels", partitions=[LABELS_RUN]).to_pylist()}
    assert all(labels[r["image_sha256"]] == r["label"] for r in ds["train"].select_columns(["image_sha256", "label"]))
    # The Parquet files alone carry the features (no card needed), as the Hub's viewer reads them.
    plain = datasets.load_dataset("parquet", data_dir=str(out / "data"), cache_dir=str(tmp_path / "hf-cache2"))
    assert isinstance(plain["train"].features["label"], datasets.ClassLabel)


def test_parquet_holds_the_stored_image_bytes(world, tmp_path):
    cfg, storage = world
    out = Path(export(cfg, LABELS_RUN, "parquet", str(tmp_path / "pq"), storage=storage).uri)
    images = ImageStore(storage)
    for split, n in COUNTS.items():
        t = pq.read_table(out / parquet_name("parquet", split))
        assert t.num_rows == n
        assert set(SAMPLE_FIELDS) | {"image", "key"} == set(t.column_names)
        for row in t.to_pylist():
            assert row["image"] == images.get(row["image_sha256"]) and row["split"] == split


@pytest.mark.parametrize("fmt", ["webdataset", "hf", "parquet"])
def test_croissant_validates_and_carries_the_rai_fields(world, tmp_path, fmt):
    import mlcroissant as mlc

    cfg, storage = world
    out = Path(export(cfg, LABELS_RUN, fmt, str(tmp_path / fmt), storage=storage).uri)
    dataset = mlc.Dataset(jsonld=str(out / CROISSANT))  # raises on any error
    assert not dataset.metadata.issues.errors
    doc = json.loads((out / CROISSANT).read_text())
    assert "http://mlcommons.org/croissant/RAI/1.0" in doc["conformsTo"]
    for prop in ("rai:dataCollection", "rai:personalSensitiveInformation", "rai:dataAnnotationProtocol",
                 "rai:dataBiases", "rai:dataUseCases", "rai:dataReleaseMaintenancePlan"):
        assert doc.get(prop), prop
    manifest = json.loads((out / MANIFEST).read_text())
    hashes = {d["@id"]: d.get("sha256") for d in doc["distribution"] if d["@type"] == "cr:FileObject"}
    assert hashes == {f["name"]: f["sha256"] for f in manifest["files"]}
    sheet = (out / DATASHEET).read_text()
    for section in ("## Motivation", "## Composition", "## Collection process", "## Preprocessing",
                    "## Uses", "## Distribution", "## Maintenance"):
        assert section in sheet
    assert "likerank forget" in sheet and "rights to each photo remain with its author" in sheet


# --------------------------------------------------------------------------- tombstones


def test_an_author_forgotten_after_labeling_is_not_exported(world, tmp_path, capsys):
    cfg, storage = world
    gone = "a-train-0"  # four rows: p0000..p0003
    forget(storage, salt_for(cfg), authors={gone}, reason="test")
    # The forget removed their rows and unpublished the run: it must be validated again first.
    assert main(["--set", f"storage.root={storage.root}", "export", LABELS_RUN, "--format", "parquet"]) == 2
    assert "no labels run is published" in capsys.readouterr().err
    republish(storage)
    out = Path(export(cfg, LABELS_RUN, "parquet", str(tmp_path / "pq"), storage=storage).uri)
    t = pq.read_table(out / "train.parquet")
    assert t.num_rows == COUNTS["train"] - 4
    assert sample_key("p0000") not in t["key"].to_pylist()


def test_a_tombstone_committed_after_labeling_is_rechecked_at_export(world, tmp_path, monkeypatch):
    """A forget killed after its tombstone (its first step) left the labels as they were: the
    export itself must leave the author out, and say how many rows it left out."""
    cfg, storage = world

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.core.forget._forget_labels", killed)
    with pytest.raises(KeyboardInterrupt):
        forget(storage, salt_for(cfg), authors={"a-val-16"}, reason="test")  # p0064..p0067, all val
    assert load_tombstones(storage, salt_for(cfg)).covers_author("a-val-16")
    result = export(cfg, LABELS_RUN, "webdataset", str(tmp_path / "wds"), storage=storage)  # still published
    samples = webdataset_samples(result.uri, "val")
    assert len(samples) == COUNTS["val"] - 4
    assert not {sample_key(f"p{i:04d}") for i in range(64, 68)} & {s["__key__"] for s in samples}
    assert result.manifest["excluded_by_tombstones"] == 4 and result.manifest["splits"]["val"] == 12
    assert "4 row(s) of this run were left out at export time" in (Path(result.uri) / DATASHEET).read_text()


# --------------------------------------------------------------------------- resume


def test_a_lost_shard_is_rewritten_alone_and_a_complete_export_is_a_no_op(world, tmp_path, capsys):
    cfg, storage = world
    out = tmp_path / "wds"
    first = export(cfg, LABELS_RUN, "webdataset", str(out), storage=storage)
    assert len(first.written) == 6
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / MANIFEST).unlink()
    (out / shard_name("train", 2)).unlink()
    again = export(cfg, LABELS_RUN, "webdataset", str(out), storage=storage)
    assert again.written == [shard_name("train", 2)] and not again.already_complete
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != shard_name("train", 2)} == {
        k: v for k, v in mtimes.items() if k != shard_name("train", 2)}
    assert (out / MANIFEST).is_file() and len(webdataset_samples(out, "train")) == COUNTS["train"]
    # Once complete, a rerun writes nothing and says so.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["--set", f"storage.root={storage.root}", "--set", f"export.shard_size={SHARD}", "export",
                 LABELS_RUN, "--format", "webdataset", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "already holds the complete webdataset export" in captured.err
    assert json.loads(captured.out)["written"] == []
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # A shard lost from a complete export is noticed and rewritten alone, too.
    (out / shard_name("val", 0)).unlink()
    assert export(cfg, LABELS_RUN, "webdataset", str(out), storage=storage).written == [shard_name("val", 0)]


def test_an_interrupted_export_resumes_and_leaves_no_partial_shard(world, tmp_path, monkeypatch):
    cfg, storage = world
    out = tmp_path / "wds"
    real = export_mod._WRITERS["webdataset"]
    calls = []

    def dies_on_the_third(part, images, path, tick):
        calls.append(part.name)
        if len(calls) == 3:
            path.write_bytes(b"half a tar")  # killed mid-shard
            raise KeyboardInterrupt
        return real(part, images, path, tick)

    monkeypatch.setitem(export_mod._WRITERS, "webdataset", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        export(cfg, LABELS_RUN, "webdataset", str(out), storage=storage)
    assert not (out / MANIFEST).exists() and not (out / shard_name("train", 2)).exists()
    assert sorted(json.loads((out / PROGRESS).read_text())["files"]) == [shard_name("train", 0), shard_name("train", 1)]
    monkeypatch.setitem(export_mod._WRITERS, "webdataset", real)
    resumed = export(cfg, LABELS_RUN, "webdataset", str(out), storage=storage)
    assert resumed.written == [shard_name("train", i) for i in (2, 3)] + [shard_name("val", 0), shard_name("test", 0)]
    assert not list(out.glob("*.tmp"))
    assert {s: len(webdataset_samples(out, s)) for s in COUNTS} == COUNTS


def test_an_export_after_a_forget_rewrites_the_files_that_held_the_person(world, tmp_path, monkeypatch):
    cfg, storage = world
    out = tmp_path / "wds"
    export(cfg, LABELS_RUN, "webdataset", str(out), storage=storage)
    monkeypatch.setattr("pipeline.core.forget._forget_labels", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        forget(storage, salt_for(cfg), authors={"a-train-0"}, reason="test")
    again = export(cfg, LABELS_RUN, "webdataset", str(out), storage=storage)
    assert not again.already_complete and again.manifest["excluded_by_tombstones"] == 4
    assert sample_key("p0000") not in {s["__key__"] for s in webdataset_samples(out, "train")}


# --------------------------------------------------------------------------- S3


@pytest.mark.s3
def test_webdataset_export_to_s3(world, seaweed, tmp_path):
    cfg, storage = world
    s3cfg = load_config(overrides=[f"storage.root={storage.root}", f"export.shard_size={SHARD}",
                                   f"storage.endpoint_url={seaweed['endpoint']}", "storage.region=us-east-1",
                                   f"storage.access_key_id={seaweed['key']}",
                                   f"storage.secret_access_key={seaweed['secret']}"])
    uri = f"s3://{seaweed['bucket']}/exports-{tmp_path.name}/wds"
    result = export(s3cfg, LABELS_RUN, "webdataset", uri, storage=storage)
    assert result.uri == uri and len(result.written) == 6
    remote = S3Storage(uri, endpoint_url=seaweed["endpoint"], region="us-east-1", access_key_id=seaweed["key"],
                       secret_access_key=seaweed["secret"])
    listed = remote.list()
    assert MANIFEST in listed and CROISSANT in listed and not [k for k in listed if k.endswith(".tmp")]
    local = tmp_path / "fetched"
    local.mkdir()
    for name in listed:
        if name.endswith(".tar"):
            (local / name).write_bytes(remote.get_bytes(name))
    assert {s: len(webdataset_samples(local, s)) for s in COUNTS} == COUNTS
    assert export(s3cfg, LABELS_RUN, "webdataset", uri, storage=storage).already_complete


# --------------------------------------------------------------------------- facts


def test_croissant_and_datasheet_say_what_the_tables_know(tmp_path):
    """With posts and downloads stored: the collection window, instance, hashtag and opt-outs."""
    import datetime as dt

    import pyarrow as pa

    from pipeline.core.schemas import conform
    from pipeline.core.tables import write_partition
    from tests.fixtures.report import REPORT_RUN, make_report_dataset

    root = tmp_path / "data"
    storage = LocalStorage(root)
    make_report_dataset(storage, model=False)
    republish(storage, REPORT_RUN)
    write_partition(storage, "downloads", "2026-11-24", conform("downloads", pa.Table.from_pylist([
        {"source": "mastodon", "post_id": f"q{i}", "url": f"http://sim/q{i}.jpg", "status": "opted_out",
         "http_status": 200, "error": None, "bytes": 0, "elapsed_ms": 1.0, "attempts": 1, "sha256": None,
         "attempted_at": dt.datetime(2026, 11, 24, tzinfo=dt.UTC), "attempt": 1, "next_attempt_at": None,
         "opt_out_reason": reason} for i, reason in enumerate(["tdm", "noai", "tdm"])])))
    cfg = load_config(overrides=[f"storage.root={root}"])
    result = export(cfg, REPORT_RUN, "webdataset", storage=storage)
    out = Path(result.uri)
    doc = json.loads((out / CROISSANT).read_text())
    assert doc["rai:dataCollectionTimeFrame"] == ["2026-10-14", "2026-10-14"]  # created 40 days before 2026-11-23
    assert "http://sim" in doc["rai:dataCollection"] and "#selfie" in doc["rai:dataCollection"]
    assert "3 image download(s) were refused" in doc["rai:dataCollection"] and "noai: 1, tdm: 2" in doc["rai:dataCollection"]
    sheet = (out / DATASHEET).read_text()
    assert "between 2026-10-14 and 2026-10-14" in sheet and "#selfie" in sheet
    assert "too_young: 3" in sheet  # the run's drops by reason, from its record
    samples = webdataset_samples(out, "test")
    assert samples and all("jpg" in s for s in samples)  # JPEG bytes get .jpg
    assert result.manifest["table_versions"]["posts"] == 0

"""Labeling on the project's tables (local and S3 storage) and on bring-your-own files via the CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from labeling.build_labels import build_labels
from labeling.eligibility import read_candidates
from likerank.cli.main import main
from pipeline.core.config import load_config
from pipeline.core.schemas import DOWNLOADS, ENGAGEMENT, FACES, POSTS
from pipeline.core.tables import get_json, write_partition

T0 = datetime(2026, 1, 1, tzinfo=UTC)
INSTANCE = "https://sim.example"


def post(pid: str, *, author: str = "a1", n_tags: int = 1, followers: int = 100, urls=None, instance=INSTANCE,
         scraped_at=T0) -> dict:
    return {"source": "mastodon", "instance": instance, "hashtag": "selfie", "post_id": pid,
            "created_at": T0, "author_key": author, "author_followers": followers, "tags": ["selfie"] * n_tags,
            "n_tags": n_tags, "likes": 0, "reposts": 0, "replies": 0, "views": None,
            "image_urls": [f"http://img/{pid}.jpg"] if urls is None else urls, "sensitive": False,
            "language": None, "scraped_at": scraped_at}


def obs(pid: str, age: float, likes: int, followers: int = 100, instance=INSTANCE) -> dict:
    return {"source": "mastodon", "instance": instance, "post_id": pid, "observed_at": T0 + timedelta(days=age),
            "likes": likes, "reposts": 0, "replies": 0, "views": None, "author_followers": followers,
            "age_days": age}


def download(pid: str, status: str = "ok", sha: str | None = None) -> dict:
    return {"source": "mastodon", "post_id": pid, "url": f"http://img/{pid}.jpg", "status": status,
            "http_status": 200, "error": None, "bytes": 10, "elapsed_ms": 1.0, "attempts": 1,
            "sha256": (sha or f"sha-{pid}") if status == "ok" else None, "attempted_at": T0}


def face_row(sha: str, scores: list[float], status: str = "ok") -> dict:
    faces = [{"x1": 0.0, "y1": 0.0, "x2": 50.0, "y2": 50.0, "score": s, "landmarks": [0.0] * 10} for s in scores]
    return {"sha256": sha, "detector_id": "det", "status": status, "error": None, "width": 100, "height": 100,
            "phash": None, "n_faces": len(scores), "faces": faces, "largest_face_share": 0.25 if scores else None,
            "largest_face_cx": None, "largest_face_cy": None, "detected_at": T0}


def write_world(storage, n_good: int = 6) -> None:
    posts = [post(f"{i:04d}", author=f"a{i % 3}", followers=100 + i) for i in range(n_good)]
    eng = [obs(f"{i:04d}", 35.0, likes=i) for i in range(n_good)]
    eng += [obs(f"{i:04d}", 50.0, likes=10 * i) for i in range(n_good)]  # the latest mature snapshot wins
    eng += [obs(f"{i:04d}", 2.0, likes=999) for i in range(n_good)]
    downloads = [download(f"{i:04d}") for i in range(n_good)]
    faces = [face_row(f"sha-{i:04d}", [0.9]) for i in range(n_good)]
    # one post for every way to be dropped
    posts += [post("young"), post("nofollow", followers=5), post("tagged", n_tags=20), post("noimg"),
              post("undetected"), post("faceless"), post("lowscore"), post("copy"),
              post("0000", instance="https://zz.example")]  # same id on a second instance (sorts last)
    eng += [obs("young", 3.0, 1), obs("nofollow", 40.0, 1, followers=5), obs("tagged", 40.0, 1),
            obs("noimg", 40.0, 1), obs("undetected", 40.0, 1), obs("faceless", 40.0, 1), obs("lowscore", 40.0, 1),
            obs("copy", 40.0, 1)]
    downloads += [download("noimg", status="http_error"), download("undetected"), download("faceless"),
                  download("lowscore"), download("copy", sha="sha-0001")]
    faces += [face_row("sha-faceless", []), face_row("sha-lowscore", [0.3, 0.2])]
    for table, rows, schema in (("posts", posts, POSTS), ("engagement", eng, ENGAGEMENT),
                                ("downloads", downloads, DOWNLOADS), ("faces", faces, FACES)):
        write_partition(storage, table, "2026-02-15", pa.Table.from_pylist(rows, schema=schema))


def test_candidates_from_project_tables(local_storage):
    write_world(local_storage)
    cfg = load_config(env={})
    cands, counts = read_candidates(local_storage, cfg)
    rows = {r["post_id"]: r for r in cands.to_pylist()}
    assert counts["duplicate_post_id"] == 1
    assert rows["0003"]["likes"] == 30 and rows["0003"]["age_days"] == 50.0  # latest snapshot at age >= 30
    assert rows["young"]["age_days"] is None and rows["noimg"]["image_sha256"] is None
    assert rows["undetected"]["n_faces"] is None and rows["lowscore"]["n_faces"] == 0
    assert rows["0002"]["n_faces"] == 1 and rows["0002"]["face_share"] == pytest.approx(0.25)
    assert rows["copy"]["image_sha256"] == "sha-0001"


def test_build_labels_writes_run_config_and_summary(storage):
    write_world(storage)
    cfg = load_config(env={}, overrides=["labeling.group_size=2", "validation.min_rows=2"])
    summary = build_labels(cfg, "run1", storage)
    d = summary["dropped"]
    assert (d["duplicate_post_id"], d["age_below_min"], d["followers_out_of_range"], d["too_many_tags"],
            d["no_image"], d["no_face_detection"], d["face_filter"], d["duplicate_image"]) == (1, 1, 1, 1, 1, 1, 2, 1)
    assert summary["rows_in"] == 15 and summary["rows_out"] == 6 and summary["groups"] == 3
    assert get_json(storage, "labels/run=run1/_summary.json")["rows_out"] == 6
    assert "[labeling]" in storage.get_text("labels/run=run1/_config.toml")
    from pipeline.core.tables import read_table

    labels = read_table(storage, "labels", ["run1"])
    assert labels.num_rows == 6 and set(labels.column("label").to_pylist()) == {0, 1}


def test_too_few_eligible_posts_is_nothing_to_label_and_writes_nothing(local_storage):
    from labeling.build_labels import NothingToLabel

    write_world(local_storage)  # 6 eligible posts
    cfg = load_config(env={}, overrides=["labeling.group_size=4", "validation.min_rows=8"])
    with pytest.raises(NothingToLabel) as caught:
        build_labels(cfg, "run1", local_storage)
    message = str(caught.value)
    assert "4 posts would be labeled, a run needs at least 8" in message
    assert "15 candidate posts" in message and "age_below_min 1" in message and "partial_group 2" in message
    assert not local_storage.list("labels/")


def test_a_run_with_under_a_group_of_new_posts_since_the_published_one_is_nothing_to_label(local_storage):
    from labeling.build_labels import NothingToLabel
    from labeling.validate import validate_run
    from pipeline.core.published import publish

    write_world(local_storage, n_good=4)
    cfg = load_config(env={}, overrides=["labeling.group_size=2", "validation.min_rows=2",
                                         "validation.data_docs=false"])
    build_labels(cfg, "run1", local_storage)
    validate_run(cfg, "run1", local_storage, inputs=False)
    publish(cfg, "run1", local_storage)
    write_world(local_storage, n_good=5)  # one more eligible post: a partial group, nothing new to label
    with pytest.raises(NothingToLabel, match="0 of the posts it would label are new since the published labels run run1"):
        build_labels(cfg, "run2", local_storage)
    write_world(local_storage, n_good=6)  # two new: a whole group
    assert build_labels(cfg, "run2", local_storage)["rows_out"] == 6
    assert build_labels(cfg, "run1", local_storage)["rows_out"] == 6  # rerunning the published run compares to nothing


def test_label_command_on_project_tables_validates_and_publishes(tmp_path, monkeypatch, capsys):
    from pipeline.core.storage import LocalStorage

    store = LocalStorage(tmp_path / "data")
    write_world(store, n_good=12)
    monkeypatch.chdir(tmp_path)
    rc = main(["--set", f"storage.root={tmp_path / 'data'}", "--set", "labeling.group_size=4",
               "--set", "validation.min_rows=4", "label", "--run", "cli-run"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert get_json(store, "labels/_published.json")["run_id"] == "cli-run"
    assert store.exists("validation/run=cli-run/data_docs/index.html")


# --------------------------------------------------------------------------- bring your own

BYO = {"post_id": [f"{i:03d}" for i in range(10)], "author_key": [f"u{i % 4}" for i in range(10)],
       "likes": list(range(10)), "followers": [100 + 10 * i for i in range(10)], "n_tags": [1] * 10,
       "age_days": [31.5] * 10}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_bring_your_own_file(tmp_path, capsys, fmt):
    src, out = tmp_path / f"in.{fmt}", tmp_path / f"out.{fmt}"
    table = pa.table(BYO)
    pq.write_table(table, src) if fmt == "parquet" else pcsv.write_csv(table, src)
    rc = main(["--set", "labeling.group_size=4", "--set", "labeling.min_followers=0",
               "label", "--input", str(src), "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_out"] == 8 and summary["dropped"]["partial_group"] == 2
    labels = pq.read_table(out) if fmt == "parquet" else pcsv.read_csv(
        out, convert_options=pcsv.ConvertOptions(column_types={"post_id": pa.string(), "image_sha256": pa.string()}))
    assert labels.num_rows == 8 and sorted(labels.column("post_id").to_pylist())[0] == "002"  # "000" kept as text
    assert set(labels.column("image_sha256").to_pylist()) == {""}


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop_columns(["likes", "age_days"]), "missing column(s) likes, age_days"),
    (lambda t: t.set_column(2, "likes", pa.array([1.5] * 10)), "column likes: expected integer, found double"),
    (lambda t: t.set_column(0, "post_id", pa.array(range(10))), "column post_id: expected string, found int64"),
    (lambda t: t.set_column(0, "post_id", pa.array(["x"] * 10)), "column post_id: 1 value(s) repeat"),
    (lambda t: t.set_column(3, "followers", pa.array([None] + [1] * 9, pa.int64())), "column followers: 1 empty"),
])
def test_bring_your_own_errors_name_the_file_and_the_column(tmp_path, capsys, change, message):
    src = tmp_path / "bad.parquet"
    pq.write_table(change(pa.table(BYO)), src)
    rc = main(["label", "--input", str(src), "--output", str(tmp_path / "out.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and str(src) in err and message in err
    assert not (tmp_path / "out.parquet").exists()


def test_no_secret_in_the_saved_config_or_anything_else_the_run_writes(local_storage, tmp_path):
    """The resolved config saved beside the labels shows *** for every secret."""
    write_world(local_storage)
    cfg = load_config(overrides=["storage.access_key_id=dummy-key-id-5150",
                                 "storage.secret_access_key=dummy-secret-8086",
                                 "labeling.group_size=2", "validation.min_rows=2"])
    build_labels(cfg, "run1", local_storage)
    saved = local_storage.get_text("labels/run=run1/_config.toml")
    assert 'secret_access_key = "***"' in saved and 'access_key_id = "***"' in saved
    for path in local_storage.path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"dummy-secret-8086" not in data and b"dummy-key-id-5150" not in data, path
    assert "dummy-secret-8086" not in repr(cfg) and "dummy-secret-8086" not in str(cfg.storage)


def test_rebuilding_the_published_run_unpublishes_it_until_validated_again(local_storage):
    from labeling.validate import validate_run
    from pipeline.core.published import NotValidated, publish, published

    write_world(local_storage)
    cfg = load_config(overrides=["validation.min_rows=4", "labeling.group_size=2", "validation.data_docs=false"])
    build_labels(cfg, "run1", local_storage)
    validate_run(cfg, "run1", local_storage, inputs=False)
    pointer = publish(cfg, "run1", local_storage)
    assert pointer["labels_sha256"] and published(local_storage)["run_id"] == "run1"
    build_labels(cfg, "run1", local_storage)
    assert published(local_storage) is None
    with pytest.raises(NotValidated, match="no validation result"):
        publish(cfg, "run1", local_storage)


def test_labels_changed_after_validation_cannot_be_published(local_storage):
    from labeling.validate import validate_run
    from pipeline.core.published import NotValidated, publish
    from pipeline.core.tables import read_table, write_partition

    write_world(local_storage)
    cfg = load_config(overrides=["validation.min_rows=4", "labeling.group_size=2", "validation.data_docs=false"])
    build_labels(cfg, "run1", local_storage)
    validate_run(cfg, "run1", local_storage, inputs=False)
    rows = read_table(local_storage, "labels", ["run1"]).drop_columns(["run"])
    write_partition(local_storage, "labels", "run1", rows.slice(1))  # what a stray writer might do
    with pytest.raises(NotValidated, match="changed after validation"):
        publish(cfg, "run1", local_storage)


def test_a_run_rebuilt_as_of_its_table_versions_has_identical_labels(local_storage, capsys):
    """More posts arrive and the config changes; ``label --as-of`` still rebuilds the run exactly."""
    from pipeline.core.labels_run import read_labels_run
    from pipeline.core.published import published
    from pipeline.core.tables import read_table

    write_world(local_storage)
    cfg = load_config(env={}, overrides=["labeling.group_size=2", "validation.min_rows=2"])
    build_labels(cfg, "run1", local_storage)
    assert set(read_labels_run(local_storage, "run1").record["table_versions"]) == {
        "posts", "engagement", "downloads", "faces"}
    more = [post(f"{i:04d}", author=f"b{i}", followers=100 + i) for i in range(6, 10)]
    write_partition(local_storage, "posts", "2026-02-16", pa.Table.from_pylist(more, schema=POSTS))
    write_partition(local_storage, "engagement", "2026-02-16",
                    pa.Table.from_pylist([obs(p["post_id"], 40.0, 7) for p in more], schema=ENGAGEMENT))
    write_partition(local_storage, "downloads", "2026-02-16",
                    pa.Table.from_pylist([download(p["post_id"]) for p in more], schema=DOWNLOADS))
    write_partition(local_storage, "faces", "2026-02-16",
                    pa.Table.from_pylist([face_row(f"sha-{p['post_id']}", [0.9]) for p in more], schema=FACES))

    def labels(run: str) -> list[tuple]:
        t = read_table(local_storage, "labels", [run]).sort_by("post_id")
        return list(zip(*[t[c].to_pylist() for c in ("post_id", "group_id", "rank_in_group", "label", "score",
                                                     "exposure", "params_hash")], strict=True))

    now = build_labels(cfg, "run2", local_storage)
    assert now["rows_out"] > 6 and labels("run2") != labels("run1")  # today's tables give other labels
    args = ["--set", f"storage.root={local_storage.root}", "--set", "labeling.group_size=4",  # today's config differs
            "--set", "validation.min_rows=2", "label", "--as-of", "run1"]
    assert main(args) == 0, capsys.readouterr().err
    assert labels("run1-asof") == labels("run1")
    assert read_labels_run(local_storage, "run1-asof").params_hash == read_labels_run(local_storage, "run1").params_hash
    assert published(local_storage) is None or published(local_storage)["run_id"] != "run1-asof"  # never published

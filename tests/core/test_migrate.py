"""``likerank migrate``: a root written by the previous release (one Parquet file per partition,
``state/tombstones.json``, ``state/refs/**/dt=*.parquet``) becomes the Delta tables, in place.

The previous layout is built here by hand, file by file, as that release wrote it.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from likerank.cli.main import main
from pipeline.core import migrate as migrate_mod
from pipeline.core.config import load_config
from pipeline.core.forget import load_tombstones, salt_for
from pipeline.core.migrate import migrate
from pipeline.core.post_refs import load_refs
from pipeline.core.pseudonym import tombstone_hash
from pipeline.core.schemas import DOWNLOADS, FACES, IMAGES, LABELS, POSTS, TABLES
from pipeline.core.storage import LocalStorage, Storage
from pipeline.core.tables import list_partitions, read_table, version, write_partition

DAYS = ("2026-11-02", "2026-11-03")
WHEN = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
INSTANCE = "https://x.example"
ALICE, BOB = "a" * 64, "b" * 64  # author keys (pseudonyms)
SHA = [f"{i:064x}" for i in range(4)]
OLD_REFS = "state/refs/bluesky/localhost_8080/dt=2026-11-02.parquet"
OLD_TOMBSTONES = "state/tombstones.json"


def put_parquet(storage: Storage, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.put_bytes(key, buf.getvalue())


def old_key(table: str, value: str) -> str:
    t = TABLES[table]
    return f"{t.path}/{t.partition}={value}/data.parquet"


def post(i: int, author: str) -> dict:
    return {"source": "mastodon", "instance": INSTANCE, "hashtag": "selfie", "post_id": str(100 + i),
            "created_at": WHEN, "author_key": author, "author_followers": 10 + i, "tags": ["selfie"], "n_tags": 1,
            "likes": i, "reposts": 0, "replies": 0, "views": None, "image_urls": [f"{INSTANCE}/m/{i}.jpg"],
            "sensitive": False, "language": "en", "scraped_at": WHEN}


def download(i: int) -> dict:
    return {"source": "mastodon", "post_id": str(100 + i), "url": f"{INSTANCE}/m/{i}.jpg", "status": "ok",
            "http_status": 200, "error": None, "bytes": 1000, "elapsed_ms": 5.0, "attempts": 1, "sha256": SHA[i],
            "attempted_at": WHEN}


def image(i: int) -> dict:
    return {"sha256": SHA[i], "width": 64, "height": 48, "format": "JPEG", "bytes": 1000,
            "storage_key": f"images/{SHA[i][:2]}/{SHA[i]}"}


def face_row(i: int) -> dict:
    face = {"x1": 1.0, "y1": 2.0, "x2": 30.0, "y2": 40.0, "score": 0.9, "landmarks": [float(k) for k in range(10)]}
    return {"sha256": SHA[i], "detector_id": "d" * 64, "status": "ok", "error": None, "width": 64, "height": 48,
            "phash": "0123456789abcdef", "n_faces": 1, "faces": [face], "largest_face_share": 0.3,
            "largest_face_cx": 0.5, "largest_face_cy": 0.5, "detected_at": WHEN}


def label(i: int, author: str) -> dict:
    return {"post_id": str(100 + i), "source": "mastodon", "image_sha256": SHA[i], "author_key": author, "likes": i,
            "followers": 10 + i, "n_tags": 1, "age_days": 40.0, "exposure": 10.0, "group_id": 0,
            "rank_in_group": i + 1, "label": int(i >= 2), "score": 0.5, "split": "test", "labeler": "groups",
            "params_hash": "p", "run_id": "L1"}


def build_old_root(storage: Storage) -> dict[str, int]:
    """Write a previous-release root; return the rows each table must end up with."""
    authors = [ALICE, ALICE, BOB, BOB]
    old = {
        ("posts", DAYS[0]): pa.Table.from_pylist([post(i, authors[i]) for i in (0, 1, 2)], schema=POSTS),
        ("posts", DAYS[1]): pa.Table.from_pylist([post(3, BOB)], schema=POSTS),
        ("downloads", DAYS[0]): pa.Table.from_pylist([download(i) for i in range(4)], schema=DOWNLOADS),
        ("images", DAYS[0]): pa.Table.from_pylist([image(i) for i in range(4)], schema=IMAGES),
        ("faces", DAYS[0]): pa.Table.from_pylist([face_row(i) for i in range(3)], schema=FACES),
        ("labels", "L1"): pa.Table.from_pylist([label(i, authors[i]) for i in range(4)], schema=LABELS),
    }
    for (table, value), rows in old.items():
        put_parquet(storage, old_key(table, value), rows)
    storage.put_text("labels/run=L1/_summary.json", "{}")  # a run's side file: not table data, stays
    storage.put_text(OLD_TOMBSTONES, json.dumps([
        {"at": "2026-11-01T10:00:00+00:00", "reason": "request", "authors": ["c" * 64], "posts": [], "images": []},
        {"at": "2026-11-02T10:00:00+00:00", "reason": "deleted at source", "authors": [],
         "posts": [[INSTANCE, "999"], [INSTANCE, "998"]], "images": [SHA[3]]},
    ]))
    put_parquet(storage, OLD_REFS, pa.table({"post_id": ["500", "501"], "author_key": [ALICE, BOB],
                                             "ref": ["at://did:plc:a/app.bsky.feed.post/1",
                                                     "at://did:plc:b/app.bsky.feed.post/2"]}))
    expected = {name: 0 for name in TABLES}
    for (table, _), rows in old.items():
        expected[table] += rows.num_rows
    return expected


def old_files(storage: Storage) -> list[str]:
    return [k for k in storage.list() if k.endswith("/data.parquet") or k in (OLD_TOMBSTONES, OLD_REFS)]


def salt_of(root: Path) -> str:
    return salt_for(load_config(overrides=[f"storage.root={root}"]))


def run_cli(root: Path | str, *args: str) -> int:
    return main(["--set", f"storage.root={root}", "migrate", *args])


@pytest.fixture
def old_root(local_storage: LocalStorage) -> tuple[LocalStorage, dict[str, int]]:
    return local_storage, build_old_root(local_storage)


def test_migrate_converts_every_table_and_removes_the_old_files(old_root, capsys):
    storage, expected = old_root
    storage.put_text("labels/_published.json", json.dumps({"run_id": "L1", "labels_sha256": "old"}))
    assert run_cli(storage.root) == 0
    out = capsys.readouterr().out

    for table, rows in expected.items():
        assert read_table(storage, table).num_rows == rows, table
    assert list_partitions(storage, "posts") == list(DAYS)
    assert old_files(storage) == []
    assert storage.exists("labels/run=L1/_summary.json")
    assert "posts       converted 2 partition(s)/file(s), 4 row(s)" in out
    assert "engagement  nothing to do" in out
    assert "note: labels run L1 is published, but its validation vouched for the old file's bytes" in out
    assert "migrated 8 partition(s)/file(s), 24 row(s) into 7 Delta table(s)" in out

    # The rows themselves came through, a face's ten landmarks included.
    faces = read_table(storage, "faces").sort_by("sha256")
    assert faces.schema.field("faces").type == FACES.field("faces").type
    assert faces["faces"].to_pylist()[0][0]["landmarks"] == [float(k) for k in range(10)]
    assert sorted(read_table(storage, "labels")["author_key"].to_pylist()) == [ALICE, ALICE, BOB, BOB]

    stones = load_tombstones(storage, salt_of(Path(storage.root)))
    assert stones.covers_author("c" * 64) and not stones.covers_author(ALICE)
    assert stones.covers_post(INSTANCE, "999") and stones.covers_post(INSTANCE, "998")
    assert stones.images == {SHA[3]}
    rows = read_table(storage, "tombstones").to_pylist()
    assert "c" * 64 not in json.dumps(rows, default=str)  # only hashes are kept
    assert {r["reason"] for r in rows if r["kind"] == "post"} == {"deleted at source"}

    refs = load_refs(storage, "bluesky", "localhost:8080", ["500", "501"])
    assert refs == {"500": "at://did:plc:a/app.bsky.feed.post/1", "501": "at://did:plc:b/app.bsky.feed.post/2"}


def test_a_second_run_has_nothing_to_do(old_root, capsys):
    storage, expected = old_root
    assert run_cli(storage.root) == 0
    versions = {t: version(storage, t) for t in [*TABLES, "tombstones", "post_refs"]}
    capsys.readouterr()

    assert run_cli(storage.root) == 0
    out = capsys.readouterr().out
    assert out.count("nothing to do") == len(versions)
    assert "nothing to migrate" in out
    assert {t: version(storage, t) for t in versions} == versions  # not one commit
    for table, rows in expected.items():
        assert read_table(storage, table).num_rows == rows


def test_dry_run_lists_and_changes_nothing(old_root, capsys):
    storage, _ = old_root
    before = {k: storage.get_bytes(k) for k in storage.list()}

    assert run_cli(storage.root, "--dry-run") == 0
    out = capsys.readouterr().out
    assert {k: storage.get_bytes(k) for k in storage.list()} == before
    assert "posts       would convert 2 partition(s)/file(s), 4 row(s)" in out
    assert f"  dt={DAYS[0]}: 3 row(s) from posts/dt={DAYS[0]}/data.parquet" in out
    assert "tombstones  would convert 1 partition(s)/file(s), 3 row(s)" in out
    assert "post_refs   would convert 1 partition(s)/file(s), 2 row(s)" in out
    assert "  state/tombstones.json: 3 row(s)\n" in out
    assert "nothing changed" in out


def test_a_missing_root_exits_2_and_says_so(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert run_cli(missing) == 2
    err = capsys.readouterr().err
    assert f"storage root {missing} does not exist" in err
    assert not missing.exists()


def test_a_count_mismatch_exits_1_and_keeps_the_old_file(old_root, capsys, monkeypatch):
    storage, _ = old_root
    real = migrate_mod.read_table

    def one_row_short(storage, table, *args, **kwargs):
        rows = real(storage, table, *args, **kwargs)
        return rows.slice(1) if table == "posts" else rows

    monkeypatch.setattr(migrate_mod, "read_table", one_row_short)
    assert run_cli(storage.root) == 1
    err = capsys.readouterr().err
    assert f"table posts, partition dt={DAYS[0]}: the old file has 3 row(s) but 2 were read back" in err
    assert storage.exists(old_key("posts", DAYS[0]))

    monkeypatch.setattr(migrate_mod, "read_table", real)
    assert run_cli(storage.root) == 0  # the rerun converts it, and the rest
    assert read_table(storage, "posts").num_rows == 4
    assert old_files(storage) == []


def test_a_rerun_after_a_crash_resumes(old_root, monkeypatch):
    """Killed after a partition's commit but before its old file was deleted: the rerun writes
    that partition again (replacing, not adding) and converts the rest."""
    storage, expected = old_root
    real_delete = storage.delete

    def crash_on_downloads(key: str) -> None:
        if key.startswith("downloads/"):
            raise KeyboardInterrupt
        real_delete(key)

    monkeypatch.setattr(storage, "delete", crash_on_downloads)
    with pytest.raises(KeyboardInterrupt):
        migrate(storage, salt_of(Path(storage.root)))
    monkeypatch.setattr(storage, "delete", real_delete)
    assert storage.exists(old_key("downloads", DAYS[0])) and not storage.exists(old_key("posts", DAYS[0]))

    results = migrate(storage, salt_of(Path(storage.root)))
    assert {r.table: r.rows for r in results if r.files} == {"downloads": 4, "images": 4, "faces": 3, "labels": 4}
    for table, rows in expected.items():
        assert read_table(storage, table).num_rows == rows


def test_a_delta_root_keeps_its_rows_and_takes_old_files_beside(old_root):
    storage, expected = old_root
    newer = pa.Table.from_pylist([post(7, ALICE)], schema=POSTS)
    write_partition(storage, "posts", "2026-11-09", newer)  # written by the new release

    migrate(storage, salt_of(Path(storage.root)))
    assert list_partitions(storage, "posts") == [*DAYS, "2026-11-09"]
    assert read_table(storage, "posts").num_rows == expected["posts"] + 1


def test_tombstones_merge_with_those_already_in_the_table(old_root):
    """A forget run after the upgrade, before the migration: its row keeps its images."""
    from pipeline.core.tables import merge_rows

    storage, _ = old_root
    salt = salt_of(Path(storage.root))
    later = datetime(2026, 11, 20, tzinfo=UTC)
    merge_rows(storage, "tombstones", pa.table({
        "kind": ["post"], "key_hash": [tombstone_hash(salt, INSTANCE, "999")], "images": [[SHA[2]]],
        "reason": ["request"], "forgotten_at": pa.array([later], pa.timestamp("us", tz="UTC"))}))

    migrate(storage, salt)
    rows = {r["key_hash"]: r for r in read_table(storage, "tombstones").to_pylist()}
    row = rows[tombstone_hash(salt, INSTANCE, "999")]
    assert sorted(row["images"]) == [SHA[2], SHA[3]] and row["reason"] == "request"
    assert len(rows) == 3


def test_ill_formed_tombstones_are_bad_input(old_root, capsys):
    storage, _ = old_root
    storage.put_text(OLD_TOMBSTONES, json.dumps([{"posts": ["not a pair"]}]))
    assert run_cli(storage.root) == 2
    assert "[instance, post_id] pairs" in capsys.readouterr().err
    assert storage.exists(OLD_TOMBSTONES) and storage.exists(old_key("posts", DAYS[0]))  # nothing converted


def test_a_file_of_another_shape_is_bad_input(old_root, capsys):
    storage, _ = old_root
    put_parquet(storage, old_key("engagement", DAYS[0]), pa.table({"post_id": ["1"]}))
    assert run_cli(storage.root) == 2
    err = capsys.readouterr().err
    assert "engagement/dt=2026-11-02/data.parquet" in err and "missing column(s)" in err
    assert storage.exists(old_key("engagement", DAYS[0]))


def test_migrate_on_local_storage_and_s3(storage: Storage):
    expected = build_old_root(storage)
    salt = "s" * 64
    assert sum(r.rows for r in migrate(storage, salt, dry_run=True)) == sum(expected.values()) + 3 + 2
    assert old_files(storage) != []

    migrate(storage, salt)
    for table, rows in expected.items():
        assert read_table(storage, table).num_rows == rows, table
    assert old_files(storage) == []
    assert load_tombstones(storage, salt).covers_post(INSTANCE, "998")
    assert load_refs(storage, "bluesky", "localhost:8080", ["501"]) == {"501": "at://did:plc:b/app.bsky.feed.post/2"}
    assert all(not r.files for r in migrate(storage, salt))


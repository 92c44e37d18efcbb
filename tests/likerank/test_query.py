"""`likerank query`: DuckDB views over the stored tables, on local storage and S3."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.core import keys
from pipeline.core.query import run_query
from pipeline.core.storage import Storage
from pipeline.core.tables import put_json, write_partition


def _labels(run: str, n: int) -> pa.Table:
    return pa.table({
        "post_id": [f"{run}-{i}" for i in range(n)], "source": ["mastodon"] * n, "image_sha256": ["x"] * n, "author_key": ["a"] * n,
        "likes": list(range(n)), "followers": [100] * n, "n_tags": [1] * n, "age_days": [40.0] * n,
        "exposure": [100.0] * n, "group_id": [0] * n, "rank_in_group": list(range(1, n + 1)),
        "label": [int(i >= n // 2) for i in range(n)], "score": [(i + 0.5) / n for i in range(n)],
        "split": ["train"] * n, "labeler": ["groups"] * n, "params_hash": ["p"] * n, "run_id": [run] * n,
    })


def test_views_labels_is_the_published_run(storage: Storage):
    assert run_query(storage, "select count(*) as n from labels").column("n").to_pylist() == [0]
    write_partition(storage, "labels", "r1", _labels("r1", 4))
    write_partition(storage, "labels", "r2", _labels("r2", 6))
    put_json(storage, keys.PUBLISHED_LABELS, {"run_id": "r1"})
    assert run_query(storage, "select count(*) as n from labels").column("n").to_pylist() == [4]
    by_run = run_query(storage, "select run, count(*) as n from labels_all group by run order by run")
    assert by_run.to_pylist() == [{"run": "r1", "n": 4}, {"run": "r2", "n": 6}]
    # tables with no data yet still have their columns
    assert run_query(storage, "select count(post_id) as n from posts").column("n").to_pylist() == [0]


def test_cli_writes_csv(tmp_path):
    from likerank.cli.main import main
    from pipeline.core.storage import LocalStorage

    root = tmp_path / "data"
    write_partition(LocalStorage(root), "labels", "r1", _labels("r1", 4))
    out = tmp_path / "out.csv"
    rc = main(["--set", f"storage.root={root}", "query", "select label, count(*) n from labels_all group by 1 order by 1",
               "--output", str(out)])
    assert rc == 0
    assert out.read_text().splitlines() == ['"label","n"', "0,2", "1,2"]


def test_a_view_reads_the_current_version_never_a_replaced_file(storage: Storage):
    """A raw Parquet glob also sees files a rewrite replaced (until vacuumed); the views do not."""
    write_partition(storage, "labels", "r1", _labels("r1", 4))
    write_partition(storage, "labels", "r1", _labels("r1", 3))  # the run rebuilt: its first file is replaced
    assert len([k for k in storage.list("labels/run=r1/") if k.endswith(".parquet")]) == 2
    assert run_query(storage, "select count(*) as n from labels_all").column("n").to_pylist() == [3]


def test_predictions_is_a_view_of_every_model_runs_predictions(storage: Storage):
    import io

    import pyarrow.parquet as pq

    from pipeline.core.schemas import conform

    assert run_query(storage, "select count(*) as n from predictions").column("n").to_pylist() == [0]
    for run, n in (("m1", 2), ("m2", 3)):
        buf = io.BytesIO()
        pq.write_table(conform("predictions", pa.table({
            "post_id": [f"p{i}" for i in range(n)], "split": ["test"] * n, "prob": [0.5] * n, "pred_score": [0.5] * n,
            "label": [1] * n, "weight": [1.0] * n})), buf)
        storage.put_bytes(keys.model_predictions(run), buf.getvalue())
    by_run = run_query(storage, "select model_run, count(*) as n from predictions group by 1 order by 1")
    assert by_run.to_pylist() == [{"model_run": "m1", "n": 2}, {"model_run": "m2", "n": 3}]


def test_cli_writes_list_columns_to_csv_as_json(tmp_path):
    import csv
    import json

    from likerank.cli.main import main
    from pipeline.core.storage import LocalStorage

    root = tmp_path / "data"
    write_partition(LocalStorage(root), "labels", "r1", _labels("r1", 2))
    out = tmp_path / "lists.csv"
    rc = main(["--set", f"storage.root={root}", "query",
               "select post_id, ['selfie', 'cat'] as tags, {'x': 1} as box from labels_all order by 1",
               "--output", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert [json.loads(r["tags"]) for r in rows] == [["selfie", "cat"]] * 2
    assert json.loads(rows[0]["box"]) == {"x": 1}
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_csv_write_leaves_no_file(tmp_path, monkeypatch):
    import pyarrow.csv

    from likerank.cli.query_cmd import write_result

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pyarrow.csv, "write_csv", broken)  # the one failure a real disk will not give on demand
    out = tmp_path / "x.csv"
    try:
        write_result(pa.table({"a": [1]}), out)
    except OSError:
        pass
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_names_a_root_that_does_not_exist(tmp_path, capsys):
    from likerank.cli.main import main

    rc = main(["--set", f"storage.root={tmp_path / 'missing'}", "query", "select count(*) from posts"])
    assert rc == 1
    assert f"{tmp_path / 'missing'}: no such folder" in capsys.readouterr().err


@pytest.mark.s3
def test_cli_names_a_missing_bucket_in_one_line(seaweed, capsys):
    from likerank.cli.main import main

    args = [f"storage.endpoint_url={seaweed['endpoint']}", f"storage.access_key_id={seaweed['key']}",
            f"storage.secret_access_key={seaweed['secret']}", "storage.region=us-east-1",
            "storage.root=s3://nobucket-here/x"]
    rc = main([*[a for s in args for a in ("--set", s)], "query", "select count(*) from posts"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "bucket 'nobucket-here' does not exist" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_version(capsys):
    from importlib.metadata import version

    from likerank.cli.main import main

    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert capsys.readouterr().out.strip() == f"likerank {version('likerank')}"

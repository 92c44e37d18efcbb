"""The whole chain through Airflow on a small simulated world: what `make run` does.

scrape → refresh_engagement → detect_faces → build_labels → retrain, each DAG run by
`airflow dags test` against a fresh SQLite metadata DB, then the tables are checked to agree
with each other. Slow (a few minutes): it runs every stage for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest

from pipeline.core.published import published_run_id
from pipeline.core.query import run_query
from pipeline.core.storage import LocalStorage
from pipeline.core.tables import get_json, read_table
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
MIN_AGE = 30.0

pytestmark = pytest.mark.slow

#: Credentials set for the whole chain: none may be printed, logged, saved beside outputs, or
#: kept in XCom or Airflow's metadata. (Local storage ignores the S3 keys; the simulator
#: ignores the token; the author key keys the pseudonyms.)
DUMMY_SECRETS = {
    "LIKERANK_STORAGE__ACCESS_KEY_ID": "dummy-access-key-31337",
    "LIKERANK_STORAGE__SECRET_ACCESS_KEY": "dummy-secret-key-27182",
    "LIKERANK_SOURCE_TOKEN": "dummy-source-token-16180",
    "LIKERANK_AUTHOR_KEY": "dummy-author-key-14142",
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    work = tmp_path_factory.mktemp("chain")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIKERANK_", "AIRFLOW"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(work / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "LIKERANK_STORAGE__ROOT": str(work / "data"),
        "LIKERANK_SIMULATOR__POSTS": "600",
        "LIKERANK_SIMULATOR__PORT": str(free_port()),
        "LIKERANK_LABELING__GROUP_SIZE": "20",
        "LIKERANK_LABELING__MIN_AGE_DAYS": str(MIN_AGE),
        "LIKERANK_VALIDATION__MIN_ROWS": "20",
        "LIKERANK_TRAINING__IMAGE_SIZE": "48",
        "LIKERANK_TRAINING__EPOCHS": "1",
        "LIKERANK_TRAINING__BATCH_SIZE": "16",
        "LIKERANK_TRAINING__WEIGHTS": "none",
        "LIKERANK_TRAINING__WORKERS": "0",
        "LIKERANK_TRAINING__NPROC": "1",
        **DUMMY_SECRETS,
    })
    subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    storage = LocalStorage(work / "data")
    runs, counts = [], []
    for _ in range(2):  # the second run must reuse what is there, not duplicate it
        p = subprocess.run([sys.executable, "-m", "likerank.orchestrate"], env=env, cwd=work, capture_output=True,
                           text=True, timeout=1500)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        runs.append(p.stdout)
        counts.append({t: read_table(storage, t).num_rows for t in ("posts", "images", "downloads", "faces")})
    return {"storage": storage, "stdout": runs, "counts": counts, "work": work}


def test_every_stage_ran_and_the_summary_says_so(chain):
    first = chain["stdout"][0]
    assert "not built yet" not in first
    for word in ("scrape", "refresh_engagement", "detect_faces", "build_labels", "retrain",
                 "passed and published: labels run", "ROC-AUC against true quality", "report: ", "likerank query",
                 "simulator: stopped"):
        assert word in first, word
    assert re.search(r"truth matched ([\d,]+) of \1 labeled posts", first), "truth coverage below 100%"


def test_tables_exist_and_agree(chain):
    s = chain["storage"]
    posts = read_table(s, "posts")
    assert posts.num_rows > 100
    ids = posts["post_id"].to_pylist()
    assert len(ids) == len(set(ids)), "a post stored twice"
    run = published_run_id(s)
    assert run
    labels = read_table(s, "labels", partitions=[run])
    assert labels.num_rows >= 20 and labels.num_rows % 20 == 0
    assert set(labels["post_id"].to_pylist()) <= set(ids)
    assert pc.min(labels["age_days"]).as_py() >= MIN_AGE, "a labeled post younger than min_age_days"
    # every labeled image has a faces row with at least one face
    faces = run_query(s, "select sha256, max(n_faces) n from faces where status = 'ok' group by 1")
    with_face = {r["sha256"] for r in faces.to_pylist() if r["n"] >= 1}
    assert set(labels["image_sha256"].to_pylist()) <= with_face
    # every labeled image is stored
    assert all(s.exists(f"images/{h[:2]}/{h}") for h in labels["image_sha256"].to_pylist()[:50])
    # the validation result that allowed publishing
    assert any(k.endswith(".json") for k in s.list(f"validation/run={run}/"))
    # the model trained on exactly the published run
    latest = get_json(s, "models/latest.json")
    metrics = json.loads(s.get_text(latest["metrics_key"]))
    assert metrics["status"] == "complete" and metrics["labels_run"] == run
    assert "roc_auc" in metrics["test"]
    assert all({"val_log_loss", "val_roc_auc"} <= set(h) for h in metrics["history"]), "no validation curve"


def test_report_shows_every_section(chain):
    report = chain["stdout"][0].split("report: ")[1].split()[0]
    html = Path(report).read_text()
    for section in ("funnel", "distributions", "likes-vs-followers", "label-balance", "validation", "model",
                    "contact-sheets"):
        assert f'id="{section}"' in html and f'<section id="{section}" class="na">' not in html, section
    # the findings meet every source's posts in the simulator's truth
    assert '<section id="findings" class="ok">' in html
    assert re.search(r"truth matched ([\d,]+) of \1 labeled posts in the truth file", html), "findings: truth coverage"


def test_second_run_is_incremental(chain):
    first, second = chain["counts"]
    assert first["posts"] > 0 and second == first, (first, second)


def test_no_secret_is_stored_or_printed_anywhere(chain):
    """Every file under the storage root and Airflow's home (task logs, XCom in the metadata DB)."""
    work = chain["work"]
    found = []
    for root in (work / "data", work / "airflow"):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                found += [(str(path), v) for v in DUMMY_SECRETS.values() if v.encode() in data]
    assert not found
    assert not [v for v in DUMMY_SECRETS.values() if any(v in out for out in chain["stdout"])]


def test_the_published_run_exports_in_every_format(chain):
    """What make run publishes leaves the tool: each format loads with its own library."""
    import datasets
    import mlcroissant
    import pyarrow.parquet as pq
    import webdataset as wds

    s, work = chain["storage"], chain["work"]
    run = published_run_id(s)
    labels = read_table(s, "labels", partitions=[run])
    by_split = {sp: labels.filter(pc.equal(labels["split"], sp)).num_rows for sp in ("train", "val", "test")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIKERANK_")}
    env.update({"LIKERANK_STORAGE__ROOT": str(s.root), "LIKERANK_AUTHOR_KEY": DUMMY_SECRETS["LIKERANK_AUTHOR_KEY"]})
    for fmt in ("webdataset", "hf", "parquet"):
        p = subprocess.run([sys.executable, "-m", "likerank.cli", "export", run, "--format", fmt], env=env,
                           cwd=work, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        folder = Path(s.root) / "exports" / run / fmt
        manifest = json.loads((folder / "export.json").read_text())
        assert manifest["run_id"] == run
        mlcroissant.Dataset(jsonld=str(folder / "croissant.json"))  # raises on an invalid file
        assert (folder / "DATASHEET.md").read_text().strip()
        if fmt == "webdataset":
            for sp, n in by_split.items():
                shards = sorted(str(f) for f in folder.glob(f"{sp}-*.tar"))
                got = list(wds.WebDataset(shards, shardshuffle=False).decode())
                assert len(got) == n
                assert sorted(g["json"]["label"] for g in got) == sorted(
                    labels.filter(pc.equal(labels["split"], sp))["label"].to_pylist())
        elif fmt == "hf":
            ds = datasets.load_dataset(str(folder), cache_dir=str(work / "hf-cache"))
            assert {sp: ds[sp].num_rows for sp in ds} == {sp: n for sp, n in by_split.items() if n}
            assert ds["train"].features["label"].names == ["negative", "positive"]
        else:
            assert sum(pq.read_metadata(f).num_rows for f in folder.glob("*.parquet")) == labels.num_rows

"""Forget reaches every copy: each folder a report showing the person was written to (beside an
S3 root, under a local root, anywhere ``--out`` put it, on another host), and the old object
versions a versioned bucket keeps of what it deletes."""

from __future__ import annotations

import os
import socket

import boto3
import pytest

from likerank.report.build import build_report
from pipeline.core import keys
from pipeline.core.forget import forget, forget_plan
from pipeline.core.report_files import owned_files
from pipeline.core.storage import S3Storage
from pipeline.core.tables import get_json, put_json, read_table
from tests.core.test_forget import SALT
from tests.fixtures.report import REPORT_RUN, make_report_dataset
from tests.fixtures.scrape import STAND_IN_AUTHOR_KEY

PERSON = "a00"  # the fabricated world's author keys are a00..a11; a00 wrote p000, p012, p024, p036


@pytest.fixture(autouse=True)
def author_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's posts come from instances that are not on loopback: forget needs a key."""
    monkeypatch.setenv("LIKERANK_AUTHOR_KEY", STAND_IN_AUTHOR_KEY)


def thumbs(folder) -> list:
    return [f for f in owned_files(folder) if "thumbs" in f.parts]


def test_forget_deletes_every_recorded_copy_of_a_report_that_shows_the_person(storage, cfg, tmp_path, monkeypatch):
    make_report_dataset(storage, model=False)
    monkeypatch.chdir(tmp_path)  # beside an S3 root the report goes to ./reports/<run>/
    default = build_report(cfg, storage).parent
    elsewhere = build_report(cfg, storage, out=tmp_path / "shared" / "weekly").parent
    (elsewhere.parent / "notes.txt").write_text("not the report's")
    assert thumbs(default) and thumbs(elsewhere)

    plan = forget_plan(storage, SALT, authors={PERSON})
    assert sorted(plan["reports"]["deleted"]) == sorted(
        ([] if isinstance(storage, S3Storage) else [storage.uri(keys.report_run(REPORT_RUN) + "/")])
        + ([str(default)] if isinstance(storage, S3Storage) else []) + [str(elsewhere)])
    assert plan["reports"]["thumbnails"] == len(thumbs(default)) + len(thumbs(elsewhere))
    assert thumbs(default) and thumbs(elsewhere)  # a dry run deletes nothing

    removed = forget(storage, SALT, authors={PERSON})
    assert removed["labels_runs"] == [REPORT_RUN] and removed["reports"]["thumbnails"] == plan["reports"]["thumbnails"]
    assert not owned_files(default) and not owned_files(elsewhere)
    assert (elsewhere.parent / "notes.txt").exists()  # only the report's own files go
    assert not storage.list(keys.report_locations(REPORT_RUN))


def test_a_copy_on_another_host_is_named_kept_stale_and_deleted_by_the_next_forget_there(local_storage, cfg,
                                                                                            tmp_path, monkeypatch):
    make_report_dataset(local_storage, model=False)
    there = tmp_path / "laptop-report"
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop")
    build_report(cfg, local_storage, out=there)  # written on "laptop"
    monkeypatch.setattr(socket, "gethostname", lambda: "worker-7")
    removed = forget(local_storage, SALT, authors={PERSON})  # run on another machine
    assert removed["reports"]["unreachable"] == [f"laptop:{there.resolve()}"] and thumbs(there)
    (key,) = local_storage.list(keys.report_locations(REPORT_RUN))
    assert get_json(local_storage, key)["stale"] is True

    monkeypatch.setattr(socket, "gethostname", lambda: "laptop")
    later = forget(local_storage, SALT, authors={"someone-else"})  # any forget on that host
    assert later["reports"]["deleted"] == [str(there.resolve())] and not owned_files(there)
    assert not local_storage.list(keys.report_locations(REPORT_RUN))


def test_the_cli_exits_3_when_a_report_copy_could_not_be_reached(local_storage, tmp_path, monkeypatch, capsys):
    from likerank.cli.main import main

    make_report_dataset(local_storage, model=False)
    put_json(local_storage, keys.report_location(REPORT_RUN, "x"), {"run": REPORT_RUN, "host": "elsewhere-host",
                                                                    "path": "/srv/reports/r"})
    assert main(["--set", f"storage.root={local_storage.root}", "forget", "--author-key", PERSON]) == 3
    assert "elsewhere-host:/srv/reports/r" in capsys.readouterr().err


# --------------------------------------------------------------------------- versioned buckets


@pytest.fixture
def versioned(seaweed):
    client = boto3.client("s3", endpoint_url=seaweed["endpoint"], aws_access_key_id=seaweed["key"],
                          aws_secret_access_key=seaweed["secret"], region_name="us-east-1")
    bucket = "likerank-versioned"
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    storage = S3Storage(f"s3://{bucket}/v{os.getpid()}-{id(client)}", endpoint_url=seaweed["endpoint"],
                        region="us-east-1", access_key_id=seaweed["key"], secret_access_key=seaweed["secret"])
    return storage, client


@pytest.mark.s3
def test_on_a_versioned_bucket_no_old_version_of_what_forget_removed_stays(versioned, fake_mastodon, scrape_cfg):
    from pipeline.scrape.scrape import scrape
    from tests.core.test_forget import ALICE, BOB, DAY, KEY, status
    from tests.fixtures.scrape import jpeg_bytes

    storage, client = versioned
    scrape_cfg.storage.root, scrape_cfg.storage.endpoint_url = storage.root, storage.endpoint_url
    scrape_cfg.storage.region = "us-east-1"
    scrape_cfg.storage.access_key_id, scrape_cfg.storage.secret_access_key = storage._keys
    u = fake_mastodon.url
    for i in range(4):
        fake_mastodon.media[f"{i}.jpg"] = jpeg_bytes(seed=i)
    fake_mastodon.statuses = [status(i, ALICE if i < 2 else BOB, f"{u}/media/{i}.jpg") for i in range(4)][::-1]
    scrape_cfg.scrape.backfill_days = 60
    scrape(scrape_cfg, u, "selfie", DAY)
    gone = [keys.image_bytes(d["sha256"]) for d in read_table(storage, "downloads").to_pylist()
            if d["post_id"] in {"100", "101"}]

    removed = forget(storage, SALT, authors={KEY(ALICE)})
    assert removed["posts"] == removed["image_bytes"] == len(gone) == 2 and removed["old_versions"] >= 2

    def versions(prefix: str) -> tuple[list, list]:
        pages = list(client.get_paginator("list_object_versions").paginate(Bucket=storage.bucket,
                                                                            Prefix=storage.object_key(prefix)))
        return [v for p in pages for v in p.get("Versions", [])], [m for p in pages for m in p.get("DeleteMarkers", [])]

    for key in gone:  # the photo's bytes: no version, no marker
        assert versions(key) == ([], []), key
    for table in ("posts", "engagement", "downloads", "images/index"):
        old, markers = versions(f"{table}/")
        assert old and not [v["Key"] for v in old if not v["IsLatest"]] and not markers, table
    assert {p["post_id"] for p in read_table(storage, "posts").to_pylist()} == {"102", "103"}


@pytest.mark.s3
def test_a_versioned_bucket_whose_versions_cannot_be_listed_is_refused_before_anything_changes(versioned,
                                                                                                monkeypatch):
    from botocore.exceptions import ClientError

    from pipeline.core.storage import StorageError

    storage, _ = versioned
    make_report_dataset(storage, model=False, predictions=None)

    def denied(**kw):
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "ListObjectVersions")

    monkeypatch.setattr(storage.client, "list_object_versions", denied)  # credentials without the permission
    before = read_table(storage, "labels").num_rows
    with pytest.raises(StorageError, match="s3:ListBucketVersions"):
        forget(storage, SALT, authors={PERSON})
    assert read_table(storage, "labels").num_rows == before and not read_table(storage, "tombstones").num_rows

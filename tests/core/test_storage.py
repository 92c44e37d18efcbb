"""Storage and table layer, on both backends (local folder and SeaweedFS over S3)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.core.schemas import FACES, SchemaError
from pipeline.core.storage import ImageStore, S3Storage, Storage, StorageError
from pipeline.core.tables import list_partitions, merge_rows, read_table, write_partition

#: The faces columns the face stage measures (rows written before them read null).
PHOTO_ATTRIBUTE_COLUMNS = ("largest_face_height", "head_tilt", "brightness", "contrast", "saturation",
                           "black_and_white", "border", "sharpness")


def test_bytes_roundtrip_list_delete(storage: Storage):
    storage.put_bytes("a/b/one.bin", b"1")
    storage.put_bytes("a/two.bin", b"22")
    storage.put_bytes("c.bin", b"333")
    assert storage.get_bytes("a/b/one.bin") == b"1"
    assert storage.exists("a/two.bin") and not storage.exists("a/none.bin")
    assert storage.list("a/") == ["a/b/one.bin", "a/two.bin"]
    storage.put_bytes("a/two.bin", b"replaced")
    assert storage.get_bytes("a/two.bin") == b"replaced"
    storage.delete("a/two.bin")
    assert storage.list("a/") == ["a/b/one.bin"]
    assert storage.delete_prefix("a/") == 1 and storage.list("a/") == []
    with pytest.raises(StorageError, match="not found"):
        storage.get_bytes("a/two.bin")


def test_image_store_is_content_addressed(storage: Storage):
    images = ImageStore(storage)
    sha, key = images.put(b"\xff\xd8 pretend jpeg")
    again, key2 = images.put(b"\xff\xd8 pretend jpeg")
    assert (sha, key) == (again, key2) and key == f"images/{sha[:2]}/{sha}"
    assert images.get(sha) == b"\xff\xd8 pretend jpeg"
    assert storage.list("images/") == [key]


def _faces(n: int, status: str = "ok") -> pa.Table:
    now = pa.scalar(0, pa.timestamp("us", tz="UTC"))
    return pa.table({
        "sha256": [f"{i:064x}" for i in range(n)], "detector_id": ["d"] * n, "status": [status] * n,
        "error": pa.nulls(n, pa.string()), "width": [640] * n, "height": [480] * n,
        "phash": pa.nulls(n, pa.string()), "n_faces": [0] * n,
        "faces": [[] for _ in range(n)],
        "largest_face_share": pa.nulls(n, pa.float32()), "largest_face_cx": pa.nulls(n, pa.float32()),
        "largest_face_cy": pa.nulls(n, pa.float32()), "detected_at": pa.array([now.value] * n, now.type),
        **{name: pa.nulls(n, FACES.field(name).type) for name in PHOTO_ATTRIBUTE_COLUMNS},
    })


def test_partition_write_is_idempotent_and_read_back(storage: Storage):
    write_partition(storage, "faces", "2026-11-01", _faces(3))
    write_partition(storage, "faces", "2026-11-02", _faces(2))
    write_partition(storage, "faces", "2026-11-01", _faces(4))  # a rerun replaces, never appends
    assert list_partitions(storage, "faces") == ["2026-11-01", "2026-11-02"]
    t = read_table(storage, "faces")
    assert t.num_rows == 6
    assert sorted(t.column("dt").to_pylist()) == ["2026-11-01"] * 4 + ["2026-11-02"] * 2
    assert read_table(storage, "faces", partitions=["2026-11-02"]).num_rows == 2


def test_filtered_reads_work_on_rows_that_a_merge_wrote(storage: Storage):
    """MERGE writes string columns as ``string_view``; a filter on them must still read."""
    write_partition(storage, "faces", "2026-11-01", _faces(2, status="decode_error"))
    merge_rows(storage, "faces", _faces(3), partition_value="2026-11-01")  # a rerun: one new, two updated
    ok = read_table(storage, "faces", columns=["sha256"], filter=pc.field("status") == "ok")
    assert ok.column_names == ["sha256"]
    assert sorted(ok["sha256"].to_pylist()) == [f"{i:064x}" for i in range(3)]
    assert read_table(storage, "faces", filter=pc.field("sha256").isin([f"{1:064x}"])).num_rows == 1
    assert read_table(storage, "faces", filter=pc.field("status") == "none").num_rows == 0


def test_writer_rejects_wrong_types_naming_table_and_column(storage: Storage):
    good = _faces(2)
    bad = good.set_column(good.schema.get_field_index("n_faces"), "n_faces", pa.array(["one", "two"]))
    with pytest.raises(SchemaError, match=r"table faces: column n_faces: expected int32, found string"):
        write_partition(storage, "faces", "2026-11-01", bad)
    with pytest.raises(SchemaError, match=r"table faces: missing column\(s\) status"):
        write_partition(storage, "faces", "2026-11-01", _faces(1).drop_columns(["status"]))
    assert list_partitions(storage, "faces") == []


def _slow_writer(storage: Storage, started) -> None:
    # A big partition, so the kill lands mid-write.
    big = _faces(400_000, status="new")
    started.set()
    while True:
        write_partition(storage, "faces", "2026-11-01", big)


def test_killed_writer_leaves_previous_partition_intact(storage: Storage):
    write_partition(storage, "faces", "2026-11-01", _faces(5, status="old"))
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    proc = ctx.Process(target=_slow_writer, args=(storage, started))
    proc.start()
    assert started.wait(60)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    t = read_table(storage, "faces")
    statuses = set(t.column("status").to_pylist())
    # Either the old partition or a complete new one: never a mix, never a torn file.
    assert (statuses == {"old"} and t.num_rows == 5) or (statuses == {"new"} and t.num_rows == 400_000)


@pytest.mark.s3
def test_s3_bad_credentials_give_a_clear_error(seaweed):
    bad = S3Storage(f"s3://{seaweed['bucket']}/x", endpoint_url=seaweed["endpoint"], region="us-east-1",
                    access_key_id=seaweed["key"], secret_access_key="wrong")
    with pytest.raises(StorageError, match="refused the credentials"):
        bad.put_bytes("k", b"v")


def test_a_killed_writers_leftover_temp_file_is_cleaned_on_the_next_write(local_storage):
    """The next process to write into the folder clears it (once per folder per process)."""
    import os
    import time

    from pipeline.core.storage import STALE_TEMP_S, LocalStorage

    local_storage.put_bytes("t/data.parquet", b"v1")
    folder = local_storage.path / "t"
    stale, fresh = folder / ".tmp-dead-data.parquet", folder / ".tmp-live-data.parquet"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    old = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    LocalStorage(local_storage.path).put_bytes("t/data.parquet", b"v2")  # the next run's process
    assert not stale.exists() and fresh.exists()  # a running writer's temp file is left alone
    assert local_storage.get_bytes("t/data.parquet") == b"v2" and local_storage.list("t/") == ["t/data.parquet"]


def test_local_keys_cannot_escape_the_root(local_storage):
    for key in ("../outside", "a/../../outside", "/etc/passwd"):
        with pytest.raises(StorageError, match="escapes the storage root"):
            local_storage.put_bytes(key, b"x")
    local_storage.put_bytes("a/./b/../c", b"x")  # normalised, and inside
    assert local_storage.get_bytes("a/c") == b"x"

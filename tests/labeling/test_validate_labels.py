"""The publish gate: good runs pass and publish; corrupted runs fail validation and stay unpublished."""

from __future__ import annotations

import pyarrow as pa
import pytest

from labeling.build_labels import label_candidates
from labeling.validate import ValidationFailed, validate_run
from pipeline.core.config import load_config
from pipeline.core.labels_run import write_labels_run
from pipeline.core.published import NotValidated, publish, published
from pipeline.core.tables import get_json, location, partition_sha256, write_partition
from tests.labeling.test_labels_rule import cands

CFG = load_config(env={}, overrides=["labeling.group_size=4", "labeling.min_followers=0",
                                     "validation.min_rows=8"])


def good_labels(run_id: str) -> tuple[pa.Table, dict]:
    rows = [dict(post_id=f"p{i:03d}", source=["mastodon", "bluesky"][i % 3 == 0], author_key=f"a{i % 7}",
                 followers=100 + 3 * i, likes=(i * 7) % 11)
            for i in range(42)]
    return label_candidates(cands(rows), CFG, run_id)


def store_run(storage, run_id: str, labels: pa.Table, summary: dict, *, raw: bool = False) -> None:
    if raw:  # bypass the schema check, as a buggy writer would
        from deltalake import write_deltalake

        uri, options = location(storage, "labels")
        write_deltalake(uri, labels.append_column("run", pa.array([run_id] * labels.num_rows)), mode="overwrite",
                        predicate=f"run = '{run_id}'", partition_by=["run"], storage_options=options)
    else:
        write_partition(storage, "labels", run_id, labels)
    # The record, as the labeler writes it: the hash of the bytes it stored, buggy or not.
    write_labels_run(storage, {**summary, "labels_sha256": partition_sha256(storage, "labels", run_id)})


def test_good_run_passes_writes_docs_and_publishes(local_storage):
    labels, summary = good_labels("good")
    store_run(local_storage, "good", labels, summary)
    report = validate_run(CFG, "good", local_storage)
    assert report["success"] and report["failed_expectations"] == 0
    assert local_storage.exists("validation/run=good/data_docs/index.html")
    assert local_storage.exists("validation/index.html")  # the index of every run (tests/labeling/test_data_docs.py)
    assert get_json(local_storage, "validation/run=good/result.json")["success"] is True

    pointer = publish(CFG, "good", local_storage)
    assert published(local_storage) == pointer
    assert pointer["run_id"] == "good" and pointer["rows"] == 40 and pointer["labeler"] == "groups"
    assert pointer["params_hash"] == CFG.section_hash("labeling")
    assert pointer["validation_key"] == "validation/run=good/result.json"


def _set(table: pa.Table, name: str, values: list, typ: pa.DataType | None = None) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i).with_nullable(True), pa.array(values, typ or table.schema.field(i).type))


def unbalanced(t: pa.Table) -> pa.Table:
    labels = t.column("label").to_pylist()
    first_negative = labels.index(0)
    labels[first_negative] = 1
    return _set(t, "label", labels)


def null_label(t: pa.Table) -> pa.Table:
    return _set(t, "label", [None] + t.column("label").to_pylist()[1:])


def duplicate_post(t: pa.Table) -> pa.Table:
    ids = t.column("post_id").to_pylist()
    return _set(t, "post_id", [ids[1]] + ids[1:])


def author_in_two_splits(t: pa.Table) -> pa.Table:
    authors, splits = t.column("author_key").to_pylist(), t.column("split").to_pylist()
    j = next(j for j in range(1, len(authors)) if authors[j] == authors[0])
    splits[j] = "test" if splits[0] != "test" else "train"
    return _set(t, "split", splits)


def sources_mixed(t: pa.Table) -> pa.Table:
    sources = t.column("source").to_pylist()
    sources[0] = "bluesky"  # one post of a mastodon group relabeled as another platform's
    return _set(t, "source", sources)


@pytest.mark.parametrize("corrupt, expectation", [
    (unbalanced, "chk_group_positives"),
    (sources_mixed, "chk_group_sources"),
    (null_label, "expect_column_values_to_not_be_null"),
    (duplicate_post, "expect_column_values_to_be_unique"),
    (author_in_two_splits, "chk_author_splits"),
])
def test_corrupted_runs_fail_and_are_not_published(local_storage, corrupt, expectation):
    labels, summary = good_labels("good")
    store_run(local_storage, "good", labels, summary)
    validate_run(CFG, "good", local_storage, inputs=False)
    publish(CFG, "good", local_storage)

    bad, bad_summary = good_labels("bad")
    store_run(local_storage, "bad", corrupt(bad), bad_summary, raw=True)
    with pytest.raises(ValidationFailed) as err:
        validate_run(CFG, "bad", local_storage, inputs=False)
    message = str(err.value)
    assert "validation of labels run bad failed" in message and expectation in message
    assert "unexpected row(s)" in message and "post_id" in message  # counts and offending rows
    assert "posts dropped before labeling, by reason: partial_group 2" in message  # from the run's summary
    assert get_json(local_storage, "validation/run=bad/result.json")["success"] is False
    assert local_storage.exists("validation/run=bad/data_docs/index.html")
    with pytest.raises(NotValidated):
        publish(CFG, "bad", local_storage)
    assert published(local_storage)["run_id"] == "good"  # the previous run stays published


def test_unvalidated_or_rebuilt_run_cannot_be_published(local_storage):
    labels, summary = good_labels("r")
    store_run(local_storage, "r", labels, summary)
    with pytest.raises(NotValidated, match="no validation result"):
        publish(CFG, "r", local_storage)
    assert published(local_storage) is None


def test_too_few_rows_fail(local_storage):
    labels, summary = good_labels("small")
    store_run(local_storage, "small", labels.slice(0, 0), summary)
    with pytest.raises(ValidationFailed, match="expect_table_row_count_to_be_between"):
        validate_run(CFG, "small", local_storage, inputs=False)

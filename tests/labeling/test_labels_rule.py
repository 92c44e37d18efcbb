"""The labeling rule (docs/architecture.md) on small hand-computed tables and on random ones
(hypothesis)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labeling.build_labels import label_candidates, label_run
from labeling.eligibility import CANDIDATES
from labeling.rank_groups import exposure, post_id_key
from labeling.splits import split_of
from pipeline.core.config import load_config


def config(**labeling):
    sets = [f"labeling.{k}={v}" for k, v in {"min_followers": 0, **labeling}.items()]
    return load_config(env={}, overrides=sets + ["faces.min_faces=1"])


def cands(rows: list[dict]) -> pa.Table:
    """Candidates from partial rows; defaults make a row eligible under ``config()``."""
    defaults = {"source": "mastodon", "author_key": None, "image_sha256": None, "likes": 0, "followers": 100, "n_tags": 1,
                "age_days": 40.0, "views": None, "n_faces": 1, "face_share": 0.2}
    full = []
    for r in rows:
        row = {**defaults, **r}
        row["author_key"] = row["author_key"] or f"author-{row['post_id']}"
        row["image_sha256"] = f"sha-{row['post_id']}" if "image_sha256" not in r else r["image_sha256"]
        full.append(row)
    return pa.Table.from_pylist(full, schema=CANDIDATES)


def by_post(labels: pa.Table) -> dict[str, dict]:
    return {r["post_id"]: r for r in labels.to_pylist()}


# --------------------------------------------------------------------------- hand-computed


def test_groups_ties_and_partial_group_by_hand():
    # G = 4. Exposure ties (a/b at 500, f/g at 300) break by post_id; likes ties by post_id.
    rows = [
        dict(post_id="b", followers=500, likes=10),
        dict(post_id="a", followers=500, likes=10),
        dict(post_id="c", followers=400, likes=3),
        dict(post_id="d", followers=450, likes=50),
        dict(post_id="e", followers=350, likes=1),
        dict(post_id="g", followers=300, likes=7),
        dict(post_id="f", followers=300, likes=7),
        dict(post_id="h", followers=320, likes=0),
        dict(post_id="i", followers=100, likes=99),  # partial group: the two lowest exposures
        dict(post_id="j", followers=100, likes=99),
    ]
    labels, summary = label_candidates(cands(rows), config(group_size=4), "r1")
    got = by_post(labels)
    # exposure order: a b d c | e h f g | i j (dropped)
    expected = {  # post: (group, rank)
        "a": (0, 2), "b": (0, 3), "d": (0, 4), "c": (0, 1),
        "e": (1, 2), "h": (1, 1), "f": (1, 3), "g": (1, 4),
    }
    assert {p: (r["group_id"], r["rank_in_group"]) for p, r in got.items()} == expected
    assert {p for p, r in got.items() if r["label"] == 1} == {"b", "d", "f", "g"}
    assert got["c"]["score"] == pytest.approx(0.125) and got["d"]["score"] == pytest.approx(0.875)
    assert summary["dropped"]["partial_group"] == 2 and summary["partial_group_rows"] == 2
    assert summary["rows_in"] == 10 and summary["rows_out"] == 8 and summary["groups"] == 2
    assert summary["label_balance"] == {"positive": 4, "negative": 4, "positive_share": 0.5}
    assert set(labels.column("run_id").to_pylist()) == {"r1"}
    assert set(labels.column("params_hash").to_pylist()) == {config(group_size=4).section_hash("labeling")}


def test_group_exposure_spans_are_reported_flagged_and_optionally_dropped():
    # G = 4, two sources: bluesky (name order first) has groups 0-1, mastodon group 2.
    rows = ([dict(post_id=f"b{i}", source="bluesky", followers=f, likes=i)
             for i, f in enumerate([5000, 4000, 3000, 100, 90, 80, 70, 60])]  # group 0 spans 50x, group 1 1.5x
            + [dict(post_id=f"m{i}", source="mastodon", followers=f, likes=i)
               for i, f in enumerate([200, 190, 180, 170])])  # group 2 spans 1.2x
    labels, summary = label_candidates(cands(rows), config(group_size=4), "r1")
    spans = summary["group_exposure"]
    assert spans["per_source"]["bluesky"]["top_group_span"] == pytest.approx(50.0)
    assert spans["per_source"]["bluesky"]["groups"] == [0, 1]
    assert spans["per_source"]["mastodon"] == {"groups": [2, 2], "top_group_span": pytest.approx(200 / 170, rel=1e-3),
                                               "median_span": pytest.approx(200 / 170, rel=1e-3),
                                               "widest_span": pytest.approx(200 / 170, rel=1e-3), "widest_group": 2}
    assert "bluesky: group 0 spans 50x" in spans["warning"] and "mastodon" not in spans["warning"]
    assert spans["flagged"] == [] and labels.num_rows == 12  # off by default: only the warning
    # Flagged, then dropped.
    _, flagged = label_candidates(cands(rows), config(group_size=4, max_group_exposure_ratio=10), "r1")
    assert flagged["group_exposure"]["flagged"] == [0] and flagged["rows_out"] == 12
    labels, dropped = label_candidates(cands(rows), config(group_size=4, max_group_exposure_ratio=10,
                                                           drop_wide_groups="true"), "r1")
    assert set(labels.column("group_id").to_pylist()) == {1, 2} and labels.num_rows == 8
    assert dropped["dropped"]["wide_group"] == 4 and dropped["rows_out"] == 8
    assert dropped["splits"] and sum(dropped["splits"].values()) == 8
    assert dropped["sources"]["bluesky"]["rows_out"] == 4


def test_exposure_tag_bonus_and_views():
    exp = exposure(np.array([100, 100, 100, 100]), np.array([1, 3, 0, 2]), 0.05,
                   np.array([np.nan, np.nan, np.nan, 7.0]))
    assert exp.tolist() == pytest.approx([100.0, 110.0, 100.0, 7.0])


def test_thresholds_are_inclusive_and_every_drop_is_counted():
    cfg = config(min_followers=50, max_followers=1000, max_tags=3, min_age_days=30, group_size=2)
    rows = [
        dict(post_id="f_min", followers=50), dict(post_id="f_max", followers=1000),
        dict(post_id="f_low", followers=49), dict(post_id="f_high", followers=1001),
        dict(post_id="t_max", n_tags=3), dict(post_id="t_over", n_tags=4),
        dict(post_id="a_min", age_days=30.0), dict(post_id="a_young", age_days=29.999),
        dict(post_id="a_none", age_days=None, likes=None, followers=None),
        # several failures: counted once, under the first reason
        dict(post_id="multi", age_days=1.0, followers=5, n_tags=9),
    ]
    labels, summary = label_candidates(cands(rows), cfg, "r")
    assert set(labels.column("post_id").to_pylist()) == {"f_min", "f_max", "t_max", "a_min"}
    d = summary["dropped"]
    assert (d["age_below_min"], d["followers_out_of_range"], d["too_many_tags"]) == (3, 2, 1)
    assert summary["rows_in"] == summary["rows_out"] + summary["rows_dropped"]


def test_image_and_face_filters():
    rows = [
        dict(post_id="ok1"), dict(post_id="ok2", n_faces=3),
        dict(post_id="noimg", image_sha256=None),
        dict(post_id="undetected", n_faces=None),
        dict(post_id="zero", n_faces=0),
        dict(post_id="small", face_share=0.01),
    ]
    labels, summary = label_candidates(cands(rows), config(group_size=2), "r")
    assert set(labels.column("post_id").to_pylist()) == {"ok1", "ok2"}
    d = summary["dropped"]
    assert (d["no_image"], d["no_face_detection"], d["face_filter"]) == (1, 1, 1)  # share filter off by default

    cfg = load_config(env={}, overrides=["labeling.min_followers=0", "labeling.group_size=2",
                                         "faces.max_faces=1", "faces.min_face_share=0.05"])
    labels, summary = label_candidates(cands(rows), cfg, "r")
    assert set(labels.column("post_id").to_pylist()) == set()  # ok1 alone cannot fill a group of 2
    assert summary["dropped"]["face_filter"] == 3 and summary["dropped"]["partial_group"] == 1


def test_duplicate_images_keep_the_smallest_post_id():
    rows = [
        dict(post_id="p3", image_sha256="same"), dict(post_id="p1", image_sha256="same"),
        dict(post_id="p2", image_sha256="same", followers=10**9),  # ineligible: not the survivor
        dict(post_id="p4", image_sha256=""), dict(post_id="p5", image_sha256=""),  # untracked: kept
        dict(post_id="p6", image_sha256="other"),
    ]
    labels, summary = label_candidates(cands(rows), config(group_size=2, max_followers=1000), "r")
    assert set(labels.column("post_id").to_pylist()) == {"p1", "p4", "p5", "p6"}
    assert summary["dropped"]["duplicate_image"] == 1 and summary["dropped"]["followers_out_of_range"] == 1


def test_post_id_key_keeps_string_order():
    for ids in (["0002", "0010", "0001", "9999"],  # equal-length digits: the integer fast path
                ["9", "10", "100", "11"],  # varying length: string order, not numeric
                ["b", "a", "ä", "A", "", "b"]):  # anything else, duplicates included
        key = post_id_key(pa.array(ids))
        for i in range(len(ids)):
            for j in range(len(ids)):
                assert (key[i] < key[j]) == (ids[i] < ids[j]) and (key[i] == key[j]) == (ids[i] == ids[j])


def test_comparison_labelers_fill_one_even_group():
    rows = [dict(post_id=f"p{i}", followers=100 * (i + 1), likes=i % 3) for i in range(7)]
    for labeler in ("median_likes", "ratio", "residual"):
        labels, summary = label_candidates(cands(rows), config(group_size=2, labeler=labeler), "r")
        assert labels.num_rows == 6 and "p0" not in labels.column("post_id").to_pylist()  # lowest exposure
        assert set(labels.column("group_id").to_pylist()) == {0}
        assert sorted(labels.column("rank_in_group").to_pylist()) == list(range(1, 7))
        assert sum(labels.column("label").to_pylist()) == 3 and summary["group_size"] == 6
    labels, _ = label_candidates(cands(rows), config(labeler="median_likes"), "r")
    got = by_post(labels)
    # likes: p1=1 p2=2 p3=0 p4=1 p5=2 p6=0 -> ascending, ties by post_id
    assert [p for p, _ in sorted(got.items(), key=lambda kv: kv[1]["rank_in_group"])] == \
        ["p3", "p6", "p1", "p4", "p2", "p5"]


def test_splits_are_author_disjoint_and_reproducible():
    rows = [dict(post_id=f"p{i:03d}", author_key=f"a{i % 40}") for i in range(400)]
    cfg = config(group_size=2, val_fraction=0.2, test_fraction=0.2)
    labels, summary = label_candidates(cands(rows), cfg, "r")
    pairs = set(zip(labels.column("author_key").to_pylist(), labels.column("split").to_pylist(), strict=True))
    assert len({a for a, _ in pairs}) == len(pairs) == 40
    assert all(split_of(a, cfg.labeling) == s for a, s in pairs)
    assert all(summary["splits"][s] > 0 for s in ("train", "val", "test"))


# --------------------------------------------------------------------------- properties


def naive_reference(rows: list[dict], group_size: int, tag_bonus: float) -> dict[str, tuple[int, int]]:
    """The rule written as plainly as possible, for eligible rows: post -> (group, rank).
    Each source is grouped on its own; group ids run on across sources in name order."""
    def exp(r):
        return r["views"] if r["views"] is not None else r["followers"] * (1 + tag_bonus * max(r["n_tags"] - 1, 0))
    out, next_group = {}, 0
    for source in sorted({r["source"] for r in rows}):
        ordered = sorted((r for r in rows if r["source"] == source), key=lambda r: r["post_id"])
        ordered = sorted(ordered, key=lambda r: -exp(r))  # stable: ties keep post_id order
        for g in range(len(ordered) // group_size):
            group = sorted(ordered[g * group_size:(g + 1) * group_size], key=lambda r: (r["likes"], r["post_id"]))
            for rank, r in enumerate(group, start=1):
                out[r["post_id"]] = (next_group, rank)
            next_group += 1
    return out


numeric_ids = st.integers(0, 10**6 - 1).map(lambda i: f"{i:06d}")
text_ids = st.text(alphabet="ab9Zé", min_size=0, max_size=4)
row = st.fixed_dictionaries({
    "source": st.sampled_from(["mastodon", "mastodon", "bluesky"]),
    "likes": st.integers(0, 5), "followers": st.sampled_from([0, 1, 50, 51, 99, 100, 1000]),
    "n_tags": st.integers(0, 4), "views": st.one_of(st.none(), st.sampled_from([0, 60, 100])),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=st.one_of(st.lists(numeric_ids, unique=True, max_size=40), st.lists(text_ids, unique=True, max_size=40)),
       data=st.data(), half=st.integers(1, 3), tag_bonus=st.sampled_from([0.0, 0.05, 0.5]))
def test_rule_matches_naive_reference_and_invariants(ids, data, half, tag_bonus):
    group_size = 2 * half
    rows = [{"post_id": pid, **data.draw(row)} for pid in ids]
    cfg = config(group_size=group_size, tag_bonus=tag_bonus)
    labels, summary = label_candidates(cands(rows), cfg, "r")
    got = {r["post_id"]: (r["group_id"], r["rank_in_group"]) for r in labels.to_pylist()}
    assert got == naive_reference(rows, group_size, tag_bonus)

    per_source = {s: sum(r["source"] == s for r in rows) for s in {r["source"] for r in rows}}
    n_groups = sum(n // group_size for n in per_source.values())
    assert labels.num_rows == n_groups * group_size
    assert summary["partial_group_rows"] == sum(n % group_size for n in per_source.values())
    assert {s: v["groups"] for s, v in summary["sources"].items()} == {
        s: n // group_size for s, n in per_source.items() if n >= group_size}
    for g in range(n_groups):
        members = [r for r in labels.to_pylist() if r["group_id"] == g]
        assert len({r["source"] for r in members}) == 1  # groups never mix sources
        assert sorted(r["rank_in_group"] for r in members) == list(range(1, group_size + 1))
        assert sum(r["label"] for r in members) == half
        assert all(0 < r["score"] < 1 and r["label"] == (r["rank_in_group"] > half) for r in members)
    assert summary["rows_in"] == summary["rows_out"] + summary["rows_dropped"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=st.lists(numeric_ids, unique=True, min_size=1, max_size=40), data=st.data(),
       huge=st.sampled_from([0, 2**40, 2**62]))
def test_rule_in_post_id_order_and_with_huge_likes_matches_the_reference(ids, data, huge):
    """Rows already in post_id order skip the reordering; likes too large to pack beside a row
    index take the lexsort. Both give the reference's groups and ranks."""
    rows = [{"post_id": pid, **data.draw(row)} for pid in sorted(ids)]
    for r in rows:
        r["likes"] += huge * data.draw(st.integers(0, 1))
    labels, _ = label_candidates(cands(rows), config(group_size=4, tag_bonus=0.05), "r")
    got = {r["post_id"]: (r["group_id"], r["rank_in_group"]) for r in labels.to_pylist()}
    assert got == naive_reference(rows, 4, 0.05)


@settings(max_examples=30, deadline=None)
@given(likes=st.lists(st.integers(0, 3), min_size=0, max_size=30), labeler=st.sampled_from(["median_likes", "ratio", "residual"]))
def test_comparison_labelers_are_balanced(likes, labeler):
    rows = [dict(post_id=f"p{i:02d}", likes=v, followers=10 + i % 4) for i, v in enumerate(likes)]
    labels, summary = label_candidates(cands(rows), config(labeler=labeler), "r")
    n = len(likes) // 2 * 2
    assert labels.num_rows == n and sum(labels.column("label").to_pylist()) == n // 2
    assert sorted(labels.column("rank_in_group").to_pylist()) == list(range(1, n + 1))


@settings(max_examples=40, deadline=None)
@given(keys=st.lists(st.text(max_size=20), min_size=1, max_size=30), salt=st.text(max_size=8))
def test_vectorized_author_hash_matches_the_reference(keys, salt):
    from labeling.splits import author_hash, author_hash_one

    got = author_hash(salt, pa.array(keys)).tolist()
    assert got == [author_hash_one(salt, k) for k in keys]
    # A key's hash does not depend on the other keys in the batch.
    assert author_hash(salt, pa.array(keys[:1])).tolist() == got[:1]


@pytest.mark.parametrize("width", [8, 16, 13])
def test_author_hash_of_fixed_width_keys_matches_the_reference(width):
    """Hex pseudonyms (one length, often a multiple of 8) take the no-copy path; slices too."""
    from labeling.splits import author_hash, author_hash_one

    keys = [f"{i * 2654435761:0{width}x}"[-width:] for i in range(50)]
    arr = pa.array(keys)
    assert author_hash("salt", arr).tolist() == [author_hash_one("salt", k) for k in keys]
    sliced = arr.slice(7, 20)  # a non-zero offset into Arrow's buffers
    assert author_hash("salt", sliced).tolist() == [author_hash_one("salt", k) for k in keys[7:27]]


def test_labels_built_in_slices_equal_the_whole_table():
    rng = np.random.default_rng(3)
    rows = [{"post_id": f"{i:05d}", "source": ["mastodon", "bluesky"][i % 3 == 0], "likes": int(rng.integers(0, 9)),
             "followers": int(rng.integers(0, 500)), "age_days": [40.0, 3.0][i % 11 == 0]} for i in range(300)]
    run = label_run(cands(rows), config(group_size=6), "r")
    pieces = list(run.slices(rows_per_slice=7))
    assert len(pieces) > 10 and sum(p.num_rows for p in pieces) == run.summary["rows_out"] > 0
    assert pa.concat_tables(pieces).equals(run.table())
    ids = pa.concat_tables(pieces).column("post_id").to_pylist()
    assert ids == sorted(ids)  # the candidates' order, slice after slice


def test_duplicate_images_of_sha256_digests_across_chunks_match_a_plain_reference():
    import hashlib

    from labeling.eligibility import _digest_keys, duplicate_images

    rng = np.random.default_rng(5)
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(40)]
    # Repeats, a shared 16-character prefix (same key, different images), nulls.
    digests.append(digests[0][:16] + digests[1][16:])
    shas = [digests[int(rng.integers(0, len(digests)))] if rng.random() > 0.1 else None for _ in range(300)]
    ids = [f"{int(rng.integers(0, 10**6)):06d}-{i}" for i in range(300)]
    rows = [{"post_id": pid, "image_sha256": sha} for pid, sha in zip(ids, shas, strict=True)]
    table = cands(rows)
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=70))  # the buffers of several chunks
    alive = rng.random(300) > 0.2
    best: dict[str, str] = {}
    for pid, sha, ok in zip(ids, shas, alive, strict=True):
        if ok and sha:
            best[sha] = min(best.get(sha, pid), pid)
    want = [bool(ok and sha and best[sha] != pid) for pid, sha, ok in zip(ids, shas, alive, strict=True)]
    assert sum(want) > 10
    assert _digest_keys(chunked.column("image_sha256")) is not None  # the in-place path is the one tested
    assert duplicate_images(chunked, alive).tolist() == want
    assert duplicate_images(table, alive).tolist() == want


def test_duplicate_images_of_chunks_full_of_digests_match_a_plain_reference():
    """Chunks where every value is a digest take the strided no-copy path, sliced ones too."""
    import hashlib

    from labeling.eligibility import duplicate_images

    rng = np.random.default_rng(8)
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(60)]
    shas = [digests[int(rng.integers(0, len(digests)))] for _ in range(400)]
    ids = [f"{int(rng.integers(0, 10**6)):06d}-{i}" for i in range(400)]
    table = cands([{"post_id": pid, "image_sha256": sha} for pid, sha in zip(ids, shas, strict=True)])
    chunked = pa.Table.from_batches(table.slice(3).to_batches(max_chunksize=90))  # non-zero offsets
    alive = rng.random(397) > 0.2
    best: dict[str, str] = {}
    for pid, sha, ok in zip(ids[3:], shas[3:], alive, strict=True):
        if ok:
            best[sha] = min(best.get(sha, pid), pid)
    want = [bool(ok and best[sha] != pid) for pid, sha, ok in zip(ids[3:], shas[3:], alive, strict=True)]
    assert sum(want) > 100
    assert duplicate_images(chunked, alive).tolist() == want


def test_post_id_order_is_checked_within_and_across_chunks():
    from labeling.rank_groups import post_id_key, post_id_key_unless_ordered

    def chunked(*chunks):
        return pa.chunked_array([pa.array(c, pa.string()) for c in chunks])

    def in_order(ids):
        key = post_id_key_unless_ordered(ids)
        assert key is None or key.tolist() == post_id_key(ids).tolist()  # out of order: the key itself
        return key is None

    assert in_order(chunked(["001", "002"], [], ["010", "011"]))
    assert not in_order(chunked(["001", "005"], ["004", "011"]))  # the step back is between chunks
    assert not in_order(chunked(["001", "001"]))  # equal ids: not strictly increasing
    assert in_order(chunked(["9", "a"], ["ab", "b"]))  # not decimal: compared as strings
    assert in_order(chunked(["10", "9"]))  # two widths: string order decides, "10" < "9"
    assert in_order(chunked(["9"], ["10"])) is False  # across chunks too

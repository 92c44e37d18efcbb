"""``likerank forget``: an author or a post leaves every table, the image store, labels,
predictions and reports, and a tombstone keeps them out of later scrapes and labels runs.

The world is scraped for real from a Mastodon-compatible server on loopback; a labels run and
a model's predictions over it are written as the labeler and the trainer write them.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from likerank.cli.main import main
from pipeline.core import keys
from pipeline.core.data_docs import refresh_index
from pipeline.core.forget import load_tombstones
from pipeline.core.pseudonym import author_keyer, tombstone_hash, tombstone_salt
from pipeline.core.schemas import LABELS, conform
from pipeline.core.storage import LocalStorage
from pipeline.core.tables import list_partitions, put_json, read_table, write_partition
from pipeline.scrape.scrape import scrape, state_key
from tests.fixtures.scrape import STAND_IN_AUTHOR_KEY, jpeg_bytes

DAY = "2026-11-02"
ALICE, BOB = "https://x.example/users/alice", "https://x.example/users/bob"
# One key for the whole module: the stand-in instance's scrapes need one, and a forget uses it too.
KEY = author_keyer("LIKERANK_AUTHOR_KEY", env={"LIKERANK_AUTHOR_KEY": STAND_IN_AUTHOR_KEY})
SALT = tombstone_salt("LIKERANK_AUTHOR_KEY", env={"LIKERANK_AUTHOR_KEY": STAND_IN_AUTHOR_KEY})


@pytest.fixture(autouse=True)
def author_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIKERANK_AUTHOR_KEY", STAND_IN_AUTHOR_KEY)


def status(i: int, account: str, media: str) -> dict:
    return {"id": str(100 + i), "created_at": "2026-10-01T00:00:00Z", "reblog": None, "favourites_count": i,
            "reblogs_count": 0, "replies_count": 0, "tags": [{"name": "selfie"}],
            "account": {"uri": account, "followers_count": 10 + i},
            "media_attachments": [{"type": "image", "url": media}]}


@pytest.fixture
def world(fake_mastodon, scrape_cfg):
    """alice: posts 0-2; bob: posts 3-5; post 5 (bob) re-posts alice's first photo."""
    u = fake_mastodon.url
    for i in range(5):
        fake_mastodon.media[f"{i}.jpg"] = jpeg_bytes(seed=i)
    fake_mastodon.statuses = [status(i, ALICE if i < 3 else BOB, f"{u}/media/{i if i < 5 else 0}.jpg")
                              for i in range(6)][::-1]
    scrape_cfg.scrape.backfill_days = 60
    scrape(scrape_cfg, u, "selfie", DAY)
    storage = LocalStorage(scrape_cfg.storage.root)
    posts = read_table(storage, "posts").to_pylist()
    downloads = {d["post_id"]: d["sha256"] for d in read_table(storage, "downloads").to_pylist()}
    labels = [{"post_id": p["post_id"], "source": p["source"], "image_sha256": downloads[p["post_id"]], "author_key": p["author_key"],
               "likes": p["likes"], "followers": p["author_followers"], "n_tags": 1, "age_days": 40.0,
               "exposure": 10.0, "group_id": 0, "rank_in_group": r + 1, "label": int(r >= 3), "score": 0.5,
               "split": "test", "labeler": "groups", "params_hash": "p", "run_id": "L1"}
              for r, p in enumerate(sorted(posts, key=lambda p: p["post_id"]))]
    write_partition(storage, "labels", "L1", pa.Table.from_pylist(labels, schema=LABELS))
    put_json(storage, keys.validation_result("L1"), {"run_id": "L1", "success": True})
    refresh_index(storage)  # the Data Docs index of validation runs
    put_json(storage, keys.PUBLISHED_LABELS, {"run_id": "L1"})
    storage.put_text("reports/L1/index.html", "<html>thumbnails</html>")
    preds = conform("predictions", pa.table({
        "post_id": [p["post_id"] for p in posts], "split": ["test"] * len(posts), "prob": [0.5] * len(posts),
        "pred_score": [0.5] * len(posts), "label": [1] * len(posts), "weight": [1.0] * len(posts)}))
    buf = io.BytesIO()
    pq.write_table(preds, buf)
    storage.put_bytes(keys.model_predictions("M1"), buf.getvalue())
    return storage, {d["post_id"]: d["sha256"] for d in read_table(storage, "downloads").to_pylist()}


def every_row(storage: LocalStorage) -> dict[str, list[dict]]:
    out = {t: read_table(storage, t).to_pylist() for t in ("posts", "engagement", "downloads", "images", "labels")}
    out["predictions"] = pq.read_table(io.BytesIO(storage.get_bytes(keys.model_predictions("M1")))).to_pylist()
    return out


def test_forget_an_account_removes_it_everywhere_but_keeps_shared_images(world, scrape_cfg, capsys):
    storage, sha = world
    alice = KEY(ALICE)
    assert "L1" in storage.get_text(keys.validation_index())
    assert main(["--set", f"storage.root={scrape_cfg.storage.root}", "forget", "--account", ALICE]) == 0
    out = capsys.readouterr().out
    assert "forgot: posts 3, engagement 3, downloads 3" in out and "unpublished labels run L1" in out
    rows = every_row(storage)
    assert {r["post_id"] for r in rows["posts"]} == {"103", "104", "105"}
    for table, kept in rows.items():
        assert alice not in repr(kept), table
        assert not {"100", "101", "102"} & {r.get("post_id") for r in kept}, table
    # Alice's photos are gone, except the one Bob posted too (post 105 re-posts image 0).
    assert not storage.exists(keys.image_bytes(sha["101"])) and not storage.exists(keys.image_bytes(sha["102"]))
    assert storage.exists(keys.image_bytes(sha["100"])) and sha["100"] == sha["105"]
    assert {r["sha256"] for r in rows["images"]} == {sha["103"], sha["104"], sha["100"]}
    # The changed labels run is unpublished and lost what quoted its rows.
    assert not storage.exists(keys.PUBLISHED_LABELS)
    assert not storage.exists(keys.validation_result("L1")) and not storage.list("reports/L1/")
    assert "L1" not in storage.get_text(keys.validation_index())  # the index no longer lists the run
    assert load_tombstones(storage, SALT).author_hashes == {tombstone_hash(SALT, alice)}  # hashed, not the key


def test_forget_one_post(world, fake_mastodon, scrape_cfg):
    storage, sha = world
    assert main(["--set", f"storage.root={scrape_cfg.storage.root}", "forget", "--post", fake_mastodon.url, "104"]) == 0
    rows = every_row(storage)
    for table, kept in rows.items():
        assert "104" not in {r.get("post_id") for r in kept}, table
    assert not storage.exists(keys.image_bytes(sha["104"]))
    assert len(rows["posts"]) == 5


def test_a_forgotten_author_is_not_collected_again(world, fake_mastodon, scrape_cfg):
    storage, _ = world
    main(["--set", f"storage.root={scrape_cfg.storage.root}", "forget", "--author-key", KEY(ALICE)])
    storage.delete(state_key(fake_mastodon.url, "selfie"))  # crawl everything again
    summary = scrape(scrape_cfg, fake_mastodon.url, "selfie", "2026-11-03", max_posts=0)
    assert KEY(ALICE) not in repr(read_table(storage, "posts").to_pylist())
    assert summary["skipped"]["forgotten"] == 3 and summary["kept"] == 3


def test_a_forgotten_author_is_excluded_from_a_new_labels_run(world, scrape_cfg):
    """Rows that come back by another path (e.g. a restored backup) are dropped and counted."""
    from labeling.eligibility import read_candidates

    storage, _ = world
    posts_before = read_table(storage, "posts")
    main(["--set", f"storage.root={scrape_cfg.storage.root}", "forget", "--author-key", KEY(BOB)])
    write_partition(storage, "posts", "2026-11-09", posts_before.drop_columns(["dt"]))  # bob comes back
    cands, counts = read_candidates(storage, scrape_cfg)
    assert KEY(BOB) not in cands["author_key"].to_pylist() and counts["forgotten"] == 3


def test_forget_is_idempotent_and_names_what_it_needs(world, scrape_cfg, capsys):
    args = ["--set", f"storage.root={scrape_cfg.storage.root}", "forget"]
    assert main([*args, "--author-key", KEY(ALICE)]) == 0
    capsys.readouterr()
    assert main([*args, "--author-key", KEY(ALICE)]) == 1  # a rerun removes nothing, and says so
    out = capsys.readouterr()
    assert "forgot: posts 0, engagement 0" in out.out
    assert "nothing stored matched the author key (an earlier forget already removed them)" in out.err
    with pytest.raises(SystemExit):
        main([*args])  # one of --account, --author-key, --post is required
    assert list_partitions(world[0], "posts")


def test_refresh_forgets_deleted_posts_and_authors_who_opted_out(world, fake_mastodon, scrape_cfg):
    from pipeline.scrape.refresh import refresh_engagement

    storage, sha = world
    # Every snapshot so far was young (likes still climbing): all six posts are due a re-read.
    for part in list_partitions(storage, "engagement"):
        t = read_table(storage, "engagement", [part]).drop_columns(["dt"])
        write_partition(storage, "engagement", part, t.set_column(
            t.schema.get_field_index("age_days"), "age_days", pa.array([1.0] * t.num_rows)))
    fake_mastodon.deleted.add("104")  # bob deleted one post
    for s in fake_mastodon.statuses:  # alice opted out of search and indexing since
        if s["account"]["uri"] == ALICE:
            s["account"] = {**s["account"], "noindex": True}
    summary = refresh_engagement(scrape_cfg, "2026-12-30")
    assert (summary["deleted"], summary["opted_out"], summary["refreshed"]) == (1, 3, 2)
    posts = read_table(storage, "posts").to_pylist()
    assert {p["post_id"] for p in posts} == {"103", "105"}
    assert load_tombstones(storage, SALT).covers_author(KEY(ALICE))
    assert load_tombstones(storage, SALT).covers_post(fake_mastodon.url, "104")
    assert not storage.exists(keys.image_bytes(sha["104"])) and storage.exists(keys.image_bytes(sha["105"]))


# --------------------------------------------------------------------------- concurrent writers

#: Post ids long enough that their digits turn up nowhere by chance, so a byte search for them means something.
LONG_ID = 1_099_511_627_776_000


def no_trace(storage: LocalStorage, *needles: str) -> list[str]:
    """Every file under the storage root (table logs included) that holds one of ``needles``."""
    found = []
    for path in storage.path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(storage.path)}: {n}" for n in needles if n.encode() in data]
    return found


def test_a_scrape_that_commits_during_a_forget_does_not_bring_the_author_back(fake_mastodon, scrape_cfg, monkeypatch):
    """The scrape has read its rows and is about to commit the posts when ``likerank forget``
    runs to its end; the commit lands afterwards. Alice must not come back, and no byte of
    her key or her post ids may stay anywhere under the storage root."""
    import threading

    import pipeline.scrape.scrape as mod

    u = fake_mastodon.url
    ids = [str(LONG_ID + i) for i in range(4)]
    for i in range(4):
        fake_mastodon.media[f"{i}.jpg"] = jpeg_bytes(seed=i)
    fake_mastodon.statuses = [{**status(i, ALICE if i in (1, 2) else BOB, f"{u}/media/{i}.jpg"), "id": ids[i]}
                              for i in range(4)][::-1]  # alice's posts in the middle of the timeline
    scrape_cfg.scrape.backfill_days = 60
    real, paused, resume = mod.merge_partition, threading.Event(), threading.Event()

    def commit_posts_late(storage, table, value, rows):
        if table == "posts" and not paused.is_set():
            paused.set()
            assert resume.wait(120)
        return real(storage, table, value, rows)

    monkeypatch.setattr(mod, "merge_partition", commit_posts_late)
    outcome: dict = {}
    crawl = threading.Thread(target=lambda: outcome.update(scrape(scrape_cfg, u, "selfie", DAY)))
    crawl.start()
    try:
        assert paused.wait(120), "the scrape never reached its posts commit"
        # Nothing of hers is committed yet: forget says so (exit 1) and keeps the tombstone.
        assert main(["--set", f"storage.root={scrape_cfg.storage.root}", "forget", "--account", ALICE]) == 1
    finally:
        resume.set()
        crawl.join(120)
    assert outcome["kept"] == 4  # all four were read before the forget
    storage = LocalStorage(scrape_cfg.storage.root)
    assert {p["post_id"] for p in read_table(storage, "posts").to_pylist()} == {ids[0], ids[3]}
    for table in ("engagement", "downloads", "post_refs"):
        assert not {ids[1], ids[2]} & {r["post_id"] for r in read_table(storage, table).to_pylist()}, table
    assert no_trace(storage, KEY(ALICE), ids[1], ids[2]) == []
    assert no_trace(storage, ids[0], ids[3])  # the search finds what is there: bob's posts stay


# --------------------------------------------------------------------------- a person, however named


@pytest.fixture(scope="module")
def sim_world_both():
    from simulator import build_world

    return build_world(seed=11, posts=200, bluesky_share=0.5)


@pytest.fixture
def scraped_sim(sim_world_both, sim_server_factory, scrape_cfg):
    """Both platforms of the simulator scraped for real; the CLI's settings point at it."""
    sim = sim_server_factory(sim_world_both)
    scrape_cfg.scrape.backfill_days = 100_000
    for platform in ("mastodon", "bluesky"):
        scrape(scrape_cfg, sim.url, "selfie", DAY, platform=platform)
    args = ["--set", f"storage.root={scrape_cfg.storage.root}", "--set", f"source.instance_url={sim.url}",
            "--set", f"source.bluesky_url={sim.url}", "--set", "scrape.allow_hosts=['127.0.0.1']"]
    return sim, LocalStorage(scrape_cfg.storage.root), args


def busiest(sim, storage: LocalStorage, platform: str):
    """The account of ``platform`` with the most stored posts, and its author key."""
    from simulator.bluesky import did_for

    stored = read_table(storage, "posts").to_pylist()
    best = None
    for a in sim.world.accounts:
        if bool(sim.world.on_bluesky[a.index]) != (platform == "bluesky"):
            continue
        key = KEY(did_for(a) if platform == "bluesky" else f"{sim.url}/users/{a.username}")
        n = sum(p["author_key"] == key for p in stored)
        if best is None or n > best[2]:
            best = (a, key, n)
    assert best[2] > 0
    return best


@pytest.mark.parametrize("platform, form", [
    ("mastodon", "{url}/@{NAME}"), ("mastodon", "@{name}@{host}"), ("mastodon", "{url}/users/{name}"),
    ("bluesky", "{HANDLE}"), ("bluesky", "{did}"),
])
def test_forget_finds_the_person_however_they_are_named(scraped_sim, capsys, platform, form):
    from simulator.bluesky import did_for, handle_for

    sim, storage, args = scraped_sim
    account, key, n = busiest(sim, storage, platform)
    text = form.format(url=sim.url, host=sim.url.split("://", 1)[1], name=account.username,
                       NAME=account.username.upper(), HANDLE=handle_for(account).upper(), did=did_for(account))
    before = len(read_table(storage, "posts"))
    assert main([*args, "forget", "--account", text]) == 0
    out = capsys.readouterr().out
    assert f"forgot: posts {n}," in out
    assert key not in repr(read_table(storage, "posts").to_pylist())
    assert len(read_table(storage, "posts")) == before - n


def test_dry_run_counts_what_forget_removes_and_changes_nothing(scraped_sim, capsys):
    sim, storage, args = scraped_sim
    account, key, n = busiest(sim, storage, "mastodon")
    snapshot = {p: p.read_bytes() for p in storage.path.rglob("*") if p.is_file()}
    assert main([*args, "forget", "--account", f"{account.username}@{sim.url.split('://', 1)[1]}", "--dry-run"]) == 0
    planned = capsys.readouterr().out
    assert {p: p.read_bytes() for p in storage.path.rglob("*") if p.is_file()} == snapshot  # not a byte changed
    assert main([*args, "forget", "--account", f"{account.username}@{sim.url.split('://', 1)[1]}"]) == 0
    done = capsys.readouterr().out
    counts = planned.split("would forget: ", 1)[1].splitlines()[0]
    assert f"posts {n}," in counts and done.split("forgot: ", 1)[1].splitlines()[0] == counts


def test_nobody_found_or_nothing_stored_exits_non_zero_saying_which(scraped_sim, capsys):
    sim, storage, args = scraped_sim
    host = sim.url.split("://", 1)[1]
    tomb_before = read_table(storage, "tombstones").num_rows
    assert main([*args, "forget", "--account", f"nobody_at_all@{host}"]) == 2
    assert "no such account found" in capsys.readouterr().err
    assert read_table(storage, "tombstones").num_rows == tomb_before  # nobody named: nothing written
    # An account that exists but opted out was never collected: nothing matches, the tombstone stays.
    shy = next(a for a in sim.world.accounts if not sim.world.on_bluesky[a.index] and not a.discoverable)
    assert main([*args, "forget", "--account", f"{sim.url}/@{shy.username}"]) == 1
    assert "nothing stored matched the account; the tombstone is kept" in capsys.readouterr().err
    assert load_tombstones(storage, SALT).covers_author(KEY(f"{sim.url}/users/{shy.username}"))

"""The scrape stage on Bluesky against the simulator's XRPC: exactly the eligible image posts,
likes and followers as the world has them, no handle or DID in any table, the at:// URIs in
the crawl state only; the refresh re-reads through them and `forget` removes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.forget import forget, salt_for
from pipeline.core.post_refs import load_refs
from pipeline.core.pseudonym import SIMULATOR_URLS_ENV
from pipeline.core.storage import LocalStorage
from pipeline.core.tables import list_partitions, read_table
from pipeline.scrape.refresh import refresh_engagement
from pipeline.scrape.scrape import scrape, state_key
from simulator.bluesky import BlueskyIndex, did_for, handle_for

REPO = Path(__file__).resolve().parents[2]
TAG = "selfie"
TABLES = ("posts", "engagement", "downloads", "images")


@pytest.fixture
def scfg(cfg):
    s = cfg.scrape
    s.allow_hosts = ["127.0.0.1"]
    s.backfill_days = 100_000  # the whole world
    s.retries, s.backoff_s = 2, 0.01
    s.threads, s.per_host_concurrency, s.per_host_rps = 4, 4, 1000.0
    return cfg


@pytest.fixture(scope="module")
def world():
    from simulator import build_world
    return build_world(seed=11, posts=200, bluesky_share=0.5)


@pytest.fixture
def sim(world, sim_server_factory):
    return sim_server_factory(world, max_search_results=40)  # the search cursor stops: the walk goes on by `until`


def eligible(sim, platform: str) -> set[int]:
    """World post indices a full crawl of ``platform`` must keep."""
    w = sim.world
    now_ms = int(sim.now.timestamp() * 1000)
    return {p.index for p in w.posts
            if p.created_ms <= now_ms and p.kind == "photo" and TAG in p.tags and w.platform(p.index) == platform
            and w.accounts[p.author].discoverable and w.accounts[p.author].indexable}


def rows(cfg, table: str) -> list[dict]:
    storage = LocalStorage(cfg.storage.root)
    return read_table(storage, table).to_pylist() if list_partitions(storage, table) else []


def world_index_of(cfg, sim, post_ids: list[str]) -> dict[str, int]:
    """post_id -> world post index, through the at:// URIs the crawl state kept."""
    host = sim.url.split("://", 1)[1]
    refs = load_refs(LocalStorage(cfg.storage.root), "bluesky", host, post_ids)
    index = BlueskyIndex(sim.world)
    return {pid: index.post_by_uri(uri) for pid, uri in refs.items()}


def test_bluesky_crawl_keeps_exactly_the_eligible_image_posts(scfg, sim):
    s = scrape(scfg, sim.url, TAG, "2025-06-02", platform="bluesky")
    posts = rows(scfg, "posts")
    assert {r["source"] for r in posts} == {"bluesky"} and s["source"] == "bluesky"
    by_id = world_index_of(scfg, sim, [r["post_id"] for r in posts])
    assert len(by_id) == len(posts) == len({r["post_id"] for r in posts})
    assert set(by_id.values()) == eligible(sim, "bluesky"), "kept posts differ from the world's eligible ones"
    assert s["kept"] == len(posts) and set(s["skipped"]) <= {"no_image", "video", "opted_out"}
    assert s["skipped"].get("opted_out", 0) > 0 and s["skipped"].get("video", 0) > 0
    w = sim.world
    for r in posts:
        p = w.posts[by_id[r["post_id"]]]
        likes, reposts, replies = w.counts(p.index, int(sim.now.timestamp() * 1000))
        assert (r["likes"], r["reposts"], r["replies"]) == (likes, reposts, replies)
        assert r["author_followers"] == w.accounts[p.author].followers
        assert TAG in r["tags"] and r["n_tags"] == len(r["tags"])
    assert s["downloads"] == {"ok": len(posts)}


def test_no_handle_or_did_in_any_table(scfg, sim):
    scrape(scfg, sim.url, TAG, "2025-06-02", platform="bluesky")
    w = sim.world
    bluesky_accounts = [a for a in w.accounts if w.account_platform(a.index) == "bluesky"]
    identities = {did_for(a) for a in bluesky_accounts} | {handle_for(a) for a in bluesky_accounts}
    for table in TABLES:
        for row in rows(scfg, table):
            text = json.dumps(row, default=str)
            assert "did:plc:" not in text and ".bsky.sim" not in text, f"{table}: {text[:300]}"
            assert not any(ident in text for ident in identities)
    assert any(rows(scfg, t) for t in TABLES)


def test_the_two_platforms_share_a_server_but_not_posts_or_state(scfg, sim):
    scrape(scfg, sim.url, TAG, "2025-06-02", platform="mastodon")
    scrape(scfg, sim.url, TAG, "2025-06-02", platform="bluesky")
    posts = rows(scfg, "posts")
    mastodon = {r["post_id"] for r in posts if r["source"] == "mastodon"}
    assert {sim.world.post_by_id[p] for p in mastodon} == eligible(sim, "mastodon")
    assert len([r for r in posts if r["source"] == "bluesky"]) == len(eligible(sim, "bluesky"))
    storage = LocalStorage(scfg.storage.root)
    assert storage.exists(state_key(sim.url, TAG)) and storage.exists(state_key(sim.url, TAG, "bluesky"))
    assert state_key(sim.url, TAG) != state_key(sim.url, TAG, "bluesky")


def test_second_run_reads_only_new_posts(scfg, sim):
    first = scrape(scfg, sim.url, TAG, "2025-06-02", platform="bluesky")
    sim.advance(3)
    second = scrape(scfg, sim.url, TAG, "2025-06-05", platform="bluesky")
    posts = rows(scfg, "posts")
    assert len({r["post_id"] for r in posts}) == len(posts) == first["kept"] + second["kept"]
    assert set(world_index_of(scfg, sim, [r["post_id"] for r in posts]).values()) == eligible(sim, "bluesky")


def test_refresh_rereads_bluesky_posts_by_their_uris_and_forget_removes_the_uris(scfg, sim):
    scrape(scfg, sim.url, TAG, "2025-06-02", platform="bluesky")
    first = {r["post_id"]: r for r in rows(scfg, "engagement")}
    young = {p for p, r in first.items() if r["age_days"] < scfg.labeling.min_age_days}
    sim.advance(20)
    s = refresh_engagement(scfg, "2025-06-22")
    by_id = world_index_of(scfg, sim, list(first))
    now_ms = sim.now.timestamp() * 1000
    crossed = {p for p in young
               if (now_ms - sim.world.posts[by_id[p]].created_ms) / 86_400_000 >= scfg.labeling.min_age_days}
    assert s["due"] == s["refreshed"] == len(crossed) > 0, s
    snaps = [r for r in rows(scfg, "engagement") if r["dt"] == "2025-06-22-refresh"]
    assert {r["post_id"] for r in snaps} == crossed and {r["source"] for r in snaps} == {"bluesky"}

    storage = LocalStorage(scfg.storage.root)
    victim = rows(scfg, "posts")[0]
    removed = forget(storage, salt_for(scfg), authors={victim["author_key"]})
    assert removed["post_refs"] > 0
    host = sim.url.split("://", 1)[1]
    left = load_refs(storage, "bluesky", host, [r["post_id"] for r in rows(scfg, "posts")] + [victim["post_id"]])
    assert victim["post_id"] not in left and left
    assert storage.list("state/refs/_delta_log/")  # the references are a table of likerank's state


def test_cli_scrape_source_bluesky_never_shows_or_stores_the_password(scfg, sim, tmp_path):
    password = "sim-app-password-7f3a"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIKERANK_") or k == SIMULATOR_URLS_ENV}
    env.update({"LIKERANK_STORAGE__ROOT": str(tmp_path / "cli"), "LIKERANK_SCRAPE__ALLOW_HOSTS": "127.0.0.1",
                "LIKERANK_SCRAPE__PER_HOST_RPS": "1000", "LIKERANK_SCRAPE__BACKFILL_DAYS": "100000",
                "LIKERANK_BLUESKY_IDENTIFIER": "tester.bsky.sim", "LIKERANK_BLUESKY_APP_PASSWORD": password})
    res = subprocess.run([sys.executable, "-m", "likerank.cli.main", "scrape", "--source", "bluesky",
                          "--instance", sim.url, "--tag", TAG, "--json"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["source"] == "bluesky" and summary["kept"] == len(eligible(sim, "bluesky"))
    assert password not in res.stdout + res.stderr
    for path in (tmp_path / "cli").rglob("*"):
        if path.is_file():
            assert password.encode() not in path.read_bytes(), path
    assert sim.session_calls()["createSession"] >= 1 and not sim.media_credentials()


def test_cli_scrape_bluesky_without_a_login_says_which_variables(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIKERANK_") or k == SIMULATOR_URLS_ENV}
    env.update({"LIKERANK_STORAGE__ROOT": str(tmp_path / "cli"), "LIKERANK_SOURCE__KIND": "live",
                "LIKERANK_SOURCE__INSTANCE_URL": "https://mastodon.example", "LIKERANK_AUTHOR_KEY": "k" * 32})
    res = subprocess.run([sys.executable, "-m", "likerank.cli.main", "scrape", "--source", "bluesky", "--tag", TAG],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "LIKERANK_BLUESKY_IDENTIFIER" in res.stderr and "LIKERANK_BLUESKY_APP_PASSWORD" in res.stderr


def kept_world_posts(cfg, sim) -> set[int]:
    posts = [r for r in rows(cfg, "posts") if r["source"] == "bluesky"]
    assert len({r["post_id"] for r in posts}) == len(posts), "a post stored twice"
    return set(world_index_of(cfg, sim, [r["post_id"] for r in posts]).values())


def test_an_expired_token_is_refreshed_mid_crawl(scfg, sim):
    scrape(scfg, sim.url, TAG, "2025-06-02", platform="bluesky", max_posts=30)
    sim.set_fault("expired_token", count=1)
    scrape(scfg, sim.url, TAG, "2025-06-02", platform="bluesky")
    assert kept_world_posts(scfg, sim) == eligible(sim, "bluesky")
    assert sim.session_calls()["refreshSession"] >= 1


def test_a_long_rate_limit_stops_the_run_with_its_state_saved_and_a_rerun_completes(scfg, sim):
    scrape(scfg, sim.url, TAG, "2025-06-02", platform="bluesky", max_posts=30)
    before = kept_world_posts(scfg, sim)
    sim.set_fault("retry_after", scope="api", count=1)  # 429, RateLimit-Reset ten years away
    s = scrape(scfg, sim.url, TAG, "2025-06-02", platform="bluesky")
    assert s["stopped"].startswith("rate limited") and kept_world_posts(scfg, sim) >= before
    sim.clear_faults()
    scrape(scfg, sim.url, TAG, "2025-06-02", platform="bluesky")
    assert kept_world_posts(scfg, sim) == eligible(sim, "bluesky")


def test_malformed_post_views_are_skipped_and_named(scfg, sim, caplog):
    some = sorted(eligible(sim, "bluesky"))[:3]
    ids = [sim.world.posts[i].id for i in some]
    sim.set_fault("missing_fields", post_ids=ids, fields=["created_at", "indexedAt"])  # no time at all
    s = scrape(scfg, sim.url, TAG, "2025-06-02", platform="bluesky")
    assert s["skipped"]["missing_field"] == 3 and "createdAt" in caplog.text
    assert kept_world_posts(scfg, sim) == eligible(sim, "bluesky") - set(some)


def test_every_scraped_post_of_both_platforms_meets_the_simulators_truth(scfg, sim, tmp_path):
    """The hidden truth covers Bluesky too: its post ids carry a pseudonym the truth cannot
    know, and are matched on their record key."""
    from pipeline.core.truth import load_truth, match_id
    from simulator import write_truth

    for platform in ("mastodon", "bluesky"):
        scrape(scfg, sim.url, TAG, "2025-06-02", platform=platform)
    posts = rows(scfg, "posts")
    assert {r["source"] for r in posts} == {"mastodon", "bluesky"}
    write_truth(sim.world, tmp_path / "truth.parquet")
    truth = load_truth(tmp_path / "truth.parquet").set_index("match_id")
    matched = [r for r in posts if match_id(r["post_id"]) in truth.index]
    assert len(matched) == len(posts), [r["post_id"] for r in posts if r not in matched][:5]
    by_id = world_index_of(scfg, sim, [r["post_id"] for r in posts if r["source"] == "bluesky"])
    for pid, index in by_id.items():  # the right post, not just some post
        assert truth.loc[match_id(pid), "quality"] == sim.world.posts[index].quality

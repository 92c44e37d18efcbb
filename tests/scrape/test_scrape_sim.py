"""The scrape stage against the simulator on loopback: exact coverage, incremental runs,
crash/rerun safety, every fault mode as rows, rate limiting, and the engagement refresh."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pyarrow.compute as pc
import pytest
import requests

from pipeline.core.storage import LocalStorage
from pipeline.core.tables import get_json, list_partitions, read_table
from pipeline.scrape.refresh import refresh_engagement
from pipeline.scrape.scrape import scrape, state_key
from simulator import RateLimit

REPO = Path(__file__).resolve().parents[2]
TAG = "selfie"


@pytest.fixture
def scfg(cfg):
    s = cfg.scrape
    s.allow_hosts = ["127.0.0.1"]
    s.backfill_days = 100_000  # the whole world
    s.connect_timeout_s, s.read_timeout_s, s.total_timeout_s = 1.0, 1.0, 3.0
    s.retries, s.backoff_s = 2, 0.01
    s.threads, s.per_host_concurrency, s.per_host_rps = 4, 4, 1000.0
    return cfg


@pytest.fixture(scope="module")
def small_world():
    from simulator import build_world
    return build_world(seed=11, posts=120)


@pytest.fixture
def sim(small_world, sim_server_factory):
    """A 120-post world (renders ~60 images): most tests need a whole crawl, so keep it small."""
    return sim_server_factory(small_world)


def eligible(sim, now_ms=None) -> set[str]:
    """Ids of the world's statuses a full crawl must keep (the simulator's truth)."""
    w = sim.world
    now_ms = now_ms if now_ms is not None else int(sim.now.timestamp() * 1000)
    return {p.id for p in w.posts
            if p.created_ms <= now_ms and p.kind == "photo" and TAG in p.tags
            and w.accounts[p.author].discoverable and w.accounts[p.author].indexable}


def stored(cfg, table="posts"):
    storage = LocalStorage(cfg.storage.root)
    if not list_partitions(storage, table):
        return []
    return read_table(storage, table).to_pylist()


def assert_exact(cfg, sim):
    rows = stored(cfg)
    ids = [r["post_id"] for r in rows]
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    assert not dupes, f"posts stored twice: {dupes[:5]}"
    want = eligible(sim)
    assert set(ids) == want, f"missing {len(want - set(ids))}, extra {len(set(ids) - want)}"
    eng = [(r["post_id"], r["dt"]) for r in stored(cfg, "engagement")]
    assert len(eng) == len(set(eng)) and {p for p, _ in eng} == want
    return rows


def test_full_crawl_is_exactly_the_worlds_eligible_posts(scfg, sim_server):
    s = scrape(scfg, sim_server.url, TAG, "2025-06-02")
    rows = assert_exact(scfg, sim_server)
    assert s["kept"] == len(rows) and s["stopped"] == "end of timeline"
    assert set(s["skipped"]) <= {"boost", "no_image", "video", "opted_out"}
    assert s["downloads"] == {"ok": len(rows)}
    # Ages are on the world's clock (the server's Date header), and followers match the truth.
    w = sim_server.world
    acc = {a.id: a for a in w.accounts}
    by_id = {p.id: p for p in w.posts}
    eng = {r["post_id"]: r for r in stored(scfg, "engagement")}
    for r in rows[:50]:
        p = by_id[r["post_id"]]
        assert r["scraped_at"] == sim_server.now
        assert r["author_followers"] == acc[w.accounts[p.author].id].followers
        assert abs(eng[r["post_id"]]["age_days"] - (sim_server.now.timestamp() * 1000 - p.created_ms) / 86_400_000) < 1e-6
    images = stored(scfg, "images")
    downloads = stored(scfg, "downloads")
    assert {d["sha256"] for d in downloads} == {i["sha256"] for i in images}
    assert all(i["width"] > 0 and i["format"] in ("JPEG", "PNG") for i in images)


def test_second_run_after_clock_advance_reads_only_new_posts(scfg, sim_server):
    scrape(scfg, sim_server.url, TAG, "2025-06-02")
    before = eligible(sim_server)
    t0 = int(sim_server.now.timestamp() * 1000)
    sim_server.advance(3)
    s = scrape(scfg, sim_server.url, TAG, "2025-06-05")
    new_statuses = [p for p in sim_server.world.posts
                    if t0 < p.created_ms <= int(sim_server.now.timestamp() * 1000) and TAG in (p.tags or ("selfie",))]
    assert s["seen"] <= len([p for p in sim_server.world.posts if t0 < p.created_ms <= int(sim_server.now.timestamp() * 1000)])
    day2 = {r["post_id"] for r in stored(scfg) if r["dt"] == "2025-06-05"}
    assert day2 == eligible(sim_server) - before and day2
    assert s["pages"] <= 2 + len(new_statuses) // scfg.scrape.page_limit
    assert_exact(scfg, sim_server)
    # A third run with nothing new reads one page and writes nothing new.
    s3 = scrape(scfg, sim_server.url, TAG, "2025-06-05")
    assert (s3["seen"], s3["pages"]) == (0, 1)
    assert_exact(scfg, sim_server)


def test_backfill_of_past_days_stores_each_days_posts_in_its_own_partition(scfg, sim):
    """Runs for past days (``airflow backfill create``), oldest first, then today's: each
    partition holds the posts created up to its day's end that no earlier run stored."""
    from datetime import timedelta

    today = sim.now.date()
    days = [(today - timedelta(days=n)).isoformat() for n in (20, 10, 3, 0)]
    for day in days:
        scrape(scfg, sim.url, TAG, day)
    rows = assert_exact(scfg, sim)  # together: every eligible post once
    by_day = Counter(r["dt"] for r in rows)
    assert set(by_day) == set(days), by_day  # each day found posts of its own
    for r in rows:
        day_end = r["dt"] + "T23:59:59.999999+00:00"
        assert r["created_at"].isoformat() <= day_end, (r["post_id"], r["created_at"], r["dt"])
    for earlier, later in pairwise(days):
        newest_earlier = max(r["created_at"] for r in rows if r["dt"] == earlier)
        assert all(r["created_at"] > newest_earlier for r in rows if r["dt"] == later)


def test_max_posts_runs_leave_no_gap(scfg, sim):
    for _ in range(20):
        s = scrape(scfg, sim.url, TAG, "2025-06-02", max_posts=37)
        if s["seen"] == 0:
            break
    assert_exact(scfg, sim)


def test_forward_only_first_run_reads_one_page(scfg, sim):
    scfg.scrape.backfill_days = 0
    s = scrape(scfg, sim.url, TAG, "2025-06-02")
    assert s["pages"] == 1 and s["seen"] == scfg.scrape.page_limit


class Boom(Exception):
    pass


@pytest.mark.parametrize("fail_after_pages", [1, 3, 5])
def test_exception_after_n_pages_then_rerun_loses_and_duplicates_nothing(scfg, sim, monkeypatch, fail_after_pages):
    scfg.scrape.page_limit = 10
    from pipeline.scrape.sources.mastodon import MastodonSource
    real = MastodonSource.read_page
    calls = {"n": 0}

    def flaky(self, url, hashtag):
        calls["n"] += 1
        if calls["n"] == fail_after_pages + 1:
            raise Boom(f"injected after {fail_after_pages} pages")
        return real(self, url, hashtag)

    monkeypatch.setattr(MastodonSource, "read_page", flaky)
    with pytest.raises(Boom):
        scrape(scfg, sim.url, TAG, "2025-06-02", flush_every=15)
    partial = {r["post_id"] for r in stored(scfg)}
    assert partial and partial < eligible(sim)  # what was read before the failure was kept
    monkeypatch.setattr(MastodonSource, "read_page", real)
    scrape(scfg, sim.url, TAG, "2025-06-02", flush_every=15)
    assert_exact(scfg, sim)


def test_failure_between_table_writes_then_rerun(scfg, sim, monkeypatch):
    import pipeline.scrape.scrape as mod
    real = mod.merge_partition
    calls = {"n": 0}

    def fail_on_posts(storage, table, value, rows):
        calls["n"] += 1
        if table == "posts" and calls["n"] > 4:  # the second flush dies after images/downloads/engagement
            raise OSError("disk full (injected)")
        return real(storage, table, value, rows)

    monkeypatch.setattr(mod, "merge_partition", fail_on_posts)
    with pytest.raises(OSError):
        scrape(scfg, sim.url, TAG, "2025-06-02", flush_every=40)
    monkeypatch.setattr(mod, "merge_partition", real)
    scrape(scfg, sim.url, TAG, "2025-06-02", flush_every=40)
    assert_exact(scfg, sim)
    downloads = [(d["post_id"], d["url"]) for d in stored(scfg, "downloads")]
    assert len(downloads) == len(set(downloads))


def test_killed_subprocess_then_rerun(scfg, sim, tmp_path):
    """SIGKILL a crawl at several points (no chance to flush), rerun each time: exact at the end."""
    scfg.scrape.page_limit = 10
    sim.set_fault("slow", scope="media", delay_s=0.3)  # stretch the crawl (~5 s) so kills land mid-way
    code = (
        "import sys; from pipeline.core.config import load_config; from pipeline.scrape.scrape import scrape\n"
        f"cfg = load_config(overrides=['storage.root={scfg.storage.root}', 'scrape.backfill_days=100000', "
        "'scrape.page_limit=10', 'scrape.threads=4'])\n"
        "cfg.scrape.allow_hosts = ['127.0.0.1']\n"
        f"scrape(cfg, '{sim.url}', '{TAG}', '2025-06-02', flush_every=25)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    partial = []
    for _ in range(3):
        before = len(stored(scfg))
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        # Kill right after the next flush lands: mid-crawl, downloads in flight, nothing flushed since.
        while proc.poll() is None and len(stored(scfg)) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        partial.append(len(stored(scfg)))
    sim.clear_faults()
    scrape(scfg, sim.url, TAG, "2025-06-02")
    assert partial[0] < len(eligible(sim)), partial  # the first kill did land mid-crawl
    assert_exact(scfg, sim)


@pytest.mark.parametrize("mode, params, status", [
    ("error_5xx", {}, "http_error"),
    ("slow", {"delay_s": 2.5}, "timeout"),
    ("truncated", {}, "connection_error"),
    ("wrong_content_type", {}, "ok"),  # the bytes are a real image whatever the label says
    ("bomb", {}, "bomb"),
    ("oversized", {"size_bytes": 3_000_000}, "too_large"),
    ("oversized", {"size_bytes": 3_000_000, "declare_length": False}, "too_large"),
    ("redirect_loop", {}, "redirect_loop"),
    ("redirect_private", {}, "blocked"),
    ("redirect_private", {"target": "http://10.0.0.1/x.jpg"}, "blocked"),
])
def test_media_fault_modes_end_as_rows(scfg, sim, mode, params, status):
    scfg.scrape.max_bytes = 2_000_000
    # Tight timeouts for the slow mode; elsewhere room for rendering on a busy machine.
    scfg.scrape.read_timeout_s, scfg.scrape.total_timeout_s = (0.5, 1.5) if mode == "slow" else (3.0, 6.0)
    sim.set_fault(mode, fraction=0.15, scope="media", **params)
    t0 = time.monotonic()
    s = scrape(scfg, sim.url, TAG, "2025-06-02", max_posts=80)
    assert time.monotonic() - t0 < 60
    rows = stored(scfg, "downloads")
    by_status = Counter(r["status"] for r in rows)
    assert by_status[status] >= 1, by_status
    assert set(by_status) <= {"ok", status}
    for r in rows:
        if r["status"] != "ok":
            assert r["error"] and r["sha256"] is None
            if status == "blocked":
                assert params.get("target", "http://169.254.169.254/").split("/")[2] in r["error"]
    assert sum(s["downloads"].values()) == len(rows) == s["kept"]


@pytest.mark.parametrize("mode, count, expect", [
    ("html", 2, "recovers"), ("malformed_json", 2, "recovers"), ("error_5xx", 2, "recovers"),
    ("html", None, "fails"), ("malformed_json", None, "fails"),
])
def test_api_fault_modes(scfg, sim, mode, count, expect):
    from pipeline.scrape.sources.base import SourceError
    scfg.scrape.page_limit = 20
    scrape(scfg, sim.url, TAG, "2025-06-02", max_posts=40)  # something durable first
    sim.set_fault(mode, scope="api", count=count)
    if expect == "recovers":
        scrape(scfg, sim.url, TAG, "2025-06-02")
        assert_exact(scfg, sim)
    else:
        with pytest.raises(SourceError, match=r"http://127\.0\.0\.1:\d+/api/v1/timelines/tag/selfie"):
            scrape(scfg, sim.url, TAG, "2025-06-02")
        assert len(stored(scfg)) >= 1  # the first run's rows are intact
        sim.clear_faults()
        scrape(scfg, sim.url, TAG, "2025-06-02")
        assert_exact(scfg, sim)


def test_missing_fields_are_skipped_and_named(scfg, sim, caplog):
    some = sorted(eligible(sim))[:5]
    sim.set_fault("missing_fields", post_ids=some, fields=["created_at"])
    s = scrape(scfg, sim.url, TAG, "2025-06-02")
    assert s["skipped"]["missing_field"] == 5
    assert all(pid in caplog.text for pid in some) and "created_at" in caplog.text
    assert {r["post_id"] for r in stored(scfg)} == eligible(sim) - set(some)


def test_rate_limit_no_request_before_retry_after(scfg, small_world, sim_server_factory, monkeypatch):
    sim = sim_server_factory(small_world, rate_limit=RateLimit(4, 2.0))
    scfg.scrape.page_limit = 10  # ~13 pages: more than one window's worth
    sent: list[tuple[float, str, int, dict]] = []
    real_send = requests.Session.send

    def send(self, request, **kw):
        t = time.monotonic()
        resp = real_send(self, request, **kw)
        sent.append((t, request.url, resp.status_code, dict(resp.headers)))
        return resp

    monkeypatch.setattr(requests.Session, "send", send)
    scrape(scfg, sim.url, TAG, "2025-06-02")
    api = [x for x in sent if "/api/" in x[1]]
    assert len(api) > 4  # more requests than one window allows: the limiter had to wait
    for t, _url, code, headers in api:
        if code == 429:
            wait = float(headers["Retry-After"])
            later = [x for x in sent if x[0] > t]
            assert not later or later[0][0] >= t + wait - 0.05, f"sent {later[0][0] - t:.2f}s after a 429 asking {wait}s"
    assert_exact(scfg, sim)


def test_refresh_reobserves_posts_that_crossed_min_age(scfg, sim_server):
    scrape(scfg, sim_server.url, TAG, "2025-06-02")
    first = {r["post_id"]: r for r in stored(scfg, "engagement")}
    young = {p for p, r in first.items() if r["age_days"] < scfg.labeling.min_age_days}
    sim_server.advance(20)
    s = refresh_engagement(scfg, "2025-06-22")
    now_ms = sim_server.now.timestamp() * 1000
    by_id = {p.id: p for p in sim_server.world.posts}
    crossed = {p for p in young if (now_ms - by_id[p].created_ms) / 86_400_000 >= scfg.labeling.min_age_days}
    assert s["due"] == s["refreshed"] == len(crossed) > 0
    snaps = [r for r in stored(scfg, "engagement") if r["dt"] == "2025-06-22-refresh"]
    assert {r["post_id"] for r in snaps} == crossed
    assert all(r["age_days"] >= scfg.labeling.min_age_days and r["likes"] >= first[r["post_id"]]["likes"] for r in snaps)
    again = refresh_engagement(scfg, "2025-06-22")  # nothing left due; the partition is kept
    assert again["due"] == 0 and len([r for r in stored(scfg, "engagement") if r["dt"] == "2025-06-22-refresh"]) == len(crossed)


def test_state_file_location(scfg, sim):
    scrape(scfg, sim.url, TAG, "2025-06-02", max_posts=10)
    state = get_json(LocalStorage(scfg.storage.root), state_key(sim.url, TAG))
    assert state["intervals"] and state_key(sim.url, TAG).startswith(f"state/scrape/127.0.0.1_{sim.port}/")
    assert pc is not None

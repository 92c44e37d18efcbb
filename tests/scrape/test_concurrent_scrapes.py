"""Many writers, one storage root: three ``likerank scrape`` processes at once (two hashtags,
one of them twice) and a ``likerank forget --post`` while they run. Afterwards, read through
``deltalake``, every post and every download is there exactly once, and the forgotten post
has left no byte anywhere under the root."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from deltalake import DeltaTable

from pipeline.core.pseudonym import SIMULATOR_URLS_ENV
from pipeline.core.storage import LocalStorage
from pipeline.core.tables import location, version

REPO = Path(__file__).resolve().parents[2]
TAGS = ("selfie", "portrait")
DAY = "2025-06-02"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_tag_world():
    from simulator import build_world

    return build_world(seed=5, posts=240, hashtags=TAGS)


def eligible(world, tag: str) -> set[str]:
    """Ids of the statuses a full crawl of ``tag`` keeps (the simulator's truth)."""
    now_ms = int(world.params.now.timestamp() * 1000)
    return {p.id for p in world.posts
            if p.created_ms <= now_ms and p.kind == "photo" and tag in p.tags
            and world.accounts[p.author].discoverable and world.accounts[p.author].indexable}


def likerank(root: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIKERANK_") or k == SIMULATOR_URLS_ENV}
    settings = ["storage.root=" + str(root), "scrape.allow_hosts=127.0.0.1", "scrape.backfill_days=100000",
                "scrape.per_host_rps=1000", "scrape.per_host_concurrency=8"]
    return subprocess.Popen([sys.executable, "-m", "likerank.cli.main", *[a for s in settings for a in ("--set", s)],
                             *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rows(root: Path, table: str) -> list[dict]:
    uri, options = location(LocalStorage(root), table)
    return DeltaTable(uri, storage_options=options).to_pyarrow_table().to_pylist()


def test_three_scrapes_and_a_forget_at_once_lose_nothing_and_leave_no_trace(two_tag_world, sim_server_factory,
                                                                             tmp_path):
    sim = sim_server_factory(two_tag_world)
    sim.set_fault("slow", scope="media", delay_s=0.02)  # long enough a crawl for the forget to land inside it
    root = tmp_path / "data"
    victim = sorted(eligible(two_tag_world, "selfie"))[len(eligible(two_tag_world, "selfie")) // 2]
    scrapes = [likerank(root, "scrape", "--instance", sim.url, "--tag", tag, "--date", DAY)
               for tag in ("selfie", "portrait", "selfie")]
    deadline = time.monotonic() + 120
    while version(LocalStorage(root), "posts") is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the forget starts once the first posts are committed
    forget = likerank(root, "forget", "--post", sim.url, victim)
    results = [p.communicate(timeout=600) + (p.returncode,) for p in [*scrapes, forget]]
    for _out, err, rc in results[:-1]:
        assert rc == 0, err[-2000:]
    # The forget may land before the victim's commit: then nothing stored matched yet (exit 1),
    # and the tombstone has the scrape remove it right after its commit.
    assert results[-1][2] in (0, 1), results[-1][1][-2000:]

    posts = rows(root, "posts")
    per_post = Counter((r["instance"], r["post_id"]) for r in posts)
    assert max(per_post.values()) == 1, [k for k, n in per_post.items() if n > 1][:5]
    want = (eligible(two_tag_world, "selfie") | eligible(two_tag_world, "portrait")) - {victim}
    assert {post_id for _, post_id in per_post} == want
    downloads = Counter((r["post_id"], r["url"]) for r in rows(root, "downloads"))
    assert downloads and max(downloads.values()) == 1
    assert {post_id for post_id, _ in downloads} == want
    engagement = Counter((r["post_id"], r["dt"]) for r in rows(root, "engagement"))
    assert max(engagement.values()) == 1 and {post_id for post_id, _ in engagement} == want

    traces = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and victim.encode() in p.read_bytes()]
    assert traces == []

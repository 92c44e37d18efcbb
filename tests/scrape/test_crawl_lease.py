"""One crawl of a timeline at a time: the lease beside its crawl state."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.scrape import crawl_lease
from pipeline.scrape.crawl_lease import CrawlBusy, acquire

KEY = "state/scrape/sim.example/selfie.json"


def test_create_lets_exactly_one_of_many_through(storage):
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: storage.create("state/x.lease", f"owner {i}".encode()), range(8)))
    assert won.count(True) == 1
    assert storage.get_bytes("state/x.lease") == f"owner {won.index(True)}".encode()  # whole, the winner's


def test_a_held_lease_makes_a_second_scrape_wait_its_turn(storage):
    first = acquire(storage, KEY)
    with pytest.raises(CrawlBusy, match="another scrape of this timeline is running"):
        acquire(storage, KEY)
    first.renew()
    first.release()
    acquire(storage, KEY).release()  # free again


def test_a_killed_workers_lease_expires(storage, monkeypatch):
    acquire(storage, KEY)  # never released: its worker was killed
    monkeypatch.setattr(crawl_lease.time, "time", lambda: time.monotonic() + 10**10)  # long after its expiry
    taken = acquire(storage, KEY)
    assert json.loads(storage.get_bytes(taken.key))["owner"] == taken.owner


def test_a_second_scrape_of_a_busy_timeline_does_nothing_and_says_why(scrape_cfg, fake_mastodon):
    from pipeline.core.storage import LocalStorage
    from pipeline.scrape.scrape import scrape, state_key

    storage = LocalStorage(scrape_cfg.storage.root)
    held = acquire(storage, state_key(fake_mastodon.url, "selfie"))
    summary = scrape(scrape_cfg, fake_mastodon.url, "selfie", "2026-11-02")
    assert summary["stopped"].startswith("busy: another scrape of this timeline is running")
    assert summary["kept"] == 0 and fake_mastodon.page_requests == 0
    held.release()

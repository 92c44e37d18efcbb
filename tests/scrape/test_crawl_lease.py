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
        acquire(storage, KEY, wait_s=0)
    first.renew()
    first.release()
    acquire(storage, KEY, wait_s=0).release()  # free again


def test_a_scrape_waits_for_the_holder_to_finish(storage):
    import threading

    first = acquire(storage, KEY)
    threading.Timer(0.5, first.release).start()
    acquire(storage, KEY, wait_s=30).release()  # got it once the first let go


def test_the_lease_of_a_dead_process_on_this_machine_is_taken_at_once(storage):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage.put_bytes(f"{KEY}.lease", json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                  "id": "killed", "expires_at": time.time() + 3600}).encode())
    acquire(storage, KEY, wait_s=0).release()


def test_a_killed_workers_lease_expires(storage):
    storage.put_bytes(f"{KEY}.lease", json.dumps({"host": "another-machine", "pid": 1, "id": "killed",
                                                  "expires_at": time.time() - 1}).encode())  # its heartbeat stopped
    taken = acquire(storage, KEY, wait_s=0)
    assert json.loads(storage.get_bytes(taken.key))["id"] == taken.owner["id"]
    taken.release()


def test_a_second_scrape_of_a_busy_timeline_does_nothing_and_says_why(scrape_cfg, fake_mastodon, monkeypatch):
    from pipeline.core.storage import LocalStorage
    from pipeline.scrape.scrape import scrape, state_key

    storage = LocalStorage(scrape_cfg.storage.root)
    held = acquire(storage, state_key(fake_mastodon.url, "selfie"))
    monkeypatch.setattr(crawl_lease, "LEASE_WAIT_S", 0.0)
    summary = scrape(scrape_cfg, fake_mastodon.url, "selfie", "2026-11-02")
    assert summary["stopped"].startswith("busy: another scrape of this timeline is running")
    assert summary["kept"] == 0 and fake_mastodon.page_requests == 0
    held.release()

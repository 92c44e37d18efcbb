"""The per-host limiter shared through a real Redis on loopback by real worker processes."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import redis
import requests

from pipeline.core.config import ConfigError, load_config
from pipeline.scrape.limiter import HostLimiter, SharedHostLimiter, build_limiter
from simulator.politeness import CountingHost, busiest_window
from tests.conftest import free_port
from tests.distributed.servers import redis_server

RPS, SLOTS = 5.0, 2
SPAWN = multiprocessing.get_context("spawn")  # a fresh interpreter per worker, as a Celery worker is


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url.rsplit("/", 1)[0] + "/2"  # a DB of its own, as the deployments do


@pytest.fixture
def limiter_url(redis_url: str) -> str:
    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


def shared(url: str, **kwargs) -> SharedHostLimiter:
    options = {"lease_s": 30.0, "expected_workers": 2, **kwargs}
    return SharedHostLimiter(url, options.pop("rps", RPS), options.pop("concurrency", SLOTS), **options)


# --------------------------------------------------------------------------- worker processes


def _scrape_worker(limiter_url: str, target: str, requests_n: int, threads: int) -> None:
    """One scrape process: ``threads`` threads fetching ``target`` under the shared limiter."""
    limiter = shared(limiter_url)
    host = target.split("//", 1)[1]

    def loop() -> None:
        with requests.Session() as session:
            # Open the connection first (robots.txt is not counted): the window is kept on sends,
            # and a first request's connect time would otherwise shift its arrival.
            session.get(target + "/robots.txt", timeout=10)
            for _ in range(requests_n // threads):
                assert limiter.acquire(host, None)
                try:
                    session.get(target + "/page", timeout=10).raise_for_status()
                finally:
                    limiter.release(host)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def _hold_slot(limiter_url: str, host: str, held: multiprocessing.synchronize.Event) -> None:
    """Take a slot and never give it back (the test kills this process)."""
    limiter = shared(limiter_url, concurrency=1, lease_s=1.0)
    assert limiter.acquire(host, None)
    held.set()
    time.sleep(600)


def _pause_host(limiter_url: str, host: str, seconds: float) -> None:
    shared(limiter_url).close_until(host, time.monotonic() + seconds)


# --------------------------------------------------------------------------- shared limits


def test_two_processes_keep_one_hosts_rate_together(limiter_url):
    host = CountingHost()
    try:
        procs = [SPAWN.Process(target=_scrape_worker, args=(limiter_url, host.url, 16, 4)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        host.close()
    assert len(host.times) == 32
    # Each process alone is allowed RPS (its 4 threads share a bucket); together they must keep it too.
    assert busiest_window(host.times) <= RPS * 1.1 + 1


def test_in_process_limiters_alone_do_not_keep_the_rate_together():
    """The baseline the shared limiter fixes: two HostLimiters, one per worker, send twice the rate."""
    host = CountingHost()
    try:
        limiters = [HostLimiter(RPS, SLOTS) for _ in range(2)]
        key = host.url.split("//", 1)[1]

        def loop(limiter: HostLimiter) -> None:
            for _ in range(12):
                assert limiter.acquire(key, None)
                try:
                    requests.get(host.url + "/page", timeout=10)
                finally:
                    limiter.release(key)

        threads = [threading.Thread(target=loop, args=(lim,)) for lim in limiters]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        host.close()
    assert busiest_window(host.times) > RPS * 1.1 + 1


def test_a_killed_workers_slot_comes_back_after_its_lease(limiter_url):
    held = SPAWN.Event()
    proc = SPAWN.Process(target=_hold_slot, args=(limiter_url, "slots.example", held))
    proc.start()
    try:
        assert held.wait(60)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        limiter = shared(limiter_url, concurrency=1, lease_s=1.0)
        # The dead worker's lease still holds the only slot...
        assert not limiter.acquire("slots.example", time.monotonic() + 0.2)
        # ...until its lifetime (1 s) passes.
        assert limiter.acquire("slots.example", time.monotonic() + 10)
        limiter.release("slots.example")
    finally:
        if proc.is_alive():
            proc.kill()


def test_release_frees_the_slot_for_another_worker(limiter_url):
    one, other = shared(limiter_url, concurrency=1), shared(limiter_url, concurrency=1)
    assert one.acquire("h.example", None)
    assert not other.acquire("h.example", time.monotonic() + 0.2)
    one.release("h.example")
    assert other.acquire("h.example", time.monotonic() + 2)
    other.release("h.example")


def test_a_pause_set_by_one_process_pauses_the_others(limiter_url):
    proc = SPAWN.Process(target=_pause_host, args=(limiter_url, "paused.example", 30.0))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    limiter = shared(limiter_url)
    assert limiter.closed_until("paused.example") - time.monotonic() > 20
    assert not limiter.acquire("paused.example", time.monotonic() + 1)
    assert limiter.acquire("open.example", time.monotonic() + 1)  # other hosts are not paused
    limiter.release("open.example")
    # A shorter pause never shortens a longer one.
    limiter.close_until("paused.example", time.monotonic() + 1)
    assert limiter.closed_until("paused.example") - time.monotonic() > 20


def test_tighten_lowers_the_shared_rate(limiter_url):
    limiter = shared(limiter_url)
    assert limiter.acquire("slow.example", None)
    limiter.release("slow.example")
    assert limiter.acquire("fast.example", None)
    limiter.release("fast.example")
    limiter.tighten("slow.example", 0.5)  # a Crawl-delay of 2 s
    assert limiter.acquire("slow.example", None)
    limiter.release("slow.example")
    assert not limiter.acquire("slow.example", time.monotonic() + 0.5)  # next one in 2 s
    assert limiter.acquire("fast.example", time.monotonic() + 0.5)  # untouched
    limiter.release("fast.example")


def test_requests_to_a_host_leave_evenly_spaced(limiter_url):
    """A burst of one: the shared rate spaces requests 1 / rps apart, whoever sends them."""
    first, second = shared(limiter_url), shared(limiter_url)
    sent = []
    for limiter in (first, second, first, second, first, second):
        assert limiter.acquire("even.example", None)
        sent.append(time.monotonic())
        limiter.release("even.example")
    gaps = [b - a for a, b in zip(sent, sent[1:], strict=False)]
    assert min(gaps) >= 1 / RPS - 0.01  # Redis' clock, ms resolution


# --------------------------------------------------------------------------- Redis down


class FakeClock:
    """A monotonic clock that moves only when the limiter sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 1e-6)  # a real sleep always takes some time (and floats round)


def test_redis_down_at_start_falls_back_to_a_divided_limit_and_warns_once(caplog):
    clock = FakeClock()
    limiter = SharedHostLimiter(f"redis://127.0.0.1:{free_port()}/2", 5.0, 4, lease_s=30.0, expected_workers=4,
                                clock=clock, sleep=clock.sleep)
    with caplog.at_level(logging.WARNING, logger="pipeline.scrape.limiter"):
        for _ in range(6):
            assert limiter.acquire("h.example", None)
            limiter.release("h.example")
        limiter.close_until("h.example", clock() + 5)
        assert limiter.closed_until("h.example") == pytest.approx(clock.now + 5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    assert "1.25 requests/s and 1 at a time" in warnings[0].getMessage()
    # 5 rps / 4 workers = 1.25 rps with a burst of 1.25: six requests take (6 - 1.25) / 1.25 s.
    assert clock.now - 1000.0 == pytest.approx((6 - 1.25) / 1.25, abs=0.01)
    # 4 slots / 4 workers = 1 slot in this process.
    assert limiter.acquire("h.example", None)
    assert not limiter.acquire("h.example", clock() + 0.2)
    limiter.release("h.example")


def test_redis_lost_mid_run_falls_back_without_failing(caplog):
    with redis_server() as url:
        limiter = SharedHostLimiter(url, 5.0, 4, lease_s=30.0, expected_workers=4)
        assert limiter.acquire("h.example", None)
        assert redis.Redis.from_url(url).zcard("likerank:polite:leases:h.example") == 1
        limiter.release("h.example")
    with caplog.at_level(logging.WARNING, logger="pipeline.scrape.limiter"):
        for _ in range(3):
            assert limiter.acquire("h.example", time.monotonic() + 5)
            limiter.release("h.example")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


# --------------------------------------------------------------------------- choosing


def test_build_limiter_follows_the_setting(tmp_path):
    cfg = load_config(overrides=[f"storage.root={tmp_path}"])
    assert isinstance(build_limiter(cfg.scrape), HostLimiter)
    cfg = load_config(overrides=[f"storage.root={tmp_path}", "scrape.limiter_url=redis://127.0.0.1:1/2",
                                 "scrape.expected_workers=8"])
    limiter = build_limiter(cfg.scrape)
    assert isinstance(limiter, SharedHostLimiter)
    assert limiter.fallback.rps == pytest.approx(cfg.scrape.per_host_rps / 8)


def test_a_limiter_url_that_is_not_redis_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="limiter_url"):
        load_config(overrides=[f"storage.root={tmp_path}", "scrape.limiter_url=http://127.0.0.1:6379"])

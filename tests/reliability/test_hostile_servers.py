"""The hostile-server corpus (:mod:`simulator.hostile`): every case ends as the rows or the
named outcome it must, the token never leaves its origin, nothing hangs, and after a clean
rerun no good row is lost."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.core.storage import LocalStorage
from pipeline.core.tables import list_partitions, read_table
from pipeline.scrape.scrape import scrape
from simulator.hostile import CASES, Case
from tests.scrape.test_scrape_sim import TAG, eligible

DAY = "2025-06-02"
TOKEN = "hostile-corpus-token"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_ends_as_it_must_and_loses_nothing(case: Case, sim_server_factory, cfg, monkeypatch):
    sim = sim_server_factory(posts=150)
    cfg.scrape.allow_hosts = ["127.0.0.1", "localhost"]
    cfg.scrape.backfill_days, cfg.scrape.page_limit, cfg.scrape.retries, cfg.scrape.backoff_s = 100000, 20, 2, 0.01
    cfg.scrape.per_host_rps = 1000.0
    for k, v in case.scrape.items():
        setattr(cfg.scrape, k, v)
    monkeypatch.setenv(cfg.source.token_env, TOKEN)
    fault = dict(case.fault)
    sim.set_fault(case.mode, fraction=fault.pop("fraction", 1.0), count=fault.pop("count", None),
                  scope=fault.pop("scope", None), **fault)

    summary = scrape(cfg, sim.url, TAG, DAY)
    assert sim.fault_hits(case.mode) >= 1, "the fault never fired"
    storage = LocalStorage(cfg.storage.root)
    statuses = Counter(r["status"] for r in read_table(storage, "downloads").to_pylist())
    if case.expect == "run ok":
        assert not summary["stopped"].startswith("rate limited")
    elif case.expect == "run stops":
        assert summary["stopped"].startswith("rate limited") and "retry after" in summary["stopped"]
    else:
        assert statuses[case.expect] >= 1 and set(statuses) <= {"ok", case.expect}, statuses
    assert set(sim.credentials_seen()) <= {f"127.0.0.1:{sim.url.rsplit(':', 1)[1]}"}, sim.credentials_seen()

    sim.clear_faults()
    scrape(cfg, sim.url, TAG, DAY)  # the rerun after the server heals
    ids = [r["post_id"] for r in read_table(storage, "posts").to_pylist()] if list_partitions(storage, "posts") else []
    assert len(ids) == len(set(ids)) and set(ids) == eligible(sim), "rows lost or duplicated"

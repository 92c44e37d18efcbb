"""No silent losses, against loopback servers: a host that closes for longer than a download may
wait defers its images to a later run, a transient failure is tried again by later runs with
growing delays up to ``scrape.max_attempts``, each try its own ``downloads`` row, and a final
failure is never tried again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from pipeline.core.storage import LocalStorage
from pipeline.core.tables import read_table
from pipeline.scrape.scrape import scrape
from tests.fixtures.scrape import FakeMastodon, jpeg_bytes

TAG = "selfie"
T0 = datetime.now(UTC).replace(microsecond=0)
DAY0 = T0.date()


def day(n: int) -> str:
    return (DAY0 + timedelta(days=n)).isoformat()


def at(days: float) -> callable:
    """A scrape clock ``days`` after the first run's."""
    return lambda: T0 + timedelta(days=days)


def post(fake: FakeMastodon, sid: int) -> dict:
    return {"id": str(sid), "created_at": (T0 - timedelta(days=1)).isoformat(), "reblog": None,
            "favourites_count": 1, "reblogs_count": 0, "replies_count": 0, "tags": [{"name": TAG}],
            "account": {"uri": f"https://x/users/u{sid}", "followers_count": 10},
            "media_attachments": [{"type": "image", "url": f"{fake.url}/fault/img{sid}"}]}


def serve_images(fake: FakeMastodon, ids: list[int], answer) -> dict[str, int]:
    """Posts ``ids`` whose images ``answer(h, sid)`` serves; returns the requests per image."""
    fake.statuses = [post(fake, sid) for sid in ids]
    calls = {str(sid): 0 for sid in ids}

    def handler(sid):
        def handle(h):
            calls[str(sid)] += 1
            answer(h, sid)
        return handle

    for sid in ids:
        fake.faults[f"img{sid}"] = handler(sid)
    return calls


def ok(h, sid):
    FakeMastodon.send(h, 200, jpeg_bytes(seed=sid), "image/jpeg")


def downloads(cfg) -> list[dict]:
    rows = read_table(LocalStorage(cfg.storage.root), "downloads").to_pylist()
    return sorted(rows, key=lambda r: (r["post_id"], r["attempt"] or 0))


@pytest.fixture
def rcfg(scrape_cfg):
    scrape_cfg.scrape.retries = 0  # one request per try: the tries across runs are what is tested
    scrape_cfg.scrape.retry_delay_s = 3600.0
    scrape_cfg.scrape.page_limit = 10
    return scrape_cfg


def test_an_exhausted_quota_defers_the_hosts_images_and_a_later_run_fetches_them(fake_mastodon, rcfg):
    rcfg.scrape.per_host_concurrency = 1  # one image at a time: the first answer closes the host
    reset = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    quota = {"left": 0}

    def limited(h, sid):
        headers = {"X-RateLimit-Limit": "300", "X-RateLimit-Remaining": str(quota["left"]),
                   "X-RateLimit-Reset": reset}
        FakeMastodon.send(h, 200, jpeg_bytes(seed=sid), "image/jpeg", headers)

    calls = serve_images(fake_mastodon, [14, 13, 12, 11, 10], limited)
    first = scrape(rcfg, fake_mastodon.url, TAG, day(0), now=at(0))
    assert first["downloads"] == {"deferred": 4, "ok": 1} and first["retried"] == 0
    assert sum(calls.values()) == 1  # no request to the closed host
    deferred = [r for r in downloads(rcfg) if r["status"] == "deferred"]
    assert len(deferred) == 4
    for r in deferred:
        assert r["attempt"] == 1 and "X-RateLimit" not in (r["error"] or "") and "127.0.0.1" in r["error"]
        assert r["next_attempt_at"] >= T0 + timedelta(hours=1, minutes=59)  # the reset, not the 1 h delay

    quota["left"] = 299
    early = scrape(rcfg, fake_mastodon.url, TAG, day(1), now=at(1 / 24))  # before the reset: not due
    assert early["retried"] == 0 and sum(calls.values()) == 1

    later = scrape(rcfg, fake_mastodon.url, TAG, day(2), now=at(1))
    assert later["retried"] == 4 and later["downloads"] == {"ok": 4}
    rows = downloads(rcfg)
    latest = {r["post_id"]: r for r in rows}  # sorted by attempt: the last is the latest
    assert all(r["status"] == "ok" and r["sha256"] for r in latest.values())
    assert sorted((r["dt"], r["attempt"]) for r in rows if r["status"] == "ok") == [
        (day(0), 1), *[(day(2), 2)] * 4]
    assert all(n == 1 for n in calls.values())


def test_a_long_retry_after_defers_too(fake_mastodon, rcfg):
    rcfg.scrape.per_host_concurrency = 1
    calls = serve_images(fake_mastodon, [21, 20], lambda h, sid: FakeMastodon.send(
        h, 429, b"{}", "application/json", {"Retry-After": "7200"}))
    summary = scrape(rcfg, fake_mastodon.url, TAG, day(0), now=at(0))
    assert summary["downloads"] == {"deferred": 2}
    assert sum(calls.values()) == 1  # the first asked for two hours; the second was not sent
    assert all(r["next_attempt_at"] >= T0 + timedelta(hours=2) - timedelta(seconds=5) for r in downloads(rcfg))


def test_a_503_twice_then_ok_is_three_tries_across_three_runs(fake_mastodon, rcfg):
    healthy = {"now": False}
    calls = serve_images(fake_mastodon, [30], lambda h, sid: ok(h, sid) if healthy["now"] else FakeMastodon.send(
        h, 503, b"down", "text/plain"))
    s1 = scrape(rcfg, fake_mastodon.url, TAG, day(0), now=at(0))
    s2 = scrape(rcfg, fake_mastodon.url, TAG, day(1), now=at(1))
    healthy["now"] = True
    s3 = scrape(rcfg, fake_mastodon.url, TAG, day(2), now=at(2))
    assert [s["downloads"] for s in (s1, s2, s3)] == [{"http_error": 1}, {"http_error": 1}, {"ok": 1}]
    assert [s["retried"] for s in (s1, s2, s3)] == [0, 1, 1]
    rows = downloads(rcfg)
    assert [(r["dt"], r["attempt"], r["status"], r["http_status"]) for r in rows] == [
        (day(0), 1, "http_error", 503), (day(1), 2, "http_error", 503), (day(2), 3, "ok", 200)]
    # The delay doubles: 1 h after the first try, 2 h after the second; none after success.
    assert rows[0]["next_attempt_at"] - rows[0]["attempted_at"] == timedelta(hours=1)
    assert rows[1]["next_attempt_at"] - rows[1]["attempted_at"] == timedelta(hours=2)
    assert rows[2]["next_attempt_at"] is None
    assert calls == {"30": 3}


def test_a_retry_due_within_the_same_day_waits_for_a_later_run(fake_mastodon, rcfg):
    calls = serve_images(fake_mastodon, [40], lambda h, sid: FakeMastodon.send(h, 503, b"down", "text/plain"))
    scrape(rcfg, fake_mastodon.url, TAG, day(0), now=at(0))
    again = scrape(rcfg, fake_mastodon.url, TAG, day(0), now=at(1))  # due, but its try 1 is in this partition
    assert again["retried"] == 0 and calls == {"40": 1}
    assert [(r["dt"], r["attempt"]) for r in downloads(rcfg)] == [(day(0), 1)]


def test_a_404_is_final(fake_mastodon, rcfg):
    calls = serve_images(fake_mastodon, [50], lambda h, sid: FakeMastodon.send(h, 404, b"gone", "text/plain"))
    scrape(rcfg, fake_mastodon.url, TAG, day(0), now=at(0))
    later = scrape(rcfg, fake_mastodon.url, TAG, day(1), now=at(30))
    assert later["retried"] == 0 and calls == {"50": 1}
    [row] = downloads(rcfg)
    assert row["status"] == "http_error" and row["http_status"] == 404 and row["next_attempt_at"] is None


def test_max_attempts_is_honoured(fake_mastodon, rcfg):
    rcfg.scrape.max_attempts = 2
    calls = serve_images(fake_mastodon, [60], lambda h, sid: FakeMastodon.send(h, 503, b"down", "text/plain"))
    for n in range(4):
        scrape(rcfg, fake_mastodon.url, TAG, day(n), now=at(n))
    assert calls == {"60": 2}
    rows = downloads(rcfg)
    assert [(r["attempt"], r["next_attempt_at"] is None) for r in rows] == [(1, False), (2, True)]
    assert "try 2 of scrape.max_attempts = 2: final" in rows[1]["error"]


def test_a_downloads_table_from_before_tries_were_counted_gains_the_columns(fake_mastodon, rcfg):
    from deltalake import write_deltalake

    from pipeline.core.tables import delta_schema, location

    storage = LocalStorage(rcfg.storage.root)
    old = pa.schema([f for f in delta_schema("downloads") if f.name not in ("attempt", "next_attempt_at")])
    uri, options = location(storage, "downloads")
    write_deltalake(uri, pa.Table.from_pylist([{
        "source": "mastodon", "post_id": "1", "url": "http://127.0.0.1:9/x.jpg", "status": "timeout",
        "http_status": None, "error": "old", "bytes": 0, "elapsed_ms": 1.0, "attempts": 5, "sha256": None,
        "attempted_at": T0 - timedelta(days=9), "dt": day(-9)}], schema=old), partition_by=["dt"],
        storage_options=options)
    serve_images(fake_mastodon, [70], lambda h, sid: FakeMastodon.send(h, 503, b"down", "text/plain"))
    scrape(rcfg, fake_mastodon.url, TAG, day(0), now=at(0))
    rows = {r["post_id"]: r for r in downloads(rcfg)}
    assert rows["1"]["attempt"] is None and rows["1"]["next_attempt_at"] is None  # an old row: never retried
    assert rows["70"]["attempt"] == 1 and rows["70"]["next_attempt_at"] is not None


def test_bluesky_puts_the_did_back_into_a_stored_image_url():
    from pipeline.core.pseudonym import author_keyer
    from pipeline.scrape.sources.base import Source
    from pipeline.scrape.sources.bluesky import BlueskySource

    did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
    src = BlueskySource("https://bsky.social", client=None, author_key=author_keyer("K", {"K": "k"}),
                        identifier="a", app_password="b")
    stored = "https://cdn.bsky.app/img/feed_fullsize/plain/_/bafkreib@jpeg"
    assert src.retry_url("p", stored, f"at://{did}/app.bsky.feed.post/3k") == (
        f"https://cdn.bsky.app/img/feed_fullsize/plain/{did}/bafkreib@jpeg")
    assert src.retry_url("p", stored, None) is None  # no reference: cannot be recovered
    assert Source.retry_url(src, "p", "https://cdn.example/a/b.jpg") == "https://cdn.example/a/b.jpg"


def test_a_mastodon_url_with_the_handle_blanked_is_read_back_from_the_status(fake_mastodon, rcfg):
    healthy = {"now": False}

    def image(h):
        if healthy["now"]:
            return ok(h, 7)
        FakeMastodon.send(h, 503, b"down", "text/plain")

    fake_mastodon.faults["alice/1.jpg"] = image
    fake_mastodon.statuses = [{**post(fake_mastodon, 7), "account": {
        "uri": "https://x/users/alice", "username": "alice", "acct": "alice", "followers_count": 3},
        "media_attachments": [{"type": "image", "url": f"{fake_mastodon.url}/fault/alice/1.jpg"}]}]
    scrape(rcfg, fake_mastodon.url, TAG, day(0), now=at(0))
    healthy["now"] = True
    later = scrape(rcfg, fake_mastodon.url, TAG, day(1), now=at(1))
    assert later["retried"] == 1 and later["downloads"] == {"ok": 1}
    assert "/api/v1/statuses/7" in [p for _, p in fake_mastodon.log]
    rows = downloads(rcfg)
    assert [(r["url"], r["attempt"], r["status"]) for r in rows] == [
        (f"{fake_mastodon.url}/fault/_/1.jpg", 1, "http_error"), (f"{fake_mastodon.url}/fault/_/1.jpg", 2, "ok")]
    assert "alice" not in repr(rows)

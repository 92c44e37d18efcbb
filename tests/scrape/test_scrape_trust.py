"""Hostile servers on loopback: credentials stay with their origin, malformed URLs become
rows, and an over-long server wait ends the run with its state saved instead of hanging."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pipeline.core.pseudonym import author_keyer
from pipeline.core.storage import LocalStorage
from pipeline.core.tables import get_json, read_table
from pipeline.scrape.download import Downloader
from pipeline.scrape.http import HttpClient
from pipeline.scrape.scrape import scrape, state_key
from pipeline.scrape.sources.mastodon import MastodonSource
from pipeline.scrape.ssrf import BlockedURL, SSRFGuard
from tests.fixtures.scrape import FakeMastodon, jpeg_bytes

TOKEN = "tok-0123456789"


@pytest.fixture
def other_origin():
    srv = FakeMastodon()
    yield srv
    srv.close()


def test_a_redirect_to_another_origin_drops_the_token(fake_mastodon, other_origin, scrape_cfg):
    other_origin.media["x.jpg"] = jpeg_bytes()
    fake_mastodon.faults["hop"] = lambda h: FakeMastodon.send(h, 302, b"", "text/plain",
                                                              {"Location": f"{other_origin.url}/media/x.jpg"})
    with HttpClient(scrape_cfg.scrape) as client:
        res = client.fetch(f"{fake_mastodon.url}/fault/hop", headers={"Authorization": f"Bearer {TOKEN}"})
    assert res.ok and res.final_url == f"{other_origin.url}/media/x.jpg"
    assert fake_mastodon.auth == [("/fault/hop", f"Bearer {TOKEN}")]
    assert other_origin.auth == [("/media/x.jpg", None)]


def test_a_redirect_within_the_origin_keeps_the_token(fake_mastodon, scrape_cfg):
    fake_mastodon.media["x.jpg"] = jpeg_bytes()
    fake_mastodon.faults["hop"] = lambda h: FakeMastodon.send(h, 302, b"", "text/plain", {"Location": "/media/x.jpg"})
    with HttpClient(scrape_cfg.scrape) as client:
        assert client.fetch(f"{fake_mastodon.url}/fault/hop", headers={"Authorization": f"Bearer {TOKEN}"}).ok
    assert [a for _, a in fake_mastodon.auth] == [f"Bearer {TOKEN}"] * 2


def test_the_api_token_never_reaches_a_redirected_timeline_host(fake_mastodon, other_origin, scrape_cfg):
    """The timeline URL answers 302 to another server, which serves an empty page."""
    other = other_origin.url

    def route(h, orig=fake_mastodon.route):
        if h.path.startswith("/api/v1/timelines/tag/"):
            return FakeMastodon.send(h, 302, b"", "text/plain", {"Location": f"{other}{h.path}"})
        return orig(h)

    fake_mastodon.route = route
    with HttpClient(scrape_cfg.scrape) as client:
        src = MastodonSource(fake_mastodon.url, client, author_key=author_keyer("K", {"K": "k"}), token=TOKEN)
        page = src.read_page(src.page_url("selfie"), "selfie")
    assert page.items == []
    assert all(auth is None for _, auth in other_origin.auth) and other_origin.auth
    # The instance's robots.txt is asked for without credentials, as any host's is.
    assert all(auth == f"Bearer {TOKEN}" for path, auth in fake_mastodon.auth if path != "/robots.txt")
    assert all(auth is None for path, auth in fake_mastodon.auth if path == "/robots.txt")


@pytest.mark.parametrize("url", ["http://[::1/x.jpg", "http://127.0.0.1:99999/x.jpg", "http://[zz::1]/x.jpg"])
def test_a_malformed_media_url_is_a_row(scrape_cfg, tmp_path, url):
    d = Downloader(scrape_cfg.scrape, LocalStorage(tmp_path / "s"))
    try:
        row = d.fetch("p1", url).download
    finally:
        d.close()
    assert row["status"] == "bad_url" and url in row["error"]


def test_a_malformed_redirect_location_is_a_row(fake_mastodon, scrape_cfg):
    fake_mastodon.faults["bad"] = lambda h: FakeMastodon.send(h, 302, b"", "text/plain", {"Location": "http://[::1/y"})
    with HttpClient(scrape_cfg.scrape) as client:
        res = client.fetch(f"{fake_mastodon.url}/fault/bad")
    assert res.status == "bad_url" and "malformed redirect Location" in res.error


@pytest.mark.timeout(60)  # a hang is the failure this guards against
@pytest.mark.parametrize("headers", [
    {"Retry-After": str(60 * 365 * 86400)},  # a year
    {"Retry-After": "Fri, 01 Jan 2100 00:00:00 GMT"},
    {"X-RateLimit-Reset": "2100-01-01T00:00:00Z"},
])
def test_a_wait_far_in_the_future_ends_the_fetch_at_once(fake_mastodon, scrape_cfg, headers):
    fake_mastodon.faults["later"] = lambda h: FakeMastodon.send(h, 429, b"{}", "application/json", headers)
    with HttpClient(scrape_cfg.scrape) as client:
        res = client.fetch(f"{fake_mastodon.url}/fault/later")  # no total budget, like an API page
        again = client.fetch(f"{fake_mastodon.url}/fault/later")  # the host stays closed: no hang either
    assert res.status == "http_error" and res.retry_after_s > 86400
    assert "retry after" in res.error and "max_server_wait_s" in res.error
    assert again.status == "http_error" and again.retry_after_s > 86400


@pytest.mark.timeout(120)
def test_a_rate_limited_scrape_keeps_what_it_read_and_saves_its_state(fake_mastodon, scrape_cfg):
    """Page 1 is served, then the instance asks for a wait of a day: the run ends, not hangs."""
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)  # today's run starts at the newest page
    fake_mastodon.statuses = [
        {"id": str(100 - i), "created_at": base.isoformat(), "reblog": None, "favourites_count": i,
         "reblogs_count": 0, "replies_count": 0, "tags": [{"name": "selfie"}], "visibility": "public",
         "account": {"uri": f"https://x/users/u{i}", "followers_count": 10, "discoverable": True},
         "media_attachments": [{"type": "image", "url": f"{fake_mastodon.url}/media/{i}.jpg"}]}
        for i in range(12)
    ]
    for i in range(12):
        fake_mastodon.media[f"{i}.jpg"] = jpeg_bytes(seed=i)
    orig = fake_mastodon.route

    def route(h):
        if h.path.startswith("/api/v1/timelines/tag/") and "max_id" in h.path:
            return FakeMastodon.send(h, 429, b"{}", "application/json", {"Retry-After": "86400"})
        return orig(h)

    fake_mastodon.route = route
    scrape_cfg.scrape.backfill_days = 30
    summary = scrape(scrape_cfg, fake_mastodon.url, "selfie", datetime.now(UTC).date().isoformat())
    assert summary["kept"] == 5 and summary["stopped"].startswith("rate limited:") and "retry after" in summary["stopped"]
    storage = LocalStorage(scrape_cfg.storage.root)
    assert read_table(storage, "posts").num_rows == 5
    assert get_json(storage, state_key(fake_mastodon.url, "selfie"))["intervals"]


def test_guard_refuses_ipv4_hidden_in_ipv6():
    guard = SSRFGuard()
    for ip in ("2002:7f00:1::1", "2002:a9fe:a9fe::1", "64:ff9b::a00:1", "::ffff:127.0.0.1"):
        with pytest.raises(BlockedURL):
            guard.check_ip(ip)
    guard.check_ip("2002:808:808::1")  # 6to4 of a public address is public


def test_the_limiter_keys_on_the_host(fake_mastodon, scrape_cfg):
    fake_mastodon.media["x.jpg"] = jpeg_bytes()
    port = fake_mastodon.url.rsplit(":", 1)[1]
    with HttpClient(scrape_cfg.scrape) as client:
        assert client.fetch(f"http://user@127.0.0.1:{port}/media/x.jpg").ok
        assert set(client.limiter._hosts) == {"127.0.0.1"}




# ------------------------------------------------------------------ no handles in any table


def test_no_handle_or_post_url_reaches_the_posts_row():
    from tests.scrape.test_source_mastodon import STATUS, norm

    status = {**STATUS, "media_attachments": [{
        **STATUS["media_attachments"][0], "url": "https://media.example/accounts/Gargron/@Gargron/original/1.jpg"}]}
    post = norm(status).post
    row = post.row()
    assert "post_url" not in row and "fetch_urls" not in row
    assert row["image_urls"] == ["https://media.example/accounts/_/_/original/1.jpg"]
    assert post.fetch_urls == ["https://media.example/accounts/Gargron/@Gargron/original/1.jpg"]
    assert "gargron" not in repr(row).lower()


def test_a_handle_in_an_image_url_is_fetched_but_never_stored(fake_mastodon, scrape_cfg):
    fake_mastodon.media["alice/1.jpg"] = jpeg_bytes()
    fake_mastodon.statuses = [{
        "id": "7", "created_at": "2026-11-01T00:00:00Z", "reblog": None, "favourites_count": 1,
        "reblogs_count": 0, "replies_count": 0, "tags": [{"name": "selfie"}],
        "url": f"{fake_mastodon.url}/@alice/7",
        "account": {"uri": "https://x/users/alice", "username": "alice", "acct": "alice", "followers_count": 3},
        "media_attachments": [{"type": "image", "url": f"{fake_mastodon.url}/media/alice/1.jpg"},
                              {"type": "image", "url": f"{fake_mastodon.url}/media/alice/missing.jpg"}],
    }]
    scrape_cfg.scrape.max_images_per_post = 2
    scrape(scrape_cfg, fake_mastodon.url, "selfie", "2026-11-02")
    assert "/media/alice/1.jpg" in [p for p, _ in fake_mastodon.auth]  # the real URL was fetched
    storage = LocalStorage(scrape_cfg.storage.root)
    for table in ("posts", "downloads", "images", "engagement"):
        text = repr(read_table(storage, table).to_pylist())
        assert "alice" not in text, table
    downloads = {r["url"]: r for r in read_table(storage, "downloads").to_pylist()}
    assert downloads[f"{fake_mastodon.url}/media/_/1.jpg"]["status"] == "ok"
    assert downloads[f"{fake_mastodon.url}/media/_/missing.jpg"]["status"] == "http_error"


@pytest.mark.parametrize("account, skipped", [
    ({"noindex": True}, True), ({"discoverable": False}, True), ({"indexable": False}, True),
    ({"noindex": False, "discoverable": True, "indexable": None}, False),
])
def test_opt_outs_are_honoured_and_counted(account, skipped):
    from tests.scrape.test_source_mastodon import STATUS, norm

    item = norm({**STATUS, "account": {**STATUS["account"], **account}})
    assert (item.skip == "opted_out") is skipped and (item.post is None) is skipped


@pytest.mark.parametrize("value, kept", [
    ("noai", False), ("noimageai", False), ("otherbot: noindex, NoAI", False), ("noindex", True), (None, True),
])
def test_x_robots_tag_opt_out_keeps_no_bytes(fake_mastodon, scrape_cfg, tmp_path, value, kept):
    headers = {"X-Robots-Tag": value} if value else {}
    fake_mastodon.faults["img"] = lambda h: FakeMastodon.send(h, 200, jpeg_bytes(), "image/jpeg", headers)
    storage = LocalStorage(tmp_path / "s")
    d = Downloader(scrape_cfg.scrape, storage)
    try:
        got = d.fetch("p1", f"{fake_mastodon.url}/fault/img")
    finally:
        d.close()
    assert (got.download["status"] == "ok") is kept and (got.image is not None) is kept
    if not kept:
        assert got.download["status"] == "opted_out" and "X-Robots-Tag" in got.download["error"]
        assert not list((tmp_path / "s").rglob("*"))  # no image bytes written


def test_a_malformed_attachment_url_keeps_the_post_and_still_hides_the_handle():
    from tests.scrape.test_source_mastodon import STATUS, norm

    status = {**STATUS, "media_attachments": [{**STATUS["media_attachments"][0], "url": "http://[::1/Gargron/1.jpg"}]}
    post = norm(status).post
    assert post.image_urls == ["http://[::1/_/1.jpg"]

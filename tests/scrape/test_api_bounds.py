"""API calls are bounded, against hostile servers on loopback: a body larger than
``scrape.max_api_bytes`` is refused while streaming, a body dripped in is cut at
``scrape.api_total_timeout_s``, and a ``Link: rel=next`` to another origin is not followed.
Each ends the crawl task with a named error in its summary, what it read kept and its state saved."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.core import keys
from pipeline.core.pseudonym import author_keyer
from pipeline.core.storage import LocalStorage
from pipeline.core.tables import get_json, read_table
from pipeline.scrape.http import HttpClient
from pipeline.scrape.scrape import merge_summaries, scrape, state_key
from pipeline.scrape.sources.base import CrossOriginLink, ResponseTooLarge, ResponseTooSlow
from pipeline.scrape.sources.mastodon import MastodonSource
from tests.fixtures.scrape import FakeMastodon, jpeg_bytes

TAG = "selfie"
BIG = 25 * 1024 * 1024  # 25 MB


def statuses(server: FakeMastodon, first_id: int, n: int) -> list[dict]:
    """``n`` image posts, newest first, ids counting down from ``first_id``, images on ``server``."""
    created = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0).isoformat()
    out = []
    for i in range(n):
        sid = first_id - i
        server.media[f"{sid}.jpg"] = jpeg_bytes(seed=sid)
        out.append({"id": str(sid), "created_at": created, "reblog": None, "favourites_count": i,
                    "reblogs_count": 0, "replies_count": 0, "tags": [{"name": TAG}],
                    "account": {"uri": f"https://x/users/u{sid}", "followers_count": 10},
                    "media_attachments": [{"type": "image", "url": f"{server.url}/media/{sid}.jpg"}]})
    return out


def json_array_of(size: int) -> bytes:
    """A well-formed JSON array (of one long string) of ``size`` bytes."""
    return b'["' + b"x" * (size - 4) + b'"]'


def drip_forever(sent: list[int]):
    """Headers at once, then one body byte every 0.5 s for a minute: each read is quick, the whole is not."""

    def handle(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "120")
        h.end_headers()
        try:
            for _ in range(120):
                h.wfile.write(b" ")
                h.wfile.flush()
                sent[0] += 1
                time.sleep(0.5)
        except OSError:  # the client hung up: what this test wants
            h.close_connection = True

    return handle


def send_big_page(h):
    try:
        FakeMastodon.send(h, 200, json_array_of(BIG))
    except OSError:  # the client hung up: what these tests want
        h.close_connection = True


def older_pages(fake: FakeMastodon, handle):
    """Route the timeline's second page (a ``max_id`` request) to ``handle``; the first is served."""
    orig = fake.route

    def route(h):
        if h.path.startswith("/api/v1/timelines/tag/") and "max_id" in h.path:
            return handle(h)
        return orig(h)

    fake.route = route


def today() -> str:
    return datetime.now(UTC).date().isoformat()


@pytest.fixture
def api_cfg(scrape_cfg):
    scrape_cfg.scrape.backfill_days = 30  # walk past the first page
    scrape_cfg.scrape.api_total_timeout_s = 2.0
    scrape_cfg.scrape.read_timeout_s = 15.0  # longer than the budget: the budget must cut the read
    return scrape_cfg


def assert_first_page_kept_and_covered(cfg, fake: FakeMastodon, ids: list[str]):
    storage = LocalStorage(cfg.storage.root)
    assert sorted(read_table(storage, "posts")["post_id"].to_pylist()) == sorted(ids)
    state = get_json(storage, state_key(fake.url, TAG))
    assert state["intervals"] == [[min(ids, key=int), max(ids, key=int)]]


# ------------------------------------------------------------------ the client


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunked", [False, True])
def test_a_25_mb_json_body_is_refused(fake_mastodon, api_cfg, chunked):
    sent = [0]

    def big(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        if chunked:  # no Content-Length: the limit must hold while streaming
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Content-Length", str(BIG))
        h.end_headers()
        body, block = json_array_of(BIG), 256 * 1024
        try:
            for i in range(0, BIG, block):
                piece = body[i:i + block]
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent[0] += len(piece)
            if chunked:
                h.wfile.write(b"0\r\n\r\n")
        except OSError:
            h.close_connection = True

    fake_mastodon.faults["big"] = big
    url = f"{fake_mastodon.url}/fault/big"
    with HttpClient(api_cfg.scrape) as client:
        res = client.fetch_api(url)
    limit = api_cfg.scrape.max_api_bytes
    assert limit == 8 * 1024 * 1024
    assert res.status == "too_large" and res.body is None and str(limit) in res.error and url in res.error
    assert res.body_bytes <= limit + 64 * 1024  # abandoned as soon as it passed the limit
    time.sleep(0.5)
    assert sent[0] < BIG  # the client hung up before the server could send it all


@pytest.mark.timeout(60)
def test_a_body_dripped_one_byte_per_half_second_is_cut_at_the_deadline(fake_mastodon, api_cfg):
    sent = [0]
    fake_mastodon.faults["drip"] = drip_forever(sent)
    with HttpClient(api_cfg.scrape) as client:
        res = client.fetch_api(f"{fake_mastodon.url}/fault/drip")
    assert res.status == "timeout" and res.over_budget and "total timeout of 2 s" in res.error
    # 2 s of a byte per 0.5 s is 4-5 bytes; a client that held on would have taken up to 120.
    assert res.body_bytes <= 6
    time.sleep(1.5)  # the server notices the hang-up on its next writes
    assert sent[0] <= 10


# ------------------------------------------------------------------ the crawl task


@pytest.mark.timeout(120)
def test_a_too_large_page_ends_the_task_with_its_state_saved(fake_mastodon, api_cfg):
    fake_mastodon.statuses = statuses(fake_mastodon, 100, 12)
    older_pages(fake_mastodon, send_big_page)
    summary = scrape(api_cfg, fake_mastodon.url, TAG, today())
    assert summary["stopped"].startswith("ResponseTooLarge: ")
    assert "scrape.max_api_bytes = 8388608" in summary["stopped"] and "max_id=96" in summary["stopped"]
    assert summary["kept"] == 5 and summary["downloads"] == {"ok": 5}
    assert_first_page_kept_and_covered(api_cfg, fake_mastodon, ["100", "99", "98", "97", "96"])
    storage = LocalStorage(api_cfg.storage.root)
    [run] = storage.list(keys.scrape_runs(today()))  # the run log says why too
    assert get_json(storage, run)["stopped"] == summary["stopped"]
    merged = merge_summaries([summary])  # what the DAG's run logs and returns
    assert merged["stopped"] == {f"mastodon {fake_mastodon.url} #{TAG}": summary["stopped"]}


@pytest.mark.timeout(120)
def test_a_dripped_page_ends_the_task_at_its_deadline_with_its_state_saved(fake_mastodon, api_cfg):
    sent = [0]
    fake_mastodon.statuses = statuses(fake_mastodon, 100, 12)
    older_pages(fake_mastodon, drip_forever(sent))
    summary = scrape(api_cfg, fake_mastodon.url, TAG, today())
    assert summary["stopped"].startswith("ResponseTooSlow: ")
    assert "scrape.api_total_timeout_s = 2 s" in summary["stopped"]
    assert summary["kept"] == 5
    assert_first_page_kept_and_covered(api_cfg, fake_mastodon, ["100", "99", "98", "97", "96"])
    assert sent[0] <= 10  # cut at the deadline, not when the server was done


@pytest.fixture
def other_origin():
    srv = FakeMastodon()
    yield srv
    srv.close()


@pytest.mark.timeout(120)
def test_a_cross_origin_next_link_is_not_followed(fake_mastodon, other_origin, api_cfg):
    """The instance's first page links its next page to another server, which serves posts of its own."""
    fake_mastodon.statuses = statuses(fake_mastodon, 100, 5)
    other_origin.statuses = statuses(other_origin, 50, 5)
    orig = fake_mastodon.route

    def route(h):
        if h.path.startswith("/api/v1/timelines/tag/"):
            body = json.dumps(fake_mastodon.statuses).encode()
            link = f'<{other_origin.url}/api/v1/timelines/tag/{TAG}?limit=5&max_id=96>; rel="next"'
            return FakeMastodon.send(h, 200, body, headers={"Link": link})
        return orig(h)

    fake_mastodon.route = route
    summary = scrape(api_cfg, fake_mastodon.url, TAG, today())
    assert summary["stopped"].startswith("CrossOriginLink: ") and other_origin.url in summary["stopped"]
    assert not other_origin.requests_to("/api/")  # never asked
    assert_first_page_kept_and_covered(api_cfg, fake_mastodon, ["100", "99", "98", "97", "96"])


def test_a_same_origin_next_link_is_followed(fake_mastodon, api_cfg):
    fake_mastodon.statuses = statuses(fake_mastodon, 100, 8)
    with HttpClient(api_cfg.scrape) as client:
        src = MastodonSource(fake_mastodon.url, client, author_key=author_keyer("K", {"K": "k"}), page_limit=5)
        page = src.read_page(src.page_url(TAG), TAG)
    assert page.stop_error is None and page.next_url.startswith(fake_mastodon.url)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault, error", [
    (send_big_page, ResponseTooLarge),
    ("drip", ResponseTooSlow),
])
def test_the_source_raises_the_named_error_naming_url_and_limit(fake_mastodon, api_cfg, fault, error):
    fake_mastodon.faults["page"] = drip_forever([0]) if fault == "drip" else fault
    url = f"{fake_mastodon.url}/fault/page"
    with HttpClient(api_cfg.scrape) as client:
        src = MastodonSource(fake_mastodon.url, client, author_key=author_keyer("K", {"K": "k"}))
        with pytest.raises(error) as exc:
            src.get_json(url)
    assert exc.value.url == url and url in str(exc.value) and exc.value.limit in str(exc.value)


def test_a_bluesky_url_off_the_service_is_refused_by_name(api_cfg):
    from pipeline.scrape.sources.bluesky import BlueskySource

    with HttpClient(api_cfg.scrape) as client:
        src = BlueskySource("http://127.0.0.1:9", client, author_key=author_keyer("K", {"K": "k"}),
                            identifier="a", app_password="b")
        with pytest.raises(CrossOriginLink, match="not a URL of http://127.0.0.1:9"):
            src.get_json("http://127.0.0.1:10/xrpc/app.bsky.feed.searchPosts")

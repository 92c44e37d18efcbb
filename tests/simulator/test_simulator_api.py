"""The simulator's Mastodon API over real HTTP: entity shapes, paging, clock, rate limit, CLI."""

from __future__ import annotations

import io
import math
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from email.utils import parsedate_to_datetime

import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from simulator import RateLimit, truth_table
from simulator.entities import media_path
from simulator.ratelimit import RateLimiter
from simulator.world import DAY_MS

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
NULL = type(None)

# Mastodon's documented entities (https://docs.joinmastodon.org/entities/): key -> allowed types.
STATUS = {
    "id": str, "created_at": str, "in_reply_to_id": (str, NULL), "in_reply_to_account_id": (str, NULL),
    "sensitive": bool, "spoiler_text": str, "visibility": str, "language": (str, NULL), "uri": str,
    "url": (str, NULL), "replies_count": int, "reblogs_count": int, "favourites_count": int,
    "edited_at": (str, NULL), "content": str, "reblog": (dict, NULL), "application": (dict, NULL),
    "account": dict, "media_attachments": list, "mentions": list, "tags": list, "emojis": list,
    "card": (dict, NULL), "poll": (dict, NULL),
}
ACCOUNT = {
    "id": str, "username": str, "acct": str, "display_name": str, "locked": bool, "bot": bool,
    "discoverable": (bool, NULL), "indexable": bool, "group": bool, "created_at": str, "note": str,
    "url": str, "uri": str, "avatar": str, "avatar_static": str, "header": str, "header_static": str,
    "followers_count": int, "following_count": int, "statuses_count": int, "last_status_at": (str, NULL),
    "hide_collections": (bool, NULL), "noindex": (bool, NULL), "emojis": list, "fields": list, "roles": list,
}
MEDIA = {
    "id": str, "type": str, "url": str, "preview_url": (str, NULL), "remote_url": (str, NULL),
    "meta": dict, "description": (str, NULL), "blurhash": (str, NULL),
}
TAG = {"name": str, "url": str}


def check_shape(obj: dict, spec: dict, what: str) -> None:
    missing = set(spec) - set(obj)
    assert not missing, f"{what} lacks {sorted(missing)}"
    for key, types in spec.items():
        assert isinstance(obj[key], types) and not (types is int and isinstance(obj[key], bool)), \
            f"{what}.{key} is {type(obj[key]).__name__}"


def check_status(s: dict) -> None:
    check_shape(s, STATUS, "Status")
    assert s["id"].isdigit() and ISO_MS.match(s["created_at"])
    assert s["visibility"] in ("public", "unlisted", "private", "direct")
    check_shape(s["account"], ACCOUNT, "Account")
    assert s["account"]["id"].isdigit() and ISO_MS.match(s["account"]["created_at"])
    for m in s["media_attachments"]:
        check_shape(m, MEDIA, "MediaAttachment")
        assert m["type"] in ("image", "video", "gifv", "audio", "unknown")
        assert m["meta"]["original"]["width"] > 0 and m["meta"]["original"]["height"] > 0
        assert len(m["blurhash"]) >= 6
    for t in s["tags"]:
        check_shape(t, TAG, "Tag")
        assert t["url"].endswith("/tags/" + t["name"])
    if s["reblog"] is not None:
        check_status(s["reblog"])
        assert s["media_attachments"] == [] and s["content"] == ""


def parse_links(header: str) -> dict[str, str]:
    return {rel: url for url, rel in re.findall(r'<([^>]+)>; rel="(\w+)"', header)}


def visible_ids(world, now_ms: int, only_media: bool = False) -> list[str]:
    out = []
    for i in world.tag_index["selfie"]:
        p = world.posts[int(i)]
        if p.created_ms <= now_ms and (p.media or not only_media):
            out.append(p.id)
    return sorted(out, key=int, reverse=True)


def walk(session: requests.Session, url: str, params: dict | None = None) -> list[dict]:
    """Follow rel="next" until an empty page."""
    seen: list[dict] = []
    for _ in range(1000):
        r = session.get(url, params=params, timeout=10)
        assert r.status_code == 200, r.text
        page = r.json()
        if not page:
            assert "Link" not in r.headers
            return seen
        seen += page
        url, params = parse_links(r.headers["Link"])["next"], None
    raise AssertionError("paging did not end")


def walk_prev(session: requests.Session, url: str, params: dict) -> list[dict]:
    """Follow rel="prev" (min_id) until an empty page; returns newest first."""
    got: list[dict] = []
    for _ in range(1000):
        r = session.get(url, params=params, timeout=10)
        page = r.json()
        if not page:
            return got
        got = page + got
        url, params = parse_links(r.headers["Link"])["prev"], None
    raise AssertionError("paging did not end")


def test_entity_shapes(sim_server):
    s = requests.Session()
    r = s.get(f"{sim_server.url}/api/v1/timelines/tag/selfie", params={"limit": 40})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    statuses = r.json()
    assert len(statuses) == 40
    for st in statuses:
        check_status(st)
    one = s.get(f"{sim_server.url}/api/v1/statuses/{statuses[0]['id']}").json()
    check_status(one)
    assert one["id"] == statuses[0]["id"]
    acct = s.get(f"{sim_server.url}/api/v1/accounts/{statuses[0]['account']['id']}").json()
    check_shape(acct, ACCOUNT, "Account")
    assert s.get(f"{sim_server.url}/api/v1/statuses/1").status_code == 404
    assert s.get(f"{sim_server.url}/api/v1/accounts/1").json() == {"error": "Record not found"}


def test_all_kinds_appear_and_boosts_nest(sim_server):
    statuses = walk(requests.Session(), f"{sim_server.url}/api/v1/timelines/tag/selfie", {"limit": 40})
    boosts = [s for s in statuses if s["reblog"]]
    assert boosts and all(any(t["name"] == "selfie" for t in b["reblog"]["tags"]) for b in boosts)
    types = {m["type"] for s in statuses for m in s["media_attachments"]}
    assert types == {"image", "video"}
    assert any(not s["media_attachments"] and not s["reblog"] for s in statuses)  # text-only


def test_media_files(sim_server):
    s = requests.Session()
    statuses = s.get(f"{sim_server.url}/api/v1/timelines/tag/selfie", params={"limit": 40}).json()
    media = [m for st in statuses for m in st["media_attachments"]]
    seen_types = set()
    for m in media[:10]:
        r = s.get(m["url"])
        assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(r.content)
        seen_types.add(r.headers["Content-Type"])
        if m["type"] == "image":
            with Image.open(io.BytesIO(r.content)) as im:
                assert Image.MIME[im.format] == r.headers["Content-Type"]
                assert im.size == (m["meta"]["original"]["width"], m["meta"]["original"]["height"])
        else:
            assert r.headers["Content-Type"] == "video/mp4" and r.content[4:8] == b"ftyp"
        p = s.get(m["preview_url"])
        with Image.open(io.BytesIO(p.content)) as im:
            assert p.headers["Content-Type"] == "image/jpeg"
            assert im.size == (m["meta"]["small"]["width"], m["meta"]["small"]["height"])
        h = s.head(m["url"])
        assert h.status_code == 200 and h.headers["Content-Length"] == r.headers["Content-Length"] and not h.content
    assert s.get(media[0]["url"]).content == s.get(media[0]["url"]).content
    assert s.get(sim_server.url + "/system/media_attachments/files/000/000/000/000/000/001/original/1.jpg").status_code == 404


@pytest.mark.parametrize("limit", [40, 7])
@pytest.mark.parametrize("only_media", [False, True])
def test_max_id_paging_visits_every_visible_post_once(sim_server, limit, only_media):
    params = {"limit": limit, **({"only_media": "true"} if only_media else {})}
    statuses = walk(requests.Session(), f"{sim_server.url}/api/v1/timelines/tag/selfie", params)
    ids = [s["id"] for s in statuses]
    assert ids == visible_ids(sim_server.world, sim_server.world.now_ms, only_media)
    assert len(ids) == len(set(ids))
    if only_media:
        assert all(s["media_attachments"] for s in statuses)


def test_link_header_format(sim_server):
    r = requests.get(f"{sim_server.url}/api/v1/timelines/tag/selfie", params={"limit": 5, "only_media": "1"})
    page = r.json()
    base = f"{sim_server.url}/api/v1/timelines/tag/selfie"
    assert r.headers["Link"] == (f'<{base}?limit=5&only_media=1&max_id={page[-1]["id"]}>; rel="next", '
                                 f'<{base}?limit=5&only_media=1&min_id={page[0]["id"]}>; rel="prev"')
    default = requests.get(base).json()
    assert len(default) == 20
    assert len(requests.get(base, params={"limit": 500}).json()) == 40
    assert requests.get(f"{sim_server.url}/api/v1/timelines/tag/nosuchtag").json() == []
    assert requests.get(f"{sim_server.url}/api/v1/timelines/tag/SELFIE", params={"limit": 1}).json()[0]["id"] == page[0]["id"]


def test_since_id_and_min_id_return_only_newer(sim_server):
    base = f"{sim_server.url}/api/v1/timelines/tag/selfie"
    all_ids = visible_ids(sim_server.world, sim_server.world.now_ms)
    pivot = all_ids[60]
    newer = all_ids[:60]
    since = requests.get(base, params={"since_id": pivot, "limit": 40}).json()
    assert [s["id"] for s in since] == newer[:40]  # the newest 40 above the pivot
    mins = requests.get(base, params={"min_id": pivot, "limit": 40}).json()
    assert [s["id"] for s in mins] == newer[-40:]  # the 40 just above the pivot, newest first
    # Walking rel="prev" from the pivot reaches the top exactly once each.
    got = walk_prev(requests.Session(), base, {"min_id": pivot, "limit": 25})
    assert [s["id"] for s in got] == newer
    both = requests.get(base, params={"max_id": all_ids[10], "since_id": all_ids[20]}).json()
    assert [s["id"] for s in both] == all_ids[11:20]
    assert requests.get(base, params={"max_id": "abc"}).status_code == 422


def test_clock_advances_posts_and_counts(sim_server):
    s = requests.Session()
    w = sim_server.world
    base = f"{sim_server.url}/api/v1/timelines/tag/selfie"
    before = visible_ids(w, w.now_ms)
    newest = before[0]
    future = next(p for p in w.posts if w.now_ms < p.created_ms < w.now_ms + 5 * DAY_MS)
    assert s.get(f"{sim_server.url}/api/v1/statuses/{future.id}").status_code == 404
    young = next(p for p in reversed(w.posts) if p.created_ms <= w.now_ms and p.kind == "photo"
                 and w.engagement.mu[p.index] > 20)
    likes0 = s.get(f"{sim_server.url}/api/v1/statuses/{young.id}").json()["favourites_count"]
    r0 = s.get(base)
    assert parsedate_to_datetime(r0.headers["Date"]) == sim_server.now

    r = s.post(f"{sim_server.url}/_sim/advance", params={"days": 7})
    assert r.status_code == 200
    assert datetime.fromisoformat(r.json()["now"].replace("Z", "+00:00")) == sim_server.now
    assert (sim_server.now.timestamp() * 1000 - w.now_ms) == 7 * DAY_MS
    assert sim_server.advance(0.5) == sim_server.now
    now_ms = w.now_ms + int(7.5 * DAY_MS)
    new = walk_prev(s, base, {"min_id": newest, "limit": 40})
    assert [x["id"] for x in new] == [i for i in visible_ids(w, now_ms) if int(i) > int(newest)]
    since = s.get(base, params={"since_id": newest, "limit": 40}).json()
    assert [x["id"] for x in since] == [x["id"] for x in new[:40]]
    assert new and future.id in [x["id"] for x in new]
    assert s.get(f"{sim_server.url}/api/v1/statuses/{future.id}").status_code == 200
    likes1 = s.get(f"{sim_server.url}/api/v1/statuses/{young.id}").json()["favourites_count"]
    assert likes1 > likes0
    assert s.post(f"{sim_server.url}/_sim/advance", params={"days": -1}).status_code == 400


def test_rate_limiter_windows_exactly():
    clock = [1000.2]
    rl = RateLimiter(RateLimit(5, 2.0), clock=lambda: clock[0])
    decisions = [rl.hit("a") for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert decisions[-1].reset_at == 1002.0 and decisions[-1].retry_after_s == 2  # ceil(1.8)
    assert rl.hit("b").allowed  # per client
    clock[0] = 1002.0
    assert rl.hit("a").allowed
    headers = dict(decisions[-1].headers())
    assert headers["Retry-After"] == "2" and headers["X-RateLimit-Reset"] == "1970-01-01T00:16:42.000000Z"


def test_rate_limit_answers_429_with_retry_after(sim_server_factory):
    sim = sim_server_factory(rate_limit=RateLimit(5, 2.0))
    s = requests.Session()
    url = f"{sim.url}/api/v1/timelines/tag/selfie"
    statuses = []
    for _ in range(12):
        r = s.get(url, params={"limit": 1})
        statuses.append(r.status_code)
        assert r.headers["X-RateLimit-Limit"] == "5"
        if r.status_code == 429:
            break
    assert statuses[-1] == 429 and statuses.count(200) <= 10
    assert r.json() == {"error": "Too many requests"} and r.headers["X-RateLimit-Remaining"] == "0"
    reset = datetime.fromisoformat(r.headers["X-RateLimit-Reset"].replace("Z", "+00:00")).timestamp()
    retry = int(r.headers["Retry-After"])
    assert retry == max(1, math.ceil(reset - time.time())) or retry == max(1, math.ceil(reset - time.time())) + 1
    assert 1 <= retry <= 2
    # Media files and admin routes are not throttled (nginx serves files in a real instance).
    w = sim.world
    media = next(w.media[m] for p in w.posts if p.created_ms <= w.now_ms for m in p.media)
    assert s.get(sim.url + media_path(media, "original")).status_code == 200
    assert s.get(f"{sim.url}/_sim/health").status_code == 200
    time.sleep(retry)
    r = s.get(url, params={"limit": 1})
    assert r.status_code == 200 and r.headers["X-RateLimit-Remaining"] == "4"


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "likerank.cli.main", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_cli_truth(tmp_path, sim_world):
    out = tmp_path / "truth.parquet"
    r = _cli("sim", "truth", "--seed", "7", "--posts", "300", "--bluesky-share", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert pq.read_table(out).equals(truth_table(sim_world))


def test_cli_serve_advance_and_stop():
    proc = subprocess.Popen([sys.executable, "-m", "likerank.cli.main", "sim", "serve", "--seed", "7", "--posts", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        r = requests.get(f"{url}/api/v1/timelines/tag/selfie", params={"limit": 2}, timeout=10)
        assert r.status_code == 200 and len(r.json()) == 2
        adv = _cli("sim", "advance", "--url", url, "--days", "3")
        assert adv.returncode == 0 and adv.stdout.strip() == "2025-06-05T00:00:00.000Z", adv.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

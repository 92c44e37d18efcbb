"""Bluesky postViews → rows, over a loopback XRPC server serving recorded payloads
(tests/scrape/payloads/bluesky/, shaped like the lexicons' views): skip reasons, follower look-ups, the
session (login, refresh, re-login), rate limits, search paging and re-reads."""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from pipeline.core.crawl_state import id_key
from pipeline.core.pseudonym import author_keyer
from pipeline.core.storage import LocalStorage
from pipeline.scrape.download import Downloader
from pipeline.scrape.http import HttpClient, retry_after_s
from pipeline.scrape.sources.base import (
    SKIP_REASONS,
    OptedOut,
    SourceError,
    SourceRateLimited,
)
from pipeline.scrape.sources.bluesky import (
    APP_PASSWORD_ENV,
    IDENTIFIER_ENV,
    BlueskySource,
    credentials_from_env,
    datetime_to_tid,
    normalize_post,
    sort_time,
    tid_to_datetime,
)
from tests.fixtures.scrape import jpeg_bytes

DATA = Path(__file__).parent / "payloads" / "bluesky"
CDN = "https://cdn.bsky.app"
KEY = author_keyer("LIKERANK_TEST_AUTHOR_KEY", env={"LIKERANK_TEST_AUTHOR_KEY": "s3cret"})
IDENTIFIER = "likerank-research.bsky.social"
PASSWORD = "abcd-efgh-ijkl-mnop"  # an app password's shape
NOW = datetime(2024, 5, 2, tzinfo=UTC)
TAG = "photography"


def load(name: str, cdn: str = CDN) -> dict:
    """A recorded payload, with the CDN's origin swapped for the loopback image server."""
    return json.loads((DATA / name).read_text().replace(CDN, cdn))


# ------------------------------------------------------------------ loopback servers


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionResetError):  # a client that gave up: expected here
            super().handle_error(request, client_address)


class Server:
    """A threaded HTTP server on 127.0.0.1 that hands every request to ``handle``."""

    def __init__(self, handle: Callable[[BaseHTTPRequestHandler, str, dict, bytes], None]):
        class H(BaseHTTPRequestHandler):
            def _any(self):
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                handle(self, parts.path, parse_qs(parts.query), self.rfile.read(length) if length else b"")

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(h: BaseHTTPRequestHandler, status: int, body: bytes | dict, ctype: str = "application/json",
         headers: dict | None = None) -> None:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)


class FakeBluesky:
    """A PDS + AppView: sessions, searchPosts (``until``/``cursor``, newest first by sortAt),
    getProfiles and getPosts over in-memory views. ``faults[nsid]`` holds one-shot handlers."""

    def __init__(self):
        self.posts: list[dict] = []  # the search index
        self.profiles: dict[str, dict] = {}
        self.reread: dict[str, dict] = {}  # uri → the view getPosts returns
        self.requests: list[dict] = []
        self.faults: dict[str, list[Callable[[BaseHTTPRequestHandler], None]]] = {}
        self.max_offset: int | None = None  # no cursor at or past this offset (the search's cap)
        self.refresh_fails = self.login_fails = False
        self.issued: list[str] = []  # every token handed out
        self._access: set[str] = set()
        self._expired: set[str] = set()
        self._refresh: set[str] = set()
        self._n = 0
        self._lock = threading.Lock()
        self.server = Server(self.handle)
        self.url = self.server.url

    def calls(self, nsid: str) -> list[dict]:
        return [r for r in self.requests if r["nsid"] == nsid]

    def expire_access(self) -> None:
        self._expired |= self._access
        self._access.clear()

    def _issue(self) -> dict:
        self._n += 1
        session = load("createSession.json")
        session["accessJwt"] = f"{session['accessJwt']}-{self._n}"
        session["refreshJwt"] = f"{session['refreshJwt']}-{self._n}"
        self._access.add(session["accessJwt"])
        self._refresh.add(session["refreshJwt"])
        self.issued += [session["accessJwt"], session["refreshJwt"]]
        return session

    def handle(self, h, path: str, query: dict, body: bytes) -> None:
        nsid = path.removeprefix("/xrpc/")
        auth = h.headers.get("Authorization")
        bearer = auth.removeprefix("Bearer ") if auth else None
        with self._lock:
            self.requests.append({"nsid": nsid, "query": query, "auth": auth, "at": time.monotonic()})
            fault = self.faults.get(nsid, []).pop(0) if self.faults.get(nsid) else None
        if fault is not None:
            return fault(h)
        if nsid == "com.atproto.server.createSession":
            creds = json.loads(body)
            if self.login_fails or creds != {"identifier": IDENTIFIER, "password": PASSWORD}:
                return send(h, 401, {"error": "AuthenticationRequired", "message": "Invalid identifier or password"})
            return send(h, 200, self._issue())
        if nsid == "com.atproto.server.refreshSession":
            if self.refresh_fails or bearer not in self._refresh:
                return send(h, 400, {"error": "ExpiredToken", "message": "Token has been revoked"})
            self._refresh.discard(bearer)
            return send(h, 200, {k: v for k, v in self._issue().items() if k != "email"})
        if bearer in self._expired:
            return send(h, 400, load("expiredToken.json"))
        if bearer not in self._access:
            return send(h, 401, {"error": "AuthenticationRequired", "message": "Authentication Required"})
        if nsid == "app.bsky.feed.searchPosts":
            return self.search(h, query)
        if nsid == "app.bsky.actor.getProfiles":
            return send(h, 200, {"profiles": [self.profiles[d] for d in query.get("actors", []) if d in self.profiles]})
        if nsid == "app.bsky.feed.getPosts":
            return send(h, 200, {"posts": [self.reread[u] for u in query.get("uris", []) if u in self.reread]})
        send(h, 501, {"error": "MethodNotImplemented", "message": f"{nsid} is not served here"})

    def search(self, h, query: dict) -> None:
        until = query.get("until", [None])[0]
        hits = [p for p in self.posts if until is None or sort_time(p) < datetime.fromisoformat(until.replace("Z", "+00:00"))]
        hits.sort(key=sort_time, reverse=True)
        offset = int(query.get("cursor", ["0"])[0])
        limit = int(query["limit"][0])
        page = hits[offset:offset + limit]
        out: dict = {"hitsTotal": len(hits), "posts": page}
        nxt = offset + limit
        if nxt < len(hits) and (self.max_offset is None or nxt < self.max_offset):
            out["cursor"] = str(nxt)
        send(h, 200, out)


class ImageHost:
    """The CDN: image bytes for any path; remembers each request's Authorization header."""

    def __init__(self):
        self.auth: list[str | None] = []
        self.server = Server(self.handle)
        self.url = self.server.url

    def handle(self, h, path, query, body) -> None:
        self.auth.append(h.headers.get("Authorization"))
        send(h, 200, jpeg_bytes(seed=len(self.auth)), "image/jpeg")


@pytest.fixture
def cdn():
    host = ImageHost()
    yield host
    host.server.close()


@pytest.fixture
def bsky(cdn):
    fake = FakeBluesky()
    fake.posts = load("searchPosts.json", cdn.url)["posts"]
    fake.profiles = {p["did"]: p for p in load("getProfiles.json", cdn.url)["profiles"]}
    fake.reread = {p["uri"]: p for p in load("getPosts.json", cdn.url)["posts"]}
    yield fake
    fake.server.close()


def source(fake: FakeBluesky, scrape_cfg, refs=None, page_limit: int = 100, client: HttpClient | None = None):
    return BlueskySource(fake.url, client or HttpClient(scrape_cfg.scrape), author_key=KEY, identifier=IDENTIFIER,
                         app_password=PASSWORD, refs=refs, page_limit=page_limit, now=lambda: NOW)


RECORDED = load("searchPosts.json")["posts"]
ALICE, BOB, CAROL, DAVE, ERIN = RECORDED
DIDS = [p["author"]["did"] for p in RECORDED]
HANDLES = [p["author"]["handle"] for p in RECORDED]


def pid(view: dict) -> str:
    return f"{view['uri'].rsplit('/', 1)[1]}-{KEY(view['author']['did'])[:8]}"


def clone(i: int, when: datetime, did: str | None = None) -> dict:
    """Alice's image post as another post (and, with ``did``, another author's)."""
    v = copy.deepcopy(ALICE)
    did = did or v["author"]["did"]
    text = json.dumps(v).replace(v["author"]["did"], did).replace(v["author"]["handle"], f"user{i}.bsky.social")
    v = json.loads(text)
    v["uri"] = f"at://{did}/app.bsky.feed.post/{datetime_to_tid(when, 7)}"
    v["record"]["createdAt"] = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    v["indexedAt"] = (when + timedelta(milliseconds=850)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    v["likeCount"] = i
    return v


# ------------------------------------------------------------------ normalization over the recorded page


def test_recorded_page_keeps_image_posts_and_skips_the_rest_with_reasons(bsky, cdn, scrape_cfg):
    pages = list(source(bsky, scrape_cfg).pages("#Photography"))
    assert [len(p.items) for p in pages] == [5, 0]  # the empty page ends the walk
    items = pages[0].items
    assert [it.post_id for it in items] == sorted((pid(v) for v in RECORDED), key=id_key, reverse=True)
    assert {it.post_id: it.skip for it in items} == {
        pid(ALICE): None, pid(BOB): "no_image", pid(CAROL): "video", pid(DAVE): None, pid(ERIN): "opted_out"}
    assert all(it.skip is None or it.skip in SKIP_REASONS for it in items)

    post = items[0].post
    did = ALICE["author"]["did"]
    img = [f"{cdn.url}/img/feed_fullsize/plain/{did}/{cid}@jpeg" for cid in (
        "bafkreibme22gw2h7y2h7tg2fhqotaqjucnbc24deqo72b6mkl2egezxhvy", "bafkreiabcjq2xo4a6pcbplr7ozwqyvj3bxcmsxipw5tqmkgnmzgfbw7l3i")]
    assert post.row() == {
        "source": "bluesky", "instance": bsky.url, "hashtag": "photography", "post_id": pid(ALICE),
        "created_at": datetime(2024, 5, 1, 18, 30, 12, 345000, tzinfo=UTC),
        "author_key": KEY(did), "author_followers": 1530,
        "tags": ["photography", "sunset", "landscape"], "n_tags": 3,
        "likes": 52, "reposts": 7, "replies": 3, "views": None,
        "image_urls": [u.replace(did, "_") for u in img], "sensitive": False, "language": "en", "scraped_at": items[0].post.scraped_at,
    }
    assert post.fetch_urls == img and post.ref == ALICE["uri"]
    assert "ref" not in post.row() and "fetch_urls" not in post.row()
    # Dated by the server's Date header, not the fallback clock.
    assert abs((post.scraped_at - datetime.now(UTC)).total_seconds()) < 60

    dave = next(it.post for it in items if it.post_id == pid(DAVE))  # recordWithMedia: its own image only
    assert len(dave.image_urls) == 1 and "/_/" in dave.image_urls[0]
    assert dave.sensitive is True and dave.language == "en" and dave.author_followers == 12
    # Profiles are read only for the posts that would be kept: Alice's and Dave's, in one call.
    calls = bsky.calls("app.bsky.actor.getProfiles")
    assert [sorted(c["query"]["actors"]) for c in calls] == [sorted([did, DAVE["author"]["did"]])]
    search = bsky.calls("app.bsky.feed.searchPosts")[0]["query"]
    assert search["q"] == ["#photography"] and search["tag"] == ["photography"] and search["sort"] == ["latest"]
    assert search["limit"] == ["100"]


def test_no_did_handle_or_name_reaches_a_row(bsky, scrape_cfg):
    bsky.posts += [clone(i, datetime(2024, 4, 30, tzinfo=UTC) + timedelta(minutes=i), f"did:plc:user{i:021d}")
                   for i in range(3)]
    for i in range(3):
        bsky.profiles[f"did:plc:user{i:021d}"] = dict(bsky.profiles[ALICE["author"]["did"]], did=f"did:plc:user{i:021d}")
    rows = [it.post.row() for p in source(bsky, scrape_cfg).pages(TAG) for it in p.items if it.post]
    assert len(rows) == 5
    forbidden = [*DIDS, *(d.split(":")[-1] for d in DIDS), *HANDLES, *(h.split(".")[0] for h in HANDLES),
                 *(f"did:plc:user{i:021d}" for i in range(3)), *(f"user{i}.bsky" for i in range(3)),
                 "Alice Lens", "Carol", "did%3A"]

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, list | tuple):
            for v in value:
                yield from strings(v)

    for row in rows:
        for text in (s for v in row.values() for s in strings(v)):
            for name in forbidden:
                assert name.lower() not in text.lower(), (name, text)


def test_opt_out_on_the_profile_and_a_missing_profile(bsky, scrape_cfg, caplog):
    bsky.profiles[ALICE["author"]["did"]]["labels"] = [{"val": "!no-unauthenticated", "src": ALICE["author"]["did"]}]
    del bsky.profiles[DAVE["author"]["did"]]
    with caplog.at_level(logging.WARNING):
        items = {it.post_id: it for it in next(source(bsky, scrape_cfg).pages(TAG)).items}
    assert items[pid(ALICE)].skip == "opted_out"
    assert items[pid(DAVE)].skip == "missing_field"
    assert pid(DAVE) in caplog.text and "followersCount" in caplog.text
    assert DAVE["author"]["did"] not in caplog.text and "dave" not in caplog.text.lower()


def test_reposts_other_records_and_malformed_fields():
    def norm(entry):
        return normalize_post(entry, instance="https://bsky.social", hashtag=TAG, author_key=KEY, scraped_at=NOW,
                              profiles={ALICE["author"]["did"]: None})

    repost = {"post": copy.deepcopy(ALICE), "reason": {"$type": "app.bsky.feed.defs#reasonRepost",
                                                       "by": BOB["author"], "indexedAt": "2024-05-01T19:00:00.000Z"}}
    assert norm(repost).skip == "boost"
    assert norm({"post": copy.deepcopy(ALICE)}).skip == "missing_field"  # a plain feed item: a post (no profile here)
    other = copy.deepcopy(ALICE)
    other["record"]["$type"] = "app.bsky.feed.repost"
    assert norm(other).skip == "boost"
    labelled = copy.deepcopy(ALICE)
    labelled["labels"] = [{"src": "did:plc:ar7c4by46qjdydhdevvrndac", "uri": ALICE["uri"], "val": "!no-unauthenticated"}]
    assert norm(labelled).skip == "opted_out"
    no_tid = copy.deepcopy(ALICE)
    no_tid["uri"] = no_tid["uri"].rsplit("/", 1)[0] + "/self"
    assert norm(no_tid) is None and norm({"text": "x"}) is None and norm("not a dict") is None
    external = copy.deepcopy(ALICE)
    external["embed"] = {"$type": "app.bsky.embed.external#view", "external": {
        "uri": "https://example.org/a", "title": "A", "description": "", "thumb": f"{CDN}/img/feed_thumbnail/plain/x/y@jpeg"}}
    assert norm(external).skip == "no_image"


def test_a_post_missing_a_count_is_missing_field(bsky, scrape_cfg, caplog):
    del bsky.posts[0]["likeCount"]
    with caplog.at_level(logging.WARNING):
        items = {it.post_id: it for it in next(source(bsky, scrape_cfg).pages(TAG)).items}
    assert items[pid(ALICE)].skip == "missing_field" and "likeCount" in caplog.text


# ------------------------------------------------------------------ profiles, tokens, sessions


def test_followers_are_read_25_authors_per_call_and_cached(bsky, scrape_cfg):
    base = datetime(2024, 4, 1, tzinfo=UTC)
    bsky.posts = [clone(i, base + timedelta(minutes=i), f"did:plc:author{i:020d}") for i in range(30)]
    bsky.profiles = {f"did:plc:author{i:020d}": dict(load("getProfiles.json")["profiles"][0], did=f"did:plc:author{i:020d}",
                                                    followersCount=100 + i) for i in range(30)}
    src = source(bsky, scrape_cfg)
    posts = [it.post for p in src.pages(TAG) for it in p.items]
    assert len(posts) == 30 and all(p is not None for p in posts)
    assert sorted(p.author_followers for p in posts) == list(range(100, 130))
    assert [len(c["query"]["actors"]) for c in bsky.calls("app.bsky.actor.getProfiles")] == [25, 5]
    list(src.pages(TAG))  # the same authors again: no new look-ups within the run
    assert len(bsky.calls("app.bsky.actor.getProfiles")) == 2


def test_token_goes_to_the_service_only_never_to_the_image_host(bsky, cdn, scrape_cfg, tmp_path):
    client = HttpClient(scrape_cfg.scrape)
    src = source(bsky, scrape_cfg, client=client)
    posts = [it.post for p in src.pages(TAG) for it in p.items if it.post]
    # The stage downloads with the same client: nothing of the session may ride along.
    with Downloader(scrape_cfg.scrape, LocalStorage(tmp_path / "store"), client, source="bluesky") as downloader:
        rows = [downloader.fetch(p.post_id, url, stored).download
                for p in posts for url, stored in zip(p.fetch_urls, p.image_urls, strict=True)]
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert all("/_/" in r["url"] for r in rows)  # the row keeps the blanked URL
    assert cdn.auth and set(cdn.auth) == {None}  # the images and the host's robots.txt and tdmrep.json
    asked = [r for r in bsky.requests if r["nsid"] not in ("/robots.txt", "/.well-known/tdmrep.json")]
    assert all(r["auth"] is None for r in bsky.requests if r not in asked)  # robots.txt: no credentials
    login, *rest = asked
    assert login["nsid"] == "com.atproto.server.createSession" and login["auth"] is None
    assert {r["auth"] for r in rest} == {f"Bearer {bsky.issued[0]}"}
    assert "Authorization" not in client.session().headers


def test_an_expired_token_is_refreshed_once_then_the_request_retried(bsky, scrape_cfg):
    src = source(bsky, scrape_cfg)
    list(src.pages(TAG))
    bsky.expire_access()
    bsky.requests.clear()
    assert len(next(src.pages(TAG)).items) == 5
    assert [r["nsid"] for r in bsky.requests][:3] == [
        "app.bsky.feed.searchPosts", "com.atproto.server.refreshSession", "app.bsky.feed.searchPosts"]
    assert bsky.requests[1]["auth"] == f"Bearer {bsky.issued[1]}"  # the refresh token, to refreshSession only
    assert bsky.requests[2]["auth"] == f"Bearer {bsky.issued[2]}"  # the new access token


def test_a_failed_refresh_logs_in_again_and_a_failed_login_is_a_clear_error(bsky, scrape_cfg):
    src = source(bsky, scrape_cfg)
    list(src.pages(TAG))
    bsky.expire_access()
    bsky.refresh_fails = True
    bsky.requests.clear()
    assert len(next(src.pages(TAG)).items) == 5
    assert [r["nsid"] for r in bsky.requests][:4] == [
        "app.bsky.feed.searchPosts", "com.atproto.server.refreshSession",
        "com.atproto.server.createSession", "app.bsky.feed.searchPosts"]
    bsky.expire_access()
    bsky.login_fails = True
    with pytest.raises(SourceError, match=r"cannot log in to http://127.0.0.1:\d+: .*Invalid identifier or password.*"
                                          + APP_PASSWORD_ENV) as exc:
        next(src.pages(TAG))
    assert PASSWORD not in str(exc.value) and IDENTIFIER not in str(exc.value)


def test_a_refresh_answered_5xx_is_not_retried_and_falls_back_to_a_login(bsky, scrape_cfg):
    src = source(bsky, scrape_cfg)
    list(src.pages(TAG))
    bsky.expire_access()
    bsky.faults["com.atproto.server.refreshSession"] = [lambda h: send(h, 502, b"<html>bad gateway</html>", "text/html")] * 3
    bsky.requests.clear()
    assert len(next(src.pages(TAG)).items) == 5
    assert len(bsky.calls("com.atproto.server.refreshSession")) == 1  # it may have rotated the token
    assert len(bsky.calls("com.atproto.server.createSession")) == 1


def test_a_login_answered_5xx_is_retried(bsky, scrape_cfg):
    bsky.faults["com.atproto.server.createSession"] = [lambda h: send(h, 503, {"error": "InternalServerError"})]
    assert len(next(source(bsky, scrape_cfg).pages(TAG)).items) == 5
    assert len(bsky.calls("com.atproto.server.createSession")) == 2


def test_credentials_never_reach_repr_logs_urls_or_errors(bsky, scrape_cfg, caplog):
    with caplog.at_level(logging.DEBUG):
        src = source(bsky, scrape_cfg)
        pages = list(src.pages(TAG))
        bsky.expire_access()
        bsky.refresh_fails = True
        list(src.pages(TAG))
        bsky.expire_access()
        bsky.login_fails = True
        with pytest.raises(SourceError) as exc:
            next(src.pages(TAG))
    secrets = [PASSWORD, *bsky.issued]
    assert len(bsky.issued) == 4
    shown = "\n".join([caplog.text, repr(src), str(vars(src)), str(exc.value), *(p.url for p in pages),
                       *(str(p.next_url) for p in pages)])
    for secret in secrets:
        assert secret not in shown
    assert repr(src) == f"BlueskySource({bsky.url!r})"
    assert "refresh failed" in caplog.text  # the fallback is logged, without the why's secrets


# ------------------------------------------------------------------ rate limits and bad pages


def test_a_short_rate_limit_wait_is_honoured(bsky, scrape_cfg):
    reset = int(time.time()) + 2  # epoch seconds, as Bluesky sends it: a wait of 1-2 s
    bsky.faults["app.bsky.feed.searchPosts"] = [lambda h: send(
        h, 429, {"error": "RateLimitExceeded", "message": "Rate Limit Exceeded"},
        headers={"RateLimit-Limit": "3000", "RateLimit-Remaining": "0", "RateLimit-Reset": str(reset),
                 "RateLimit-Policy": "3000;w=300"})]
    assert len(next(source(bsky, scrape_cfg).pages(TAG)).items) == 5
    first, second = bsky.calls("app.bsky.feed.searchPosts")[:2]
    assert second["at"] - first["at"] >= 0.9


def test_a_long_rate_limit_wait_ends_the_walk(bsky, scrape_cfg):
    bsky.faults["app.bsky.feed.searchPosts"] = [lambda h: send(
        h, 429, {"error": "RateLimitExceeded", "message": "Rate Limit Exceeded"},
        headers={"RateLimit-Remaining": "0", "RateLimit-Reset": str(int(time.time()) + 3600)})]
    with pytest.raises(SourceRateLimited) as exc:
        next(source(bsky, scrape_cfg).pages(TAG))
    assert 3000 < exc.value.retry_after_s <= 3600
    assert len(bsky.calls("app.bsky.feed.searchPosts")) == 1


def test_an_exhausted_quota_closes_the_host_until_its_reset(bsky, scrape_cfg):
    bsky.faults["app.bsky.feed.searchPosts"] = [lambda h: send(
        h, 200, {"posts": []}, headers={"RateLimit-Remaining": "0", "RateLimit-Reset": str(int(time.time()) + 3600)})]
    src = source(bsky, scrape_cfg)
    assert [len(p.items) for p in src.pages(TAG)] == [0]
    with pytest.raises(SourceRateLimited):
        next(src.pages(TAG))  # not sent: the quota was spent
    assert len(bsky.calls("app.bsky.feed.searchPosts")) == 1


def test_a_5xx_waits_for_retry_after_not_for_the_quota_window(bsky, scrape_cfg):
    # Bluesky sends RateLimit-Reset on every answer: on a 5xx it is the window's end, not the outage's.
    bsky.faults["app.bsky.feed.searchPosts"] = [lambda h: send(
        h, 502, b"<html>bad gateway</html>", "text/html",
        headers={"RateLimit-Remaining": "2900", "RateLimit-Reset": str(int(time.time()) + 3600)})]
    assert len(next(source(bsky, scrape_cfg).pages(TAG)).items) == 5


def test_ratelimit_reset_is_read_as_epoch_or_delay():
    now = datetime(2024, 5, 1, tzinfo=UTC)
    assert retry_after_s({"RateLimit-Reset": str(int(now.timestamp()) + 30)}, now) == 30
    assert retry_after_s({"RateLimit-Reset": "45"}, now) == 45  # the IETF draft's delay form
    assert retry_after_s({"Retry-After": "7", "RateLimit-Reset": "45"}, now) == 7
    assert retry_after_s({"RateLimit-Reset": "soon"}, now) is None


def test_malformed_json_is_retried_then_fails_naming_the_url(bsky, scrape_cfg):
    html = lambda h: send(h, 200, b"<html><body>Service Unavailable</body></html>", "text/html")  # noqa: E731
    bsky.faults["app.bsky.feed.searchPosts"] = [html]
    assert len(next(source(bsky, scrape_cfg).pages(TAG)).items) == 5
    bsky.faults["app.bsky.feed.searchPosts"] = [lambda h: send(h, 200, b'{"posts": [')] * 3  # retries = 2
    with pytest.raises(SourceError, match=r"cannot read http://127.0.0.1:\d+/xrpc/app.bsky.feed.searchPosts\?q=%23photography.*"
                                          r"malformed JSON.*3 attempt"):
        next(source(bsky, scrape_cfg).pages(TAG))
    bsky.faults["app.bsky.feed.searchPosts"] = [lambda h: send(h, 200, {"feed": []})]
    with pytest.raises(SourceError, match=r"searchPosts.*'posts' array"):
        next(source(bsky, scrape_cfg).pages(TAG))


# ------------------------------------------------------------------ paging


def walk(src, max_id=None) -> list[str]:
    return [it.post_id for p in src.pages(TAG, max_id=max_id) for it in p.items]


def test_a_stopped_cursor_is_followed_by_until_below_the_oldest_post(bsky, scrape_cfg):
    base = datetime(2024, 4, 1, tzinfo=UTC)
    bsky.posts = [clone(i, base + timedelta(minutes=i)) for i in range(12)]
    want = sorted((pid(v) for v in bsky.posts), key=id_key, reverse=True)
    bsky.max_offset = 5  # the cursor stops after each page
    assert walk(source(bsky, scrape_cfg, page_limit=5)) == want
    queries = [c["query"] for c in bsky.calls("app.bsky.feed.searchPosts")]
    assert [("cursor" in q, "until" in q) for q in queries] == [(False, False), (False, True), (False, True), (False, True)]
    assert queries[1]["until"] == ["2024-04-01T00:07:00.000Z"]  # the oldest post of page 1 (exclusive)

    bsky.requests.clear()
    bsky.max_offset = 10  # one cursor step, then the stop
    assert walk(source(bsky, scrape_cfg, page_limit=5)) == want
    queries = [c["query"] for c in bsky.calls("app.bsky.feed.searchPosts")]
    assert [("cursor" in q, "until" in q) for q in queries] == [(False, False), (True, False), (False, True), (False, True)]


def test_max_id_pages_below_it_and_max_id_before_a_time(bsky, scrape_cfg):
    base = datetime(2024, 4, 1, tzinfo=UTC)
    bsky.posts = [clone(i, base + timedelta(minutes=i)) for i in range(12)]
    src = source(bsky, scrape_cfg, page_limit=5)
    everything = walk(src)
    assert everything == sorted(everything, key=id_key, reverse=True) and len(everything) == 12
    assert walk(src, max_id=everything[4]) == everything[5:]
    # A day's end: the posts created before it, newest first.
    cut = base + timedelta(minutes=6, seconds=30)
    older = walk(src, max_id=src.max_id_before(cut))
    assert older == [pid(v) for v in sorted(bsky.posts, key=sort_time, reverse=True)
                     if datetime.fromisoformat(v["record"]["createdAt"].replace("Z", "+00:00")) < cut]
    assert len(older) == 7
    # A post created at the very instant is not "before" it.
    assert len(walk(src, max_id=src.max_id_before(base + timedelta(minutes=6)))) == 6
    with pytest.raises(ValueError, match="not a post id"):
        next(src.pages(TAG, max_id="103270115826048975"))


def test_tids_encode_time_and_sort_as_text():
    when = datetime(2024, 5, 1, 18, 30, 12, 345678, tzinfo=UTC)
    tid = datetime_to_tid(when, clock_id=7)
    assert len(tid) == 13 and tid_to_datetime(tid) == when
    assert tid_to_datetime("3jzfcijpj2z2a").year == 2023  # the TID in the atproto spec
    later = datetime_to_tid(when + timedelta(microseconds=1))
    assert tid < later
    with pytest.raises(ValueError):
        tid_to_datetime("self")


# ------------------------------------------------------------------ re-reads


def test_reobserve_reads_through_refs_with_deleted_opted_out_and_missing_refs(bsky, scrape_cfg):
    bsky.reread[ERIN["uri"]] = ERIN
    refs = {pid(v): v["uri"] for v in RECORDED}
    out = dict(source(bsky, scrape_cfg, refs=refs).reobserve([pid(ALICE), pid(CAROL), pid(DAVE), pid(ERIN), "3kaaaaaaaaaa2-00000000"]))
    alice = out[pid(ALICE)]
    assert (alice.source, alice.instance, alice.post_id) == ("bluesky", bsky.url, pid(ALICE))
    assert (alice.likes, alice.reposts, alice.replies, alice.views, alice.author_followers) == (97, 11, 6, None, 1530)
    assert abs((alice.observed_at - datetime.now(UTC)).total_seconds()) < 60
    assert out[pid(DAVE)].likes == 15
    assert out[pid(CAROL)] == "deleted"
    assert out[pid(ERIN)] == OptedOut(KEY(ERIN["author"]["did"]))
    assert "no at:// reference" in out["3kaaaaaaaaaa2-00000000"]
    assert len(bsky.calls("app.bsky.feed.getPosts")) == 1


def test_reobserve_batches_25_uris_per_call(bsky, scrape_cfg):
    base = datetime(2024, 4, 1, tzinfo=UTC)
    views = [clone(i, base + timedelta(minutes=i)) for i in range(30)]
    bsky.reread = {v["uri"]: v for v in views}
    out = dict(source(bsky, scrape_cfg, refs={pid(v): v["uri"] for v in views}).reobserve([pid(v) for v in views]))
    assert sorted(o.likes for o in out.values()) == list(range(30))
    assert [len(c["query"]["uris"]) for c in bsky.calls("app.bsky.feed.getPosts")] == [25, 5]
    assert len(bsky.calls("app.bsky.actor.getProfiles")) == 1  # one author, looked up once


def test_a_rate_limited_reobserve_gives_errors_that_name_no_author(bsky, scrape_cfg):
    bsky.faults["app.bsky.feed.getPosts"] = [lambda h: send(
        h, 429, {"error": "RateLimitExceeded"}, headers={"RateLimit-Reset": str(int(time.time()) + 3600)})]
    refs = {pid(v): v["uri"] for v in (ALICE, DAVE)}
    out = dict(source(bsky, scrape_cfg, refs=refs).reobserve(list(refs)))
    assert set(out) == set(refs)
    for text in out.values():
        assert isinstance(text, str) and "getPosts (2 posts)" in text and "429" in text
        assert not any(did in text for did in DIDS)


# ------------------------------------------------------------------ configuration


def test_credentials_from_env():
    assert credentials_from_env({}) is None
    assert credentials_from_env({IDENTIFIER_ENV: IDENTIFIER, APP_PASSWORD_ENV: PASSWORD}) == (IDENTIFIER, PASSWORD)
    with pytest.raises(ValueError, match=IDENTIFIER_ENV) as exc:
        credentials_from_env({APP_PASSWORD_ENV: PASSWORD})
    assert PASSWORD not in str(exc.value)
    with pytest.raises(ValueError, match=APP_PASSWORD_ENV) as exc:
        credentials_from_env({IDENTIFIER_ENV: IDENTIFIER})
    assert IDENTIFIER not in str(exc.value)


def test_the_service_url_is_normalized_and_checked(scrape_cfg):
    client = HttpClient(scrape_cfg.scrape)
    src = BlueskySource("HTTPS://BSKY.social/", client, author_key=KEY, identifier=IDENTIFIER, app_password=PASSWORD)
    assert src.instance == "https://bsky.social" and src.kind == "bluesky" and src.page_limit == 100
    with pytest.raises(ValueError, match="expected http"):
        BlueskySource("bsky.social", client, author_key=KEY, identifier=IDENTIFIER, app_password=PASSWORD)

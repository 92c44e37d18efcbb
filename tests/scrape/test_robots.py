"""robots.txt (RFC 9309) and TDMRep verdicts, fetched from real HTTP servers on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from pipeline.core.config import load_config
from pipeline.scrape.http import HttpClient
from pipeline.scrape.limiter import HostLimiter
from pipeline.scrape.robots import (
    RobotsPolicy,
    TdmRule,
    client_fetch,
    location_matches,
    parse_tdmrep,
    product_token,
    tdm_header,
    tdm_rule_for,
)
from simulator import start_server
from simulator.entities import media_path
from simulator.politeness import Politeness
from tests.conftest import free_port
from tests.distributed.servers import redis_server

UA = "likerank/0.1 (+https://github.com/likerank/likerank)"


class Site:
    """A loopback HTTP server answering ``routes[path] = (status, body)``; 404 elsewhere.
    ``hits`` counts the requests per path."""

    def __init__(self, routes: dict[str, tuple[int, bytes]]):
        self.routes, self.hits = routes, {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                owner.hits[self.path] = owner.hits.get(self.path, 0) + 1
                status, body = owner.routes.get(self.path, (404, b"not found"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def client(tmp_path) -> Iterator[HttpClient]:
    cfg = load_config(overrides=[f"storage.root={tmp_path}", "scrape.retries=0"])
    cfg.scrape.allow_hosts = ["127.0.0.1"]
    with HttpClient(cfg.scrape) as c:
        yield c


@pytest.fixture
def site() -> Iterator[callable]:
    sites: list[Site] = []

    def make(routes: dict[str, tuple[int, bytes]]) -> Site:
        sites.append(Site(routes))
        return sites[-1]

    yield make
    for s in sites:
        s.close()


ROBOTS = b"""# a site's robots.txt
User-agent: *
Disallow: /private/
Disallow: /*.gif$
Allow: /private/public-

User-agent: otherbot
Disallow: /
"""


@pytest.mark.parametrize("path,allowed", [
    ("/media/a.jpg", True),
    ("/private/a.jpg", False),
    ("/private/public-a.jpg", True),  # the longer Allow wins (RFC 9309 2.2.2)
    ("/media/a.gif", False),  # wildcard and end anchor
    ("/media/a.gif?size=2", True),  # $ anchors the whole path with its query
    ("/", True),
])
def test_robots_rules(site, client, path, allowed):
    s = site({"/robots.txt": (200, ROBOTS)})
    policy = RobotsPolicy(client_fetch(client), UA)
    refusal = policy.robots_refusal(s.url + path)
    assert (refusal is None) is allowed
    if not allowed:
        assert refusal == f"robots.txt of {s.url} disallows {path} for likerank"


def test_robots_is_fetched_once_per_origin(site, client):
    s = site({"/robots.txt": (200, ROBOTS)})
    policy = RobotsPolicy(client_fetch(client), UA)
    for path in ("/a", "/private/b", "/c", "/d.gif"):
        policy.allowed(s.url + path)
    assert s.hits == {"/robots.txt": 1}


def test_a_group_for_likerank_beats_the_star_group(site, client):
    s = site({"/robots.txt": (200, b"User-agent: *\nDisallow: /\n\nUser-agent: likerank\nDisallow: /x\n")})
    policy = RobotsPolicy(client_fetch(client), UA)
    assert policy.allowed(s.url + "/media/1.jpg")
    assert not policy.allowed(s.url + "/x/1.jpg")


@pytest.mark.parametrize("status", [401, 403, 404, 410])
def test_a_4xx_robots_txt_allows_everything(site, client, status):
    s = site({"/robots.txt": (status, b"User-agent: *\nDisallow: /\n")})
    assert RobotsPolicy(client_fetch(client), UA).allowed(s.url + "/private/a.jpg")


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_5xx_robots_txt_disallows_everything(site, client, status):
    s = site({"/robots.txt": (status, b"")})
    refusal = RobotsPolicy(client_fetch(client), UA).robots_refusal(s.url + "/media/a.jpg")
    assert refusal is not None and f"HTTP {status}" in refusal and "unreachable" in refusal


def test_an_unreachable_robots_txt_disallows_everything(client):
    url = f"http://127.0.0.1:{free_port()}/media/a.jpg"  # nothing listens there
    refusal = RobotsPolicy(client_fetch(client), UA).robots_refusal(url)
    assert refusal is not None and "no response" in refusal


def test_crawl_delay_tightens_the_hosts_rate(site, client):
    s = site({"/robots.txt": (200, b"User-agent: likerank\nCrawl-delay: 4\nRequest-rate: 1/2\n")})
    limiter = HostLimiter(5.0, 4)
    policy = RobotsPolicy(client_fetch(client), UA, limiter=limiter)
    assert policy.allowed(s.url + "/a.jpg")
    assert policy.crawl_delay_s(s.url + "/a.jpg") == 4.0  # the longer of the two
    assert limiter._hosts["127.0.0.1"].rps == pytest.approx(0.25)
    assert limiter.acquire("127.0.0.1", None)
    limiter.release("127.0.0.1")
    assert not limiter.acquire("127.0.0.1", time.monotonic() + 1)  # next one in 4 s


def test_no_crawl_delay_leaves_the_rate(site, client):
    s = site({"/robots.txt": (200, ROBOTS)})
    limiter = HostLimiter(5.0, 4)
    policy = RobotsPolicy(client_fetch(client), UA, limiter=limiter)
    assert policy.crawl_delay_s(s.url + "/a.jpg") is None
    assert "127.0.0.1" not in limiter._hosts


def test_robots_and_tdmrep_are_shared_through_redis(site, client):
    s = site({"/robots.txt": (200, ROBOTS), "/.well-known/tdmrep.json": (200, b'[{"location": "/", '
                                                                            b'"tdm-reservation": 1}]')})
    with redis_server() as url:
        shared = redis.Redis.from_url(url)
        first, second = (RobotsPolicy(client_fetch(client), UA, shared=shared) for _ in range(2))
        for policy in (first, second):  # two workers
            assert not policy.allowed(s.url + "/private/a.jpg")
            assert policy.tdm_refusal(s.url + "/a.jpg") is not None
    assert s.hits == {"/robots.txt": 1, "/.well-known/tdmrep.json": 1}


@pytest.mark.parametrize("user_agent,token", [(UA, "likerank"), ("likerank", "likerank"), ("", "*")])
def test_product_token(user_agent, token):
    assert product_token(user_agent) == token


# --------------------------------------------------------------------------- TDMRep


@pytest.mark.parametrize("headers,expected", [
    ({"tdm-reservation": "1"}, True),
    ({"TDM-Reservation": " 1 "}, True),
    ({"tdm-reservation": "0"}, False),
    ({"tdm-reservation": "2"}, None),  # a protocol error: unset
    ({}, None),
])
def test_tdm_header(headers, expected):
    assert tdm_header(headers) is expected


@pytest.mark.parametrize("pattern,path,matches", [
    ("/", "/anything", True),
    ("/images/", "/images/a.jpg", True),
    ("/images/", "/Images/a.jpg", False),  # case-sensitive
    ("/images/*.jpg", "/images/2024/a.jpg", True),
    ("/images/*.jpg$", "/images/a.jpg?w=2", False),
    ("/images/*.jpg$", "/images/a.jpg", True),
    ("/a$", "/ab", False),
    ("/%7Euser/", "/~user/x", True),  # unreserved escapes decode on both sides
    ("/~user/", "/%7euser/x", True),
    ("/a%2Fb", "/a/b", False),  # a reserved character stays escaped
    ("/images/*/thumbs", "/images/x/y/thumbs/1.jpg", True),
])
def test_location_matches(pattern, path, matches):
    assert location_matches(pattern, path) is matches


def test_tdmrep_first_matching_rule_wins_and_bad_rules_are_skipped():
    body = json.dumps([
        {"location": "/public/*", "tdm-reservation": 0},
        {"location": "/", "tdm-reservation": 7},  # protocol error: skipped
        {"location": "/public/", "tdm-reservation": 1},  # after a broader match: never used
        {"location": "/photos/", "tdm-reservation": 1, "tdm-policy": "https://rights.example/p"},
        "not a rule",
    ]).encode()
    rules = parse_tdmrep(body)
    assert rules == [TdmRule("/public/*", False, None), TdmRule("/public/", True, None),
                     TdmRule("/photos/", True, "https://rights.example/p")]
    assert tdm_rule_for(rules, "https://h/public/a.jpg") == rules[0]
    assert tdm_rule_for(rules, "https://h/photos/a.jpg") == rules[2]
    assert tdm_rule_for(rules, "https://h/other") is None
    assert parse_tdmrep(b"{not json") == [] and parse_tdmrep(b'{"location": "/"}') == []


def test_tdm_refusal_from_the_file_and_the_header(site, client):
    s = site({"/.well-known/tdmrep.json": (200, json.dumps([
        {"location": "/photos/*.jpg$", "tdm-reservation": 1, "tdm-policy": "https://rights.example/p"},
        {"location": "/", "tdm-reservation": 0}]).encode())})
    policy = RobotsPolicy(client_fetch(client), UA)
    refusal = policy.tdm_refusal(s.url + "/photos/a.jpg")
    assert refusal == (f"/.well-known/tdmrep.json of {s.url} reserves '/photos/*.jpg$' "
                       f"(policy: https://rights.example/p)")
    assert policy.tdm_refusal(s.url + "/photos/a.png") is None
    assert policy.tdm_refusal(s.url + "/other.jpg", {"tdm-reservation": "1"}) == \
        f"tdm-reservation: 1 on {s.url}/other.jpg"
    # The response's header overrides the file, either way.
    assert policy.tdm_refusal(s.url + "/photos/a.jpg", {"tdm-reservation": "0"}) is None
    assert s.hits == {"/.well-known/tdmrep.json": 1}


def test_no_tdmrep_file_reserves_nothing(site, client):
    s = site({"/.well-known/tdmrep.json": (500, b"")})
    assert RobotsPolicy(client_fetch(client), UA).tdm_refusal(s.url + "/a.jpg") is None


# --------------------------------------------------------------------------- the simulator's signals


def test_the_simulator_serves_robots_and_tdm_signals(client):
    politeness = Politeness(robots_share=0.2, tdm_header_share=0.1, tdm_file_share=0.1)
    with start_server(seed=3, posts=60, politeness=politeness) as sim:
        policy = RobotsPolicy(client_fetch(client), UA)
        verdicts = {"robots": 0, "header": 0, "file": 0, "ok": 0}
        now_ms = sim.world.now_ms
        files = [m for m in sim.world.media if m.type == "image"
                 and sim.world.posts[m.post].created_ms <= now_ms][:80]
        assert files
        for m in files:
            url = sim.url + media_path(m, "original")
            if policy.robots_refusal(url):
                verdicts["robots"] += 1
                assert m.id[-1] in "73"
                continue
            res = client.fetch(url)
            assert res.ok, res.error
            if policy.tdm_refusal(url, res.headers):
                kind = "header" if res.headers.get("tdm-reservation") == "1" else "file"
                verdicts[kind] += 1
                assert m.id[-1] == ("1" if kind == "header" else "0")
            else:
                verdicts["ok"] += 1
        assert all(verdicts.values()), verdicts


def test_the_simulator_has_no_robots_txt_by_default(client):
    with start_server(seed=3, posts=20) as sim:
        assert client.fetch(sim.url + "/robots.txt").http_status == 404
        assert client.fetch(sim.url + "/.well-known/tdmrep.json").http_status == 404


# --------------------------------------------------------------------------- in a scrape


def test_a_scrape_honours_robots_txt_and_tdm_and_says_why(tmp_path, sim_server_factory):
    """robots.txt-disallowed images are never requested; TDM-reserved ones are fetched but not
    kept; both are rows with their reason, counted in the summary."""
    from pipeline.core.storage import LocalStorage
    from pipeline.core.tables import read_table
    from pipeline.scrape.scrape import scrape

    politeness = Politeness(robots_share=0.2, tdm_header_share=0.1, tdm_file_share=0.1)
    sim = sim_server_factory(seed=3, posts=120, politeness=politeness)
    cfg = load_config(env={}, overrides=[f"storage.root={tmp_path / 'data'}", "scrape.allow_hosts=['127.0.0.1']",
                                         "scrape.backfill_days=100000", "scrape.per_host_rps=1000"])
    summary = scrape(cfg, sim.url, "selfie", "2025-06-02")
    rows = read_table(LocalStorage(cfg.storage.root), "downloads").to_pylist()
    by_reason: dict[str | None, list[dict]] = {}
    for r in rows:
        by_reason.setdefault(r["opt_out_reason"], []).append(r)
    assert {"robots", "tdm"} <= set(by_reason), {k: len(v) for k, v in by_reason.items()}
    for r in by_reason["robots"]:
        assert r["status"] == "robots_disallowed" and r["attempts"] == 0 and r["sha256"] is None
        assert "robots.txt of " in r["error"]
    for r in by_reason["tdm"]:
        assert r["status"] == "opted_out" and r["sha256"] is None
        assert "tdm-reservation: 1" in r["error"] or "tdmrep.json" in r["error"]
    assert summary["opt_out_reasons"] == {k: len(v) for k, v in by_reason.items() if k}
    assert {r["status"] for r in by_reason[None]} <= {"ok", "not_image", "decode_error", "bomb"}


def test_an_api_path_robots_txt_disallows_ends_the_task_by_name(fake_mastodon, tmp_path):
    from pipeline.scrape.scrape import scrape

    orig = fake_mastodon.route

    def route(h):
        if h.path == "/robots.txt":
            return fake_mastodon.send(h, 200, b"User-agent: *\nDisallow: /api/v1/timelines/\n", "text/plain")
        return orig(h)

    fake_mastodon.route = route
    cfg = load_config(env={}, overrides=[f"storage.root={tmp_path / 'data'}", "scrape.allow_hosts=['127.0.0.1']"])
    summary = scrape(cfg, fake_mastodon.url, "selfie", "2025-06-02")
    assert summary["stopped"].startswith("RobotsDisallowed") and "disallows /api/v1/timelines/" in summary["stopped"]
    assert summary["pages"] == 0 and fake_mastodon.page_requests == 0

"""The simulator's Bluesky side over real HTTP: sessions, searchPosts paging, views, images, faults, split worlds."""

from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

import pytest
import requests

from simulator import RateLimit, build_world, truth_table
from simulator.bluesky import TID_ALPHABET, at_uri, blob_cid, did_for, tid_value
from simulator.entities import iso_ms, media_path
from simulator.world import DAY_MS

SEED, POSTS, SHARE = 7, 400, 0.4
DID = re.compile(r"^did:plc:[a-z2-7]{24}$")
HANDLE = re.compile(r"^[a-z0-9-]+\.bsky\.sim$")
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SEARCH = "/xrpc/app.bsky.feed.searchPosts"
# sha256 of the seed-11, 200-post world's truth rows (see truth_digest), pinned when worlds gained
# platforms: a world with bluesky_share = 0 must stay exactly that world.
TRUTH_11_200 = "6bd8dcac3f5cb98db9a90f8d569d40c0df97c929c3a3eedc69834110fcf0f9f4"


@pytest.fixture(scope="module")
def world():
    return build_world(seed=SEED, posts=POSTS, bluesky_share=SHARE)


@pytest.fixture
def sim(sim_server_factory, world):
    return sim_server_factory(world)


def login(sim, identifier: str = "tester.bsky.sim") -> tuple[requests.Session, dict]:
    r = requests.post(f"{sim.url}/xrpc/com.atproto.server.createSession",
                      json={"identifier": identifier, "password": "app-password"}, timeout=10)
    assert r.status_code == 200, r.text
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {r.json()['accessJwt']}"
    return s, r.json()


def search(s: requests.Session, sim, **params) -> requests.Response:
    params.setdefault("q", "#selfie")
    return s.get(sim.url + SEARCH, params=params, timeout=10)


def bsky_posts(world, now_ms: int, tag: str = "selfie") -> list[int]:
    """World indices of the Bluesky posts (no reposts) with ``tag`` visible at ``now_ms``, newest first."""
    out = [p.index for p in world.posts
           if world.platform(p.index) == "bluesky" and p.kind != "boost" and tag in p.tags and p.created_ms <= now_ms]
    return out[::-1]


def index_of(world, uri: str) -> int:
    return next(p.index for p in world.posts if p.kind != "boost" and at_uri(world, p.index) == uri)


def truth_digest(table) -> str:
    """The world's digest, without the columns that name the platform. Floats are rounded to 6
    significant digits: numpy's transcendental functions may differ in the last bit between CPUs."""
    rows = table.drop_columns(["platform", "source_id"]).to_pylist()
    rows = [{k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    return hashlib.sha256(json.dumps(rows, default=str, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- identities and sessions


def test_identities_are_well_formed(world):
    bsky = [p for p in world.posts if world.platform(p.index) == "bluesky" and p.kind != "boost"]
    uris = [at_uri(world, p.index) for p in bsky]
    assert len(set(uris)) == len(uris)
    for p, uri in zip(bsky, uris, strict=True):
        did, collection, rkey = uri.removeprefix("at://").split("/")
        assert DID.match(did) and did == did_for(world.accounts[p.author]) and collection == "app.bsky.feed.post"
        assert len(rkey) == 13 and set(rkey) <= set(TID_ALPHABET) and rkey[0] in "234567abcdefghij"  # top bit 0
        value = tid_value(rkey)
        assert value >> 10 == p.created_ms * 1000 and value & 0x3FF == int(p.id) & 0x3FF
    rkeys = [u.rsplit("/", 1)[1] for u in uris]
    assert rkeys == sorted(rkeys)  # TIDs sort as the posts' times do


def test_create_session_and_auth_errors(sim):
    url = f"{sim.url}/xrpc/com.atproto.server.createSession"
    s, sess = login(sim, "alice")
    assert DID.match(sess["did"]) and sess["handle"] == "alice.bsky.sim" and sess["active"] is True
    assert sess["accessJwt"] != sess["refreshJwt"]
    for body in ({"identifier": "", "password": "x"}, {"identifier": "a", "password": ""}, {}):
        r = requests.post(url, json=body, timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "AuthenticationRequired"
    assert requests.get(url, timeout=10).json()["error"] == "InvalidRequest"
    r = requests.get(sim.url + SEARCH, params={"q": "#selfie"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "AuthenticationRequired" and "message" in r.json()
    r = requests.get(sim.url + SEARCH, params={"q": "#selfie"}, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "InvalidToken"
    r = requests.get(sim.url + SEARCH, params={"q": "#selfie"},
                     headers={"Authorization": f"Bearer {sess['refreshJwt']}"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "InvalidToken"
    assert s.get(f"{sim.url}/xrpc/app.bsky.feed.getTimeline", timeout=10).status_code == 501
    r = search(s, sim)
    assert r.status_code == 200 and parsedate_to_datetime(r.headers["Date"]) == sim.now
    assert sim.session_calls() == {"createSession": 4, "refreshSession": 0}  # the refused GET is no call
    # Logging in as a world account gets its identity.
    a = next(a for a in sim.world.accounts if sim.world.account_platform(a.index) == "bluesky")
    _, own = login(sim, did_for(a))
    assert own["did"] == did_for(a) and HANDLE.match(own["handle"])
    assert requests.get(f"{sim.url}/_sim/bluesky", timeout=10).json()["sessions"]["createSession"] == 5


def test_access_token_expires_and_refresh_rotates(sim_server_factory, world):
    sim = sim_server_factory(world, access_ttl_s=0.3)
    s, sess = login(sim)
    assert search(s, sim, limit=1).status_code == 200
    time.sleep(0.4)
    r = search(s, sim, limit=1)
    assert r.status_code == 400 and r.json()["error"] == "ExpiredToken"
    url = f"{sim.url}/xrpc/com.atproto.server.refreshSession"
    r = requests.post(url, headers={"Authorization": f"Bearer {sess['refreshJwt']}"}, timeout=10)
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["did"] == sess["did"] and new["refreshJwt"] != sess["refreshJwt"]
    s.headers["Authorization"] = f"Bearer {new['accessJwt']}"
    assert search(s, sim, limit=1).status_code == 200
    again = requests.post(url, headers={"Authorization": f"Bearer {sess['refreshJwt']}"}, timeout=10)
    assert again.status_code == 400 and again.json()["error"] == "InvalidToken"  # the old one is revoked
    wrong = requests.post(url, headers={"Authorization": f"Bearer {new['accessJwt']}"}, timeout=10)
    assert wrong.status_code == 400 and wrong.json()["error"] == "InvalidToken"
    assert sim.session_calls() == {"createSession": 1, "refreshSession": 3}


# --------------------------------------------------------------------------- searchPosts


def test_search_pages_until_the_cap_then_walks_back_with_until(sim_server_factory, world):
    sim = sim_server_factory(world, max_search_results=30)
    s, _ = login(sim)
    expected = [at_uri(world, i) for i in bsky_posts(world, world.now_ms)]
    assert len(expected) > 60
    got, cursor, pages = [], None, 0
    while True:
        r = search(s, sim, tag="selfie", sort="latest", limit=7, **({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["hitsTotal"] == len(expected)
        got += [p["uri"] for p in body["posts"]]
        pages += 1
        cursor = body.get("cursor")
        if not cursor:
            break
    assert got == expected[:30] and pages == 5  # 7+7+7+7+2: the cursor ends at the cap
    # Walking back: each query starts below the oldest post seen (until is exclusive).
    seen = list(got)
    while True:
        oldest = index_of(world, seen[-1])
        until = iso_ms(world.posts[oldest].created_ms)
        cursor, new = None, []
        while True:
            r = search(s, sim, tag="selfie", limit=100, until=until, **({"cursor": cursor} if cursor else {}))
            body = r.json()
            new += [p["uri"] for p in body["posts"]]
            if not (cursor := body.get("cursor")):
                break
        if not new:
            break
        assert len(new) <= 30
        seen += new
    assert seen == expected
    # Cursors are stable: the same cursor gives the same page, also after the clock moves.
    first = search(s, sim, limit=5).json()
    page2 = search(s, sim, limit=5, cursor=first["cursor"]).json()
    sim.advance(3)
    assert search(s, sim, limit=5, cursor=first["cursor"]).json()["posts"][0]["uri"] == page2["posts"][0]["uri"]
    assert search(s, sim, cursor="!!").json()["error"] == "InvalidRequest"


def test_search_bounds_and_parameters(sim, world):
    s, _ = login(sim)
    expected = bsky_posts(world, world.now_ms)
    hi, lo = expected[10], expected[40]
    since, until = iso_ms(world.posts[lo].created_ms), iso_ms(world.posts[hi].created_ms)
    body = search(s, sim, limit=100, since=since, until=until).json()
    assert [p["uri"] for p in body["posts"]] == [at_uri(world, i) for i in expected[11:41]]
    assert body["hitsTotal"] == 30 and "cursor" not in body
    # A date without a time and an offset other than Z are accepted.
    day = datetime.fromtimestamp(world.posts[hi].created_ms / 1000, tz=UTC).replace(hour=0, minute=0, second=0,
                                                                                   microsecond=0)
    r = search(s, sim, limit=100, since=day.strftime("%Y-%m-%d"),
               until=(day + timedelta(days=1)).astimezone(timezone(timedelta(hours=2))).isoformat())
    posts = r.json()["posts"]
    assert r.status_code == 200 and posts
    assert all(p["record"]["createdAt"].startswith(day.strftime("%Y-%m-%d")) for p in posts)
    # Several tags must all match; q's #tokens act as tags; other words match the text.
    tags = search(s, sim, q="*", tag=["selfie", "summer"], limit=100).json()["posts"]
    assert tags and all({"selfie", "summer"} <= set(p_tags(p)) for p in tags)
    assert [p["uri"] for p in search(s, sim, q="#selfie #summer", limit=100).json()["posts"]] == \
        [p["uri"] for p in tags]
    words = search(s, sim, q="coffee first", limit=100).json()["posts"]
    assert words and all(p["record"]["text"].startswith("Coffee first") for p in words)
    assert search(s, sim, q="#nosuchtag").json() == {"hitsTotal": 0, "posts": []}
    assert len(search(s, sim).json()["posts"]) == 25
    for bad in ({"limit": 101}, {"limit": 0}, {"since": "yesterday"}, {"sort": "random"}):
        r = search(s, sim, **bad)
        assert r.status_code == 400 and r.json()["error"] == "InvalidRequest", bad
    r = s.get(sim.url + SEARCH, params={"tag": "selfie"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "InvalidRequest"  # q is required
    # Only posts created by the world's clock; advancing it shows new ones.
    newest = search(s, sim, limit=1).json()["posts"][0]
    assert newest["uri"] == at_uri(world, expected[0])
    sim.advance(5)
    later = bsky_posts(world, world.now_ms + 5 * DAY_MS)
    assert len(later) > len(expected)
    assert search(s, sim, limit=1).json()["posts"][0]["uri"] == at_uri(world, later[0])


def p_tags(view: dict) -> list[str]:
    rec = view["record"]
    return rec.get("tags", []) + [f["features"][0]["tag"] for f in rec["facets"]]


# --------------------------------------------------------------------------- views


def all_views(s: requests.Session, sim) -> list[dict]:
    views, cursor = [], None
    while True:
        body = search(s, sim, limit=100, **({"cursor": cursor} if cursor else {})).json()
        views += body["posts"]
        if not (cursor := body.get("cursor")):
            return views


def test_post_views_shapes_and_counts(sim, world):
    s, _ = login(sim)
    views = all_views(s, sim)
    assert len(views) == len(bsky_posts(world, world.now_ms))
    embeds: dict[str, int] = {}
    for v in views:
        i = index_of(world, v["uri"])
        p, a = world.posts[i], world.accounts[world.posts[i].author]
        likes, reposts, replies = world.counts(i, sim._state.now_ms)
        assert (v["likeCount"], v["repostCount"], v["replyCount"], v["quoteCount"]) == (likes, reposts, replies, 0)
        assert v["cid"].startswith("bafyrei") and v["labels"] == [] and ISO_MS.match(v["indexedAt"])
        assert v["indexedAt"] > v["record"]["createdAt"]
        author = v["author"]
        assert author["did"] == did_for(a) and HANDLE.match(author["handle"]) and author["displayName"]
        assert ISO_MS.match(author["createdAt"])
        opted_out = not (a.discoverable and a.indexable)
        assert [x["val"] for x in author["labels"]] == (["!no-unauthenticated"] if opted_out else [])
        for label in author["labels"]:
            assert label["src"] == author["did"] and label["uri"] == f"at://{author['did']}/app.bsky.actor.profile/self"
        rec = v["record"]
        assert rec["$type"] == "app.bsky.feed.post" and rec["createdAt"] == iso_ms(p.created_ms)
        assert rec["langs"] == [p.language] and sorted(p_tags(v)) == sorted(p.tags)
        text = rec["text"].encode()
        for f in rec["facets"]:
            assert f["features"][0]["$type"] == "app.bsky.richtext.facet#tag"
            assert text[f["index"]["byteStart"]:f["index"]["byteEnd"]].decode() == "#" + f["features"][0]["tag"]
        assert rec["facets"][0]["features"][0]["tag"] == p.tags[0]  # the world's hashtag is in the text
        kind = v.get("embed", {}).get("$type", "none")
        embeds[kind] = embeds.get(kind, 0) + 1
        if p.kind == "text":
            assert "embed" not in v and "embed" not in rec
        elif p.kind == "video":
            e = v["embed"]
            assert kind == "app.bsky.embed.video#view" and rec["embed"]["$type"] == "app.bsky.embed.video"
            assert e["cid"] == rec["embed"]["video"]["ref"]["$link"] and e["playlist"].endswith("/playlist.m3u8")
            r = requests.get(e["thumbnail"], timeout=10)
            assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
        else:
            media = v["embed"]["media"] if kind == "app.bsky.embed.recordWithMedia#view" else v["embed"]
            rec_media = rec["embed"]["media"] if kind == "app.bsky.embed.recordWithMedia#view" else rec["embed"]
            assert media["$type"] == "app.bsky.embed.images#view" and rec_media["$type"] == "app.bsky.embed.images"
            assert len(media["images"]) == len(p.media) == len(rec_media["images"])
            for img, blob, mi in zip(media["images"], rec_media["images"], p.media, strict=True):
                m = world.media[mi]
                cid = blob["image"]["ref"]["$link"]
                assert cid == blob_cid(m) and cid.startswith("bafkrei")
                assert img["fullsize"] == f"{sim.url}/img/feed_fullsize/plain/{author['did']}/{cid}@jpeg"
                assert img["thumb"] == f"{sim.url}/img/feed_thumbnail/plain/{author['did']}/{cid}@jpeg"
                assert img["aspectRatio"] == blob["aspectRatio"] == {"width": m.plan.width, "height": m.plan.height}
                assert img["alt"] == (m.description or "")
            if kind == "app.bsky.embed.recordWithMedia#view":
                quoted = v["embed"]["record"]
                assert quoted["$type"] == "app.bsky.embed.record#view"
                assert quoted["record"]["$type"] == "app.bsky.embed.record#viewRecord"
                assert quoted["record"]["uri"] == rec["embed"]["record"]["record"]["uri"]
                assert index_of(world, quoted["record"]["uri"]) < i  # an earlier post
                assert quoted["record"]["value"]["$type"] == "app.bsky.feed.post"
    assert embeds.get("app.bsky.embed.recordWithMedia#view", 0) >= 2, embeds
    assert embeds.get("app.bsky.embed.video#view") and embeds.get("none") and embeds.get("app.bsky.embed.images#view")
    # Counts follow the world's clock.
    sim.advance(10)
    later = {v["uri"]: v for v in all_views(s, sim)}
    for uri in [v["uri"] for v in views[:20]]:
        likes, _, _ = world.counts(index_of(world, uri), world.now_ms + 10 * DAY_MS)
        assert later[uri]["likeCount"] == likes


def test_get_posts(sim, world):
    s, _ = login(sim)
    url = f"{sim.url}/xrpc/app.bsky.feed.getPosts"
    visible = bsky_posts(world, world.now_ms)
    future = next(p.index for p in world.posts if world.platform(p.index) == "bluesky" and p.kind != "boost"
                  and p.created_ms > world.now_ms)
    mastodon = next(p.index for p in world.posts if world.platform(p.index) == "mastodon" and p.kind == "photo")
    uris = [at_uri(world, i) for i in visible[:3]]
    asked = [uris[0], at_uri(world, future), "at://did:plc:aaaaaaaaaaaaaaaaaaaaaaaa/app.bsky.feed.post/3lqifc2i7nc5a",
             at_uri(world, mastodon), uris[1], uris[2]]
    body = s.get(url, params={"uris": asked}, timeout=10).json()
    assert [p["uri"] for p in body["posts"]] == uris
    r = s.get(url, params={"uris": [at_uri(world, i) for i in visible[:26]]}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "InvalidRequest"
    assert len(s.get(url, params={"uris": [at_uri(world, i) for i in visible[:25]]}, timeout=10).json()["posts"]) == 25
    assert s.get(url, timeout=10).status_code == 400


def test_get_profiles(sim, world):
    s, _ = login(sim)
    url = f"{sim.url}/xrpc/app.bsky.actor.getProfiles"
    bsky = [a for a in world.accounts if world.account_platform(a.index) == "bluesky"]
    masto = next(a for a in world.accounts if world.account_platform(a.index) == "mastodon")
    assert len(bsky) > 26
    r = s.get(url, params={"actors": [did_for(a) for a in bsky[:26]]}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "InvalidRequest"
    asked = [did_for(a) for a in bsky[:23]] + [did_for(masto), "did:plc:unknownunknownunknownunk"]
    profiles = s.get(url, params={"actors": asked}, timeout=10).json()["profiles"]
    assert [p["did"] for p in profiles] == asked[:23]
    for p, a in zip(profiles, bsky, strict=False):
        assert (p["followersCount"], p["followsCount"], p["displayName"]) == (a.followers, a.following, a.display_name)
        own = sum(1 for q in world.posts if q.author == a.index and q.kind != "boost" and q.created_ms <= world.now_ms)
        assert p["postsCount"] == a.statuses_base + own
        assert ISO_MS.match(p["createdAt"]) and ISO_MS.match(p["indexedAt"]) and HANDLE.match(p["handle"])
        assert bool(p["labels"]) == (not (a.discoverable and a.indexable))
    by_handle = s.get(url, params={"actors": [profiles[0]["handle"]]}, timeout=10).json()["profiles"]
    assert by_handle == profiles[:1]
    assert any(p["labels"] for p in profiles) and any(not p["labels"] for p in profiles)


# --------------------------------------------------------------------------- images


def test_images_are_the_mastodon_routes_bytes_and_get_no_token(sim, world, sim_server_factory):
    # The share-0 world of the same seed has the same attachments, all on Mastodon.
    plain = sim_server_factory(seed=SEED, posts=POSTS)
    s, _ = login(sim)
    views = [v for v in search(s, sim, limit=40).json()["posts"] if "images" in str(v.get("embed"))]
    files = requests.Session()  # image requests carry no credentials
    checked = 0
    for v in views[:4]:
        p = world.posts[index_of(world, v["uri"])]
        media = v["embed"].get("media", v["embed"])
        for img, mi in zip(media["images"], p.media, strict=True):
            m = world.media[mi]
            full, thumb = files.get(img["fullsize"], timeout=10), files.get(img["thumb"], timeout=10)
            assert full.status_code == thumb.status_code == 200
            assert full.content == requests.get(plain.url + media_path(m, "original"), timeout=10).content
            assert thumb.content == requests.get(plain.url + media_path(m, "small"), timeout=10).content
            assert full.headers["Content-Type"] == m.plan.mime and thumb.headers["Content-Type"] == "image/jpeg"
            # A Bluesky post's files are not on the Mastodon route.
            assert requests.get(sim.url + media_path(m, "original"), timeout=10).status_code == 404
            checked += 1
    assert checked >= 4
    assert files.head(views[0]["embed"].get("media", views[0]["embed"])["images"][0]["fullsize"],
                      timeout=10).status_code == 200
    wrong_did = img["fullsize"].replace("did:plc:", "did:plc:x")
    assert files.get(wrong_did, timeout=10).status_code == 404
    assert sim.media_credentials() == {}
    # A client that leaks its token to an image URL is seen.
    s.get(img["thumb"], timeout=10)
    assert sim.media_credentials() == {s.headers["Authorization"]: 1}


# --------------------------------------------------------------------------- faults and rate limits


def test_expired_token_fault_then_refresh(sim):
    s, sess = login(sim)
    sim.set_fault("expired_token", count=1)
    r = search(s, sim, limit=1)
    assert r.status_code == 400 and r.json()["error"] == "ExpiredToken"
    assert search(s, sim, limit=1).json()["error"] == "ExpiredToken"  # the token stays expired
    r = requests.post(f"{sim.url}/xrpc/com.atproto.server.refreshSession",
                      headers={"Authorization": f"Bearer {sess['refreshJwt']}"}, timeout=10)
    assert r.status_code == 200
    s.headers["Authorization"] = f"Bearer {r.json()['accessJwt']}"
    assert search(s, sim, limit=1).status_code == 200
    assert sim.fault_hits("expired_token") == 1
    # Mastodon's API knows no tokens to expire.
    sim.set_fault("expired_token")
    assert requests.get(f"{sim.url}/api/v1/timelines/tag/selfie", timeout=10).status_code == 200


def test_xrpc_faults(sim, world):
    s, _ = login(sim)
    sim.set_fault("error_5xx", count=1)
    r = search(s, sim, limit=1)
    assert r.status_code == 503 and r.json()["error"] == "NotEnoughResources"
    sim.set_fault("html", count=1)
    r = search(s, sim, limit=1)
    assert r.headers["Content-Type"].startswith("text/html")
    sim.set_fault("malformed_json", count=1)
    with pytest.raises(ValueError):
        search(s, sim, limit=1).json()
    sim.set_fault("retry_after", count=1, seconds=120)
    t = time.time()
    r = search(s, sim, limit=1)
    assert r.status_code == 429 and r.json()["error"] == "RateLimitExceeded" and r.headers["Retry-After"] == "120"
    assert t + 119 <= int(r.headers["RateLimit-Reset"]) <= t + 122
    top = search(s, sim, limit=2).json()["posts"]
    ids = [world.posts[index_of(world, v["uri"])].id for v in top]
    sim.set_fault("missing_fields", post_ids=[ids[0]])
    got = search(s, sim, limit=2).json()["posts"]
    assert "author" not in got[0] and "createdAt" not in got[0]["record"]
    assert "author" in got[1] and "createdAt" in got[1]["record"]
    sim.set_fault("missing_fields", post_ids=[ids[1]], fields=["record.embed", "likeCount"])
    got = search(s, sim, limit=2).json()["posts"]
    assert "likeCount" not in got[1] and "embed" not in got[1]["record"] and "likeCount" in got[0]
    sim.clear_faults()
    # A media fault names the post by its world status id.
    photo = next(v for v in search(s, sim, limit=20).json()["posts"] if "images" in str(v.get("embed")))
    other = next(v for v in search(s, sim, limit=20).json()["posts"][::-1] if "images" in str(v.get("embed")))
    sim.set_fault("error_5xx", scope="media", post_ids=[world.posts[index_of(world, photo["uri"])].id], status=502)
    for view, status in ((photo, 502), (other, 200)):
        img = view["embed"].get("media", view["embed"])["images"][0]
        assert requests.get(img["fullsize"], timeout=10).status_code == status
    assert search(s, sim, limit=1).status_code == 200


def test_rate_limit_429_with_ratelimit_reset(sim_server_factory, world):
    sim = sim_server_factory(world, rate_limit=RateLimit(5, 2.0))
    s, _ = login(sim)
    codes = []
    for _ in range(12):
        r = search(s, sim, limit=1)
        codes.append(r.status_code)
        assert r.headers["RateLimit-Limit"] == "5" and r.headers["RateLimit-Policy"] == "5;w=2"
        if r.status_code == 429:
            break
    assert codes[-1] == 429 and codes.count(200) <= 10
    assert r.json()["error"] == "RateLimitExceeded" and r.headers["RateLimit-Remaining"] == "0"
    reset = int(r.headers["RateLimit-Reset"])
    assert 0 <= reset - time.time() <= 2.01
    # Images and admin routes are not throttled; Mastodon clients count in their own windows.
    img = next(v for v in all_views_unthrottled(sim, world))
    assert requests.get(img, timeout=10).status_code == 200
    assert requests.get(f"{sim.url}/_sim/bluesky", timeout=10).status_code == 200
    assert requests.get(f"{sim.url}/api/v1/timelines/tag/selfie", timeout=10).status_code == 200
    time.sleep(max(0.0, reset - time.time()) + 0.05)
    assert search(s, sim, limit=1).status_code == 200


def all_views_unthrottled(sim, world):
    """Fullsize image URLs of the world's visible Bluesky photo posts, computed without the API."""
    for i in bsky_posts(world, world.now_ms):
        p = world.posts[i]
        if p.kind == "photo":
            did = did_for(world.accounts[p.author])
            yield f"{sim.url}/img/feed_fullsize/plain/{did}/{blob_cid(world.media[p.media[0]])}@jpeg"


# --------------------------------------------------------------------------- worlds split by platform


def test_share_zero_is_the_world_from_before_platforms(sim_server_factory):
    zero = build_world(seed=11, posts=200)
    assert truth_digest(truth_table(zero)) == TRUTH_11_200
    assert set(truth_table(zero).column("platform").to_pylist()) == {"mastodon"}
    # The platform draw moves nothing else: a split world is the same world.
    split = build_world(seed=11, posts=200, bluesky_share=SHARE)
    assert truth_digest(truth_table(split)) == TRUTH_11_200
    sim = sim_server_factory(zero)
    s, _ = login(sim)
    assert search(s, sim).json() == {"hitsTotal": 0, "posts": []}
    assert requests.get(f"{sim.url}/_sim/bluesky", timeout=10).json()["accounts"] == 0
    inst = requests.get(f"{sim.url}/api/v1/instance", timeout=10).json()
    assert inst["stats"]["user_count"] == len(zero.accounts)
    with pytest.raises(ValueError):
        sim_server_factory(zero, bluesky_share=0.5)


def test_split_world_serves_disjoint_sets_whose_union_is_every_post(sim, world):
    truth = truth_table(world)
    assert truth.column("platform").to_pylist() == [world.platform(p.index) for p in world.posts]
    share = sum(world.account_platform(a.index) == "bluesky" for a in world.accounts) / len(world.accounts)
    assert 0.25 < share < 0.55
    # Mastodon: walk the tag timeline.
    masto, url, params = [], f"{sim.url}/api/v1/timelines/tag/selfie", {"limit": 40}
    while True:
        page = requests.get(url, params=params, timeout=10).json()
        if not page:
            break
        masto += page
        params = {"limit": 40, "max_id": page[-1]["id"]}
    masto_ids = {st["id"] for st in masto if st["reblog"] is None}
    for st in masto:
        assert world.account_platform(world.account_by_id[st["account"]["id"]]) == "mastodon"
        if st["reblog"]:
            assert world.platform(world.post_by_id[st["reblog"]["id"]]) == "mastodon"
    s, _ = login(sim)
    bsky_ids = {world.posts[index_of(world, v["uri"])].id for v in all_views(s, sim)}
    assert not masto_ids & bsky_ids and masto_ids and bsky_ids
    every = {p.id for p in world.posts if p.kind != "boost" and p.created_ms <= world.now_ms}
    assert masto_ids | bsky_ids == every
    # Each API refuses the other's posts and accounts.
    b = world.posts[world.post_by_id[min(bsky_ids)]]
    assert requests.get(f"{sim.url}/api/v1/statuses/{b.id}", timeout=10).status_code == 404
    assert requests.get(f"{sim.url}/api/v1/accounts/{world.accounts[b.author].id}", timeout=10).status_code == 404
    m = world.post_by_id[min(masto_ids)]
    r = s.get(f"{sim.url}/xrpc/app.bsky.feed.getPosts", params={"uris": [at_uri(world, m)]}, timeout=10)
    assert r.json() == {"posts": []}
    admin = requests.get(f"{sim.url}/_sim/bluesky", timeout=10).json()
    assert admin["posts"] == len(bsky_ids) and admin["accounts"] == round(share * len(world.accounts))

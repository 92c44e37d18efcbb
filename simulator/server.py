"""The simulator's HTTP server: the Mastodon API and Bluesky's XRPC over a generated world, on loopback.

Routes (Mastodon's), serving the world's Mastodon accounts and their statuses only:

* ``GET /api/v1/timelines/tag/:hashtag`` — ``limit``, ``max_id``, ``since_id``, ``min_id``,
  ``only_media``, ``any[]``/``all[]``/``none[]``; newest first; ``Link`` header.
* ``GET /api/v1/statuses/:id``, ``GET /api/v1/accounts/:id``, ``GET /api/v1/instance``.
* ``GET /api/v1/accounts/lookup?acct=<username>`` (also ``<username>@<this host>``; letter case
  ignored, as Mastodon ignores it): the Account, else 404 ``Record not found``.
* ``GET /.well-known/webfinger?resource=acct:<username>@<this host>`` (RFC 7033): the JRD with
  the ActivityPub actor (``rel=self``, the account's ``uri``) and the profile page
  (``http://webfinger.net/rel/profile-page``, its ``url``), else 404.
* ``GET|HEAD /system/media_attachments/files/<id partition>/(original|small)/<id>.<ext>``.
* ``GET|HEAD /robots.txt`` and ``/.well-known/tdmrep.json`` when ``politeness`` is on
  (:mod:`.politeness`; otherwise 404), and ``tdm-reservation: 1`` on the files it picks.

Routes (Bluesky's, on the same port), serving the world's Bluesky accounts and posts only
(bodies: :mod:`.bluesky`); errors are ``{"error": <Name>, "message": ...}``:

* ``POST /xrpc/com.atproto.server.createSession`` (``{"identifier", "password"}``, any
  non-empty pair) and ``POST /xrpc/com.atproto.server.refreshSession`` (``Authorization:
  Bearer <refreshJwt>``). Access tokens expire after ``access_ttl_s`` seconds of real time.
* ``GET /xrpc/com.atproto.identity.resolveHandle?handle=<handle>`` (no session needed, as on a
  real PDS; letter case ignored): ``{"did": ...}``, else 400 ``InvalidRequest`` "Unable to resolve handle".
* With ``Authorization: Bearer <accessJwt>``: ``GET /xrpc/app.bsky.feed.searchPosts`` (``q``,
  ``tag`` (repeatable, all must match), ``since`` (inclusive), ``until`` (exclusive),
  ``sort``, ``lang``, ``author``, ``limit`` 1..100 (25), ``cursor``; newest first; a query
  pages through at most ``max_search_results`` posts, then the cursor ends and a client walks
  back with ``until``), ``GET /xrpc/app.bsky.actor.getProfiles?actors=...`` and ``GET
  /xrpc/app.bsky.feed.getPosts?uris=...`` (at most 25 each).
* ``GET|HEAD /img/(feed_fullsize|feed_thumbnail)/plain/<did>/<blob cid>@jpeg`` (the same bytes
  as the attachment's original and small files) and ``/watch/<did>/<cid>/thumbnail.jpg``.

Only statuses created at or before the world's clock exist; the clock only moves when told
(``POST /_sim/advance?days=N`` or :meth:`SimServer.advance`), so counts are reproducible.
The ``Date`` header carries the world's clock, so a client that dates its observations by
the server's ``Date`` (as it should for a real instance too) gets ages on the world's time.

Admin routes (not Mastodon's, never rate limited): ``GET /_sim/now``, ``POST /_sim/advance``,
``GET|POST|DELETE /_sim/faults`` (body: ``{"mode": ..., "fraction": ..., "post_ids": [...],
"count": N, "scope": ..., <mode parameters>}``; see :mod:`.faults`), ``GET /_sim/health``,
``GET /_sim/bluesky`` (Bluesky accounts, posts and reposts up to the clock, session calls).
Ground truth is never served.

The rate limit, when on, counts Mastodon clients per token or IP (``X-RateLimit-*``) and
XRPC clients per account or IP (``RateLimit-*``), in separate windows.

HTTP/1.1 with keep-alive on a ``ThreadingHTTPServer`` (one daemon thread per connection).
Rendered images are cached in a byte-bounded LRU; each image is rendered once even when
many clients ask for it at the same time.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from simulator import bluesky, entities
from simulator.faults import (
    HTML_ERROR_PAGE,
    FaultError,
    FaultSet,
    bomb_png,
    make_rule,
    truncate_json,
)
from simulator.images import render_image, render_preview
from simulator.politeness import Politeness
from simulator.ratelimit import MASTODON_RATE_LIMIT, RateLimit, RateLimiter
from simulator.timeline import BadParam, TimelineIndex, link_header, parse_query
from simulator.world import DAY_MS, DEFAULT_NOW, World, build_world

log = logging.getLogger(__name__)

JSON_TYPE = "application/json; charset=utf-8"
TDMREP_PATH = "/.well-known/tdmrep.json"
MEDIA_RE = re.compile(r"^/system/media_attachments/files/(?:\d{3}/)+(original|small)/(\d+)\.(jpg|png|mp4)$")
BSKY_IMG_RE = re.compile(r"^/img/(feed_fullsize|feed_thumbnail)/plain/([^/]+)/([a-z2-7]+)@jpeg$")
BSKY_WATCH_RE = re.compile(r"^/watch/([^/]+)/([a-z2-7]+)/(playlist\.m3u8|thumbnail\.jpg)$")
MEDIA_PREFIXES = ("/system/", "/img/", "/watch/")  # file routes: no credentials belong there
#: XRPC error names for 5xx statuses (as @atproto/xrpc names its response types).
XRPC_5XX = {500: "InternalServerError", 501: "MethodNotImplemented", 502: "UpstreamFailure",
            503: "NotEnoughResources", 504: "UpstreamTimeout"}
# A minimal MP4 header (ftyp + free boxes): enough to be recognised as video/mp4 and skipped.
MP4_STUB = (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00\x00\x00\x08free")
STREAM_CHUNK = 64 * 1024


class ImageCache:
    """Byte-bounded LRU of rendered files; renders each key once even under concurrent requests."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._data: OrderedDict[Any, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self._inflight: dict[Any, threading.Lock] = {}

    def get(self, key: Any, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
                return data
            key_lock = self._inflight.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                data = self._data.get(key)
            if data is None:
                data = make()
                with self._lock:
                    if key not in self._data:
                        self._data[key] = data
                        self._size += len(data)
                    while self._size > self.max_bytes and len(self._data) > 1:
                        _, old = self._data.popitem(last=False)
                        self._size -= len(old)
                    self._inflight.pop(key, None)
        return data

    def __len__(self) -> int:
        return len(self._data)


class SimState:
    """Everything a request handler needs; shared by all handler threads."""

    def __init__(self, world: World, rate_limit: RateLimit | None, image_cache_bytes: int,
                 access_ttl_s: float = 7200.0, max_search_results: int = 1000,
                 politeness: Politeness | None = None):
        if max_search_results < 1:
            raise ValueError(f"simulator: max_search_results must be >= 1, got {max_search_results}")
        self.world = world
        self.index = TimelineIndex(world)
        self.bsky = bluesky.BlueskyIndex(world)
        #: Lower-cased username -> account index, Mastodon accounts only (lookup and WebFinger).
        self.mastodon_by_username = {a.username.lower(): a.index for a in world.accounts
                                     if not world.on_bluesky[a.index]}
        self.sessions = bluesky.Sessions(access_ttl_s)
        self.max_search_results = max_search_results
        self.offset_ms = 0
        self.faults = FaultSet()
        #: Host header -> requests that carried an Authorization header (credentials per origin).
        self.credentials_seen: dict[str, int] = {}
        #: Authorization header value -> requests to a file route that carried it (should be none).
        self.media_credentials: dict[str, int] = {}
        self.limiter = RateLimiter(rate_limit) if rate_limit else None
        self.xrpc_limiter = RateLimiter(rate_limit) if rate_limit else None  # Bluesky: its own windows
        self.cache = ImageCache(image_cache_bytes)
        self.politeness = politeness or Politeness()
        self.base = ""  # set once the port is known
        self._lock = threading.Lock()

    @property
    def now_ms(self) -> int:
        return self.world.now_ms + self.offset_ms

    def note_credentials(self, host: str, path: str, value: str) -> None:
        with self._lock:
            self.credentials_seen[host] = self.credentials_seen.get(host, 0) + 1
            if path.startswith(MEDIA_PREFIXES):
                self.media_credentials[value] = self.media_credentials.get(value, 0) + 1

    def advance(self, days: float) -> int:
        if not days >= 0:
            raise ValueError(f"advance: days must be >= 0, got {days}")
        with self._lock:
            self.offset_ms += round(days * DAY_MS)
            return self.now_ms


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    server_version = "Mastodon"  # what nginx in front of Mastodon reports
    state: SimState  # set on the subclass made per server

    # ------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if log.isEnabledFor(logging.DEBUG):  # formatting every request costs when nobody reads it
            log.debug("%s %s", self.address_string(), format % args)

    def version_string(self) -> str:
        return self.server_version

    def date_time_string(self, timestamp: float | None = None) -> str:
        # Date is the world's clock (see module docstring).
        return email.utils.formatdate(self.state.now_ms / 1000, usegmt=True)

    def setup(self) -> None:
        super().setup()
        # Small responses go out at once instead of waiting for the peer's delayed ACK (~40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, body: bytes, content_type: str, headers: list[tuple[str, str]] = (),
              head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        # Headers and body in one write (what end_headers + wfile.write would send in two).
        self._headers_buffer.append(b"\r\n")
        if not head:
            self._headers_buffer.append(body)
        self.flush_headers()

    def _json(self, status: int, obj: Any, headers: list[tuple[str, str]] = (), head: bool = False) -> None:
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        self._send(status, body, JSON_TYPE, headers, head)

    def _error(self, status: int, message: str, headers: list[tuple[str, str]] = ()) -> None:
        self._json(status, {"error": message}, headers)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        if auth := self.headers.get("Authorization"):
            self.state.note_credentials(self.headers.get("Host") or "", self.path, auth)
        try:
            url = urlsplit(self.path)
            path, params = url.path, parse_qs(url.query, keep_blank_values=True)
            if path.startswith("/_sim/"):
                self._admin(method, path, params)
            elif path.startswith("/api/"):
                self._api(method, path, params)
            elif path.startswith("/xrpc/"):
                self._xrpc(method, path[len("/xrpc/"):], params)
            elif path == "/.well-known/webfinger":
                self._webfinger(method, params)
            elif path in ("/robots.txt", TDMREP_PATH) and self.state.politeness.active:
                self._site_policy(method, path)
            elif m := MEDIA_RE.match(path):
                self._media(method, m.group(1), m.group(2), m.group(3), params)
            elif m := BSKY_IMG_RE.match(path):
                style = "small" if m.group(1) == "feed_thumbnail" else "original"
                self._bsky_file(method, unquote(m.group(2)), m.group(3), style, video=False)
            elif m := BSKY_WATCH_RE.match(path):
                style = "small" if m.group(3) == "thumbnail.jpg" else "playlist"
                self._bsky_file(method, unquote(m.group(1)), m.group(2), style, video=True)
            else:
                self._send(404, b"Not Found\n", "text/plain; charset=utf-8", head=method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (e.g. it stopped an oversized body)
        except Exception:  # noqa: BLE001 - a bug here must not kill the connection thread silently
            log.exception("simulator: error serving %s", self.path)
            try:
                if self.path.startswith("/xrpc/"):
                    self._json(500, {"error": "InternalServerError", "message": "Internal Server Error"})
                else:
                    self._error(500, "Internal server error")
            except OSError:
                self.close_connection = True

    # ------------------------------------------------------------------ faults shared by API and media

    def _common_faults(self, scope: str, target: str, post_id: str | None, xrpc: bool = False) -> bool:
        """Apply error_5xx / slow / redirects; True when a response was already sent.

        ``xrpc``: answer errors in XRPC's shape (``{"error": Name, "message": ...}``).
        """
        faults = self.state.faults
        if not faults:
            return False
        if rule := faults.fire("error_5xx", scope, target, post_id):
            status = int(rule.params["status"])
            if xrpc:
                self._json(status, {"error": XRPC_5XX.get(status, "InternalServerError"), "message": "Service Unavailable"})
            else:
                self._error(status, "Service Unavailable")
            return True
        if rule := faults.fire("slow", scope, target, post_id):
            time.sleep(float(rule.params["delay_s"]))
        if faults.fire("redirect_loop", scope, target, post_id):
            url = urlsplit(self.path)
            looped = parse_qs(url.query).get("loop") == ["1"]
            location = f"{self.state.base}{url.path}" + ("" if looped else "?loop=1")
            self._send(302, b"", "text/html; charset=utf-8", [("Location", location)])
            return True
        if rule := faults.fire("redirect_private", scope, target, post_id):
            self._send(302, b"", "text/html; charset=utf-8", [("Location", str(rule.params["target"]))])
            return True
        host = (self.headers.get("Host") or "").split(":")[0]
        if host != "localhost" and (rule := faults.fire("redirect_origin", scope, target, post_id)):
            port = self.server.server_address[1]
            self._send(302, b"", "text/html; charset=utf-8", [("Location", f"http://{rule.params['host']}:{port}{self.path}")])
            return True
        if rule := faults.fire("retry_after", scope, target, post_id):
            seconds = int(rule.params["seconds"])
            if xrpc:
                self._json(429, {"error": "RateLimitExceeded", "message": "Rate Limit Exceeded"},
                           [("Retry-After", str(seconds)), ("RateLimit-Remaining", "0"),
                            ("RateLimit-Reset", str(math.ceil(time.time()) + seconds))])
            else:
                self._json(429, {"error": "Too many requests"}, [("Retry-After", str(seconds))])
            return True
        return False

    # ------------------------------------------------------------------ API

    def _api(self, method: str, path: str, params: dict[str, list[str]]) -> None:
        st = self.state
        rl_headers: list[tuple[str, str]] = []
        if st.limiter is not None:
            client = self.headers.get("Authorization") or self.client_address[0]
            decision = st.limiter.hit(client)
            rl_headers = decision.headers()
            if not decision.allowed:
                self._error(429, "Too many requests", rl_headers)
                return
        if method not in ("GET", "HEAD"):
            self._error(405, "Method not allowed", rl_headers)
            return
        parts = [unquote(p) for p in path.split("/")[1:]]  # api, v1, ...
        status_id = parts[3] if len(parts) == 4 and parts[2] == "statuses" else None
        target = status_id or self.path
        if self._common_faults("api", target, status_id):
            return
        now = st.now_ms
        headers = list(rl_headers)
        if len(parts) == 5 and parts[1:4] == ["v1", "timelines", "tag"]:
            try:
                q = parse_query(parts[4], params)
            except BadParam as exc:
                self._error(422, str(exc), headers)
                return
            page = st.index.select(q, now)
            body = [self._status_json(i, now) for i in page]
            if page:
                first, last = st.world.posts[page[0]].id, st.world.posts[page[-1]].id
                headers.append(("Link", link_header(st.base, parts[4], params, first, last)))
            self._api_body(body, headers, method, None)
        elif status_id is not None:
            i = st.world.post_by_id.get(status_id)
            if i is None or st.world.posts[i].created_ms > now or not st.index.served[i]:
                self._error(404, "Record not found", headers)
                return
            self._api_body(self._status_json(i, now), headers, method, status_id)
        elif parts[1:] == ["v1", "accounts", "lookup"]:
            a = self._local_account(params.get("acct", [""])[-1])
            if a is None:
                self._error(404, "Record not found", headers)
                return
            self._api_body(entities.account(st.world, a, st.base, now), headers, method, None)
        elif len(parts) == 4 and parts[1:3] == ["v1", "accounts"]:
            a = st.world.account_by_id.get(parts[3])
            if a is None or st.world.on_bluesky[a]:
                self._error(404, "Record not found", headers)
                return
            self._api_body(entities.account(st.world, a, st.base, now), headers, method, None)
        elif parts[1:] == ["v1", "instance"]:
            self._api_body(self._instance(), headers, method, None)
        else:
            self._error(404, "Record not found", headers)

    def _local_account(self, acct: str) -> int | None:
        """The Mastodon account named ``username`` or ``username@<this host>`` (any letter case)."""
        username, _, domain = acct.strip().lstrip("@").partition("@")
        if domain and domain.lower() not in self._own_domains():
            return None
        return self.state.mastodon_by_username.get(username.lower())

    def _own_domains(self) -> set[str]:
        """The names this server answers to: its base URL's host:port and the request's Host header."""
        return {urlsplit(self.state.base).netloc.lower(), (self.headers.get("Host") or "").lower()}

    def _webfinger(self, method: str, params: dict[str, list[str]]) -> None:
        """RFC 7033 WebFinger for ``acct:`` resources, as Mastodon answers it."""
        st = self.state
        if method not in ("GET", "HEAD"):
            self._error(405, "Method not allowed")
            return
        resource = params.get("resource", [""])[-1]
        if not resource.startswith("acct:"):
            self._error(400, "resource: expected acct:<username>@<domain>")
            return
        a = self._local_account(resource[len("acct:"):])
        if a is None:
            self._send(404, b"", "application/jrd+json; charset=utf-8", head=method == "HEAD")
            return
        obj = entities.account(st.world, a, st.base, st.now_ms)
        jrd = {"subject": f"acct:{obj['username']}@{urlsplit(st.base).netloc}", "aliases": [obj["url"], obj["uri"]],
               "links": [{"rel": "http://webfinger.net/rel/profile-page", "type": "text/html", "href": obj["url"]},
                         {"rel": "self", "type": "application/activity+json", "href": obj["uri"]}]}
        body = json.dumps(jrd, separators=(",", ":")).encode()
        self._send(200, body, "application/jrd+json; charset=utf-8", head=method == "HEAD")

    def _status_json(self, i: int, now: int) -> dict[str, Any]:
        st = self.state
        obj = entities.status(st.world, i, st.base, now)
        if st.faults:
            post_id = st.world.posts[i].id
            if rule := st.faults.fire("missing_fields", "api", post_id, post_id):
                for name in rule.params["fields"]:
                    obj.pop(name, None)
            if st.faults.fire("bad_media_url", "api", post_id, post_id):
                for m in obj.get("media_attachments") or []:
                    m["url"], m["remote_url"] = f"http://[::1/{m['id']}.jpg", None
        return obj

    def _api_body(self, obj: Any, headers: list[tuple[str, str]], method: str, post_id: str | None) -> None:
        faults = self.state.faults
        head = method == "HEAD"
        if faults:
            if rule := faults.fire("html", "api", post_id or self.path, post_id):
                self._send(int(rule.params["status"]), HTML_ERROR_PAGE, "text/html; charset=utf-8", headers, head)
                return
            body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
            if faults.fire("malformed_json", "api", post_id or self.path, post_id):
                self._send(200, truncate_json(body), JSON_TYPE, headers, head)
                return
            if rule := faults.fire("wrong_content_type", "api", post_id or self.path, post_id):
                self._send(200, body, str(rule.params["content_type"]), headers, head)
                return
        self._json(200, obj, headers, head)

    def _instance(self) -> dict[str, Any]:
        st = self.state
        host = urlsplit(st.base).netloc
        return {
            "uri": host, "title": "likerank simulator", "short_description": "A generated world.",
            "description": "", "email": "", "version": "4.3.0 (compatible; likerank-sim)",
            "urls": {}, "stats": {"user_count": len(st.world.accounts) - len(st.bsky.accounts),
                                  "status_count": st.index.n_served(st.now_ms), "domain_count": 1},
            "languages": ["en"], "registrations": False, "approval_required": False,
            "invites_enabled": False, "configuration": {"statuses": {"max_media_attachments": 4}},
            "rules": [],
        }

    # ------------------------------------------------------------------ media

    def _site_policy(self, method: str, path: str) -> None:
        """``/robots.txt`` or ``/.well-known/tdmrep.json`` of :class:`Politeness`."""
        politeness, head = self.state.politeness, method == "HEAD"
        if path == "/robots.txt":
            self._send(200, politeness.robots_txt().encode(), "text/plain; charset=utf-8", head=head)
        else:
            self._send(200, politeness.tdmrep_json(), JSON_TYPE, head=head)

    def _media(self, method: str, style: str, media_id: str, ext: str, params: dict[str, list[str]]) -> None:
        st = self.state
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            self._send(405, b"", "text/plain; charset=utf-8")
            return
        i = st.world.media_by_id.get(media_id)
        m = st.world.media[i] if i is not None else None
        if m is None or entities.media_path(m, style) != urlsplit(self.path).path:
            self._send(404, b"Not Found\n", "text/plain; charset=utf-8", head=head)
            return
        post = st.world.posts[m.post]
        if post.created_ms > st.now_ms or st.world.on_bluesky[post.author]:  # Bluesky's files are on its CDN
            self._send(404, b"Not Found\n", "text/plain; charset=utf-8", head=head)
            return
        self._media_file(i, style, head)

    def _media_file(self, i: int, style: str, head: bool) -> None:
        """Send attachment ``i``'s file (``style`` original or small) with the media faults."""
        st = self.state
        m = st.world.media[i]
        post = st.world.posts[m.post]
        if st.faults and self._media_faults(m.id, post.id, head):
            return
        if style == "small":
            body, ctype = st.cache.get((i, "small"), lambda: render_preview(m.plan)), "image/jpeg"
        elif m.type == "video":
            body, ctype = MP4_STUB, "video/mp4"
        else:
            body, ctype = st.cache.get((i, "original"), lambda: render_image(m.plan)), m.plan.mime
        if st.faults:
            if rule := st.faults.fire("truncated", "media", m.id, post.id):
                keep = int(len(body) * float(rule.params["keep_fraction"]))
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if not head:
                    self.wfile.write(body[:keep])
                self.close_connection = True
                return
            if rule := st.faults.fire("wrong_content_type", "media", m.id, post.id):
                ctype = str(rule.params["content_type"])
        headers = [("Cache-Control", "public, max-age=31536000, immutable")]
        if st.politeness.tdm_header(m.id):
            headers.append(("tdm-reservation", "1"))
        self._send(200, body, ctype, headers, head)

    def _media_faults(self, media_id: str, post_id: str, head: bool) -> bool:
        st = self.state
        if self._common_faults("media", media_id, post_id):
            return True
        if rule := st.faults.fire("bomb", "media", media_id, post_id):
            self._send(200, bomb_png(int(rule.params["width"]), int(rule.params["height"])), "image/png", head=head)
            return True
        if rule := st.faults.fire("oversized", "media", media_id, post_id):
            size = int(rule.params["size_bytes"])
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if rule.params["declare_length"]:
                self.send_header("Content-Length", str(size))
            else:
                self.send_header("Connection", "close")  # body ends when the connection does
            self.end_headers()
            self.close_connection = True
            if head:
                return True
            chunk = b"\xff\xd8\xff\xe0" + b"\x00" * (STREAM_CHUNK - 4)  # JPEG SOI, then padding
            sent = 0
            while sent < size:
                piece = chunk[: min(STREAM_CHUNK, size - sent)]
                self.wfile.write(piece)
                sent += len(piece)
                chunk = b"\x00" * STREAM_CHUNK
            return True
        return False

    # ------------------------------------------------------------------ Bluesky (XRPC)

    def _bearer(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def _xrpc_error(self, exc: bluesky.XrpcError, headers: list[tuple[str, str]] = ()) -> None:
        self._json(exc.status, exc.body(), headers)

    def _xrpc(self, method: str, nsid: str, params: dict[str, list[str]]) -> None:
        st = self.state
        token = self._bearer()
        # Read the body whatever the answer: bytes left unread would corrupt the next request
        # on this keep-alive connection.
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        headers: list[tuple[str, str]] = []
        if st.xrpc_limiter is not None:
            decision = st.xrpc_limiter.hit(st.sessions.did_of(token) or self.client_address[0])
            headers = decision.xrpc_headers(st.xrpc_limiter.rule.period_s)
            if not decision.allowed:
                self._json(429, {"error": "RateLimitExceeded", "message": "Rate Limit Exceeded"}, headers)
                return
        if self._common_faults("api", self.path, None, xrpc=True):
            return
        try:
            if nsid in ("com.atproto.server.createSession", "com.atproto.server.refreshSession"):
                if method != "POST":
                    raise bluesky.XrpcError(400, "InvalidRequest", f"Incorrect HTTP method ({method}) expected POST")
                st.sessions.note_call(nsid.rsplit(".", 1)[1])
                if nsid.endswith("createSession"):
                    obj = self._create_session(raw)
                else:
                    obj = st.sessions.refresh(token)
                self._api_body(obj, headers, method, None)
                return
            if method not in ("GET", "HEAD"):
                raise bluesky.XrpcError(400, "InvalidRequest", f"Incorrect HTTP method ({method}) expected GET")
            if nsid == "com.atproto.identity.resolveHandle":  # public on a PDS: no session
                self._api_body(self._resolve_handle(params), headers, method, None)
                return
            st.sessions.check(token)
            if st.faults and st.faults.fire("expired_token", "api", self.path):
                st.sessions.expire(token or "")
                raise bluesky.XrpcError(400, "ExpiredToken", "Token has expired")
            now = st.now_ms
            if nsid == "app.bsky.feed.searchPosts":
                q = bluesky.parse_search(params)
                page, cursor, total = st.bsky.search(q, now, st.max_search_results)
                obj = {"hitsTotal": total, "posts": [self._post_view(i, now) for i in page]}
                if cursor:
                    obj["cursor"] = cursor
            elif nsid == "app.bsky.actor.getProfiles":
                actors = self._batch(params, "actors")
                found = (st.bsky.account_by_actor.get(a.lower().lstrip("@")) for a in actors)
                obj = {"profiles": [st.bsky.profile_detailed(a, now) for a in found if a is not None]}
            elif nsid == "app.bsky.feed.getPosts":
                uris = self._batch(params, "uris")
                found = (st.bsky.post_by_uri(u) for u in uris)
                obj = {"posts": [self._post_view(i, now) for i in found
                                 if i is not None and st.world.posts[i].created_ms <= now]}
            else:
                raise bluesky.XrpcError(501, "MethodNotImplemented", "Method Not Implemented")
        except bluesky.XrpcError as exc:
            self._xrpc_error(exc, headers)
            return
        self._api_body(obj, headers, method, None)

    def _resolve_handle(self, params: dict[str, list[str]]) -> dict[str, str]:
        handle = params.get("handle", [""])[-1].strip().lower()
        if not handle:
            raise bluesky.XrpcError(400, "InvalidRequest", 'Params must have the property "handle"')
        a = self.state.bsky.account_by_actor.get(handle)
        if a is None or self.state.bsky.handle[a] != handle:  # a DID is no handle
            raise bluesky.XrpcError(400, "InvalidRequest", "Unable to resolve handle")
        return {"did": self.state.bsky.did[a]}

    def _create_session(self, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise bluesky.XrpcError(400, "InvalidRequest", "Request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bluesky.XrpcError(400, "InvalidRequest", "Input must be an object")
        identifier, password = body.get("identifier"), body.get("password")
        if not isinstance(identifier, str) or not isinstance(password, str) or not identifier or not password:
            raise bluesky.XrpcError(401, "AuthenticationRequired", "Invalid identifier or password")
        did, handle = bluesky.session_identity(self.state.bsky, identifier)
        return self.state.sessions.create(did, handle)

    @staticmethod
    def _batch(params: dict[str, list[str]], name: str) -> list[str]:
        values = params.get(name, []) + params.get(f"{name}[]", [])
        if not values:
            raise bluesky.XrpcError(400, "InvalidRequest", f'Params must have the property "{name}"')
        if len(values) > bluesky.MAX_BATCH:
            raise bluesky.XrpcError(400, "InvalidRequest", f"{name} must not have more than {bluesky.MAX_BATCH} elements")
        return values

    def _post_view(self, i: int, now: int) -> dict[str, Any]:
        st = self.state
        view = st.bsky.post_view(i, st.base, now)
        if st.faults:
            post_id = st.world.posts[i].id
            if rule := st.faults.fire("missing_fields", "api", post_id, post_id):
                for name in rule.params["fields"]:
                    if name == "account":
                        view.pop("author", None)
                    elif name == "created_at":
                        view["record"].pop("createdAt", None)
                    elif name.startswith("record."):
                        view["record"].pop(name[len("record."):], None)
                    else:
                        view.pop(name, None)
        return view

    def _bsky_file(self, method: str, did: str, cid: str, style: str, video: bool) -> None:
        """A file of a Bluesky post's attachment: ``original`` / ``small`` (an image's, or a
        video's preview frame) or ``playlist`` (a video's stub); ``video``: a ``/watch/`` URL."""
        st = self.state
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            self._send(405, b"", "text/plain; charset=utf-8")
            return
        i = st.bsky.media_by_cid.get(cid)
        m = st.world.media[i] if i is not None else None
        post = st.world.posts[m.post] if m is not None else None
        if (m is None or post is None or st.bsky.did.get(post.author) != did or post.created_ms > st.now_ms
                or video != (m.type == "video")):
            self._send(404, b"Not Found\n", "text/plain; charset=utf-8", head=head)
            return
        if style == "playlist":
            if st.faults and self._common_faults("media", m.id, post.id):
                return
            body = b"#EXTM3U\n#EXT-X-VERSION:3\n"  # a stub: videos are never downloaded
            self._send(200, body, "application/vnd.apple.mpegurl", head=head)
            return
        self._media_file(i, style, head)

    # ------------------------------------------------------------------ admin

    def _admin(self, method: str, path: str, params: dict[str, list[str]]) -> None:
        st = self.state
        if path == "/_sim/health":
            self._json(200, {"ok": True})
        elif path == "/_sim/bluesky" and method == "GET":
            n_posts = st.bsky.n_posts(st.now_ms)
            n_all = int(sum(st.world.on_bluesky[st.world.posts[i].author]
                            for i in range(st.index.n_visible(st.now_ms))))
            self._json(200, {"accounts": len(st.bsky.accounts), "posts": n_posts, "reposts": n_all - n_posts,
                             "sessions": st.sessions.calls_snapshot()})
        elif path == "/_sim/now" and method == "GET":
            self._json(200, {"now": entities.iso_ms(st.now_ms)})
        elif path == "/_sim/advance" and method == "POST":
            try:
                days = float(params.get("days", ["1"])[-1])
                now = st.advance(days)
            except ValueError as exc:
                self._error(400, str(exc))
                return
            self._json(200, {"now": entities.iso_ms(now)})
        elif path == "/_sim/faults":
            if method == "GET":
                self._json(200, {"faults": [r.to_json() for r in st.faults.rules()], "hits": st.faults.hits})
            elif method == "DELETE":
                st.faults.clear(params.get("mode", [None])[-1])
                self._json(200, {"faults": [r.to_json() for r in st.faults.rules()]})
            elif method == "POST":
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    spec = json.loads(self.rfile.read(length) or b"{}")
                    if spec.get("clear"):
                        st.faults.clear(spec.get("mode"))
                        self._json(200, {"faults": [r.to_json() for r in st.faults.rules()]})
                        return
                    rule = make_rule(**spec)
                except (ValueError, TypeError, FaultError) as exc:
                    self._error(400, f"bad fault rule: {exc}")
                    return
                st.faults.set(rule)
                self._json(200, rule.to_json())
            else:
                self._error(405, "Method not allowed")
        else:
            self._error(404, "Not found")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # open keep-alive connections must not block shutdown
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog for benchmark bursts


class SimServer:
    """A running simulator; also a context manager that stops it."""

    def __init__(self, state: SimState, httpd: _Server, thread: threading.Thread):
        self._state, self._httpd, self._thread = state, httpd, thread
        host, port = httpd.server_address[:2]
        self.host, self.port = str(host), int(port)
        self.url = f"http://{self.host}:{self.port}"

    @property
    def world(self) -> World:
        return self._state.world

    @property
    def now(self) -> datetime:
        """The world's current time."""
        return datetime.fromtimestamp(self._state.now_ms / 1000, tz=UTC)

    def advance(self, days: float) -> datetime:
        """Move the world's clock forward: new posts appear, counts grow. Returns the new now."""
        self._state.advance(days)
        return self.now

    def set_fault(self, mode: str, *, fraction: float = 1.0, post_ids: Any = (), count: int | None = None,
                  scope: str | None = None, **params: Any) -> None:
        """Switch a fault mode on (replacing that mode's previous rule); see :mod:`.faults`."""
        self._state.faults.set(make_rule(mode, fraction=fraction, post_ids=post_ids, count=count,
                                         scope=scope, **params))

    def clear_faults(self, mode: str | None = None) -> None:
        self._state.faults.clear(mode)

    def credentials_seen(self) -> dict[str, int]:
        """Host header -> requests that carried credentials: which origins got a token."""
        with self._state._lock:
            return dict(self._state.credentials_seen)

    def media_credentials(self) -> dict[str, int]:
        """Authorization header value -> requests to file routes (Mastodon's or Bluesky's) that carried it.

        Empty when no client sent a token (or any credential) to an image or video URL.
        """
        with self._state._lock:
            return dict(self._state.media_credentials)

    def session_calls(self) -> dict[str, int]:
        """How many ``createSession`` and ``refreshSession`` calls the XRPC side answered."""
        return self._state.sessions.calls_snapshot()

    def fault_hits(self, mode: str) -> int:
        """How many times a mode has fired since the server started."""
        return self._state.faults.hits.get(mode, 0)

    def fault_selects(self, mode: str, target: str) -> bool:
        """Whether the active rule of ``mode`` would pick ``target`` (attachment or status id)."""
        return any(r.mode == mode and r.selects(target) for r in self._state.faults.rules())

    @property
    def cached_images(self) -> int:
        return len(self._state.cache)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def serve_until_stopped(self) -> None:
        """Block until :meth:`stop` is called from another thread (or a signal handler)."""
        self._thread.join()

    def __enter__(self) -> SimServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(world: World | None = None, *, seed: int = 7, posts: int = 5000,
                 hashtags: tuple[str, ...] | list[str] = ("selfie",), now: datetime = DEFAULT_NOW,
                 host: str = "127.0.0.1", port: int = 0, rate_limit: RateLimit | None = None,
                 image_cache_mb: int = 256, bluesky_share: float = 0.0, access_ttl_s: float = 7200.0,
                 max_search_results: int = 1000, politeness: Politeness | None = None) -> SimServer:
    """Start a simulator on ``host:port`` (0 = a free port) in a background thread.

    ``world`` defaults to :func:`build_world(seed, posts, hashtags, now, bluesky_share)`; a
    given world brings its own share (``bluesky_share``, if not 0, must match it).
    ``rate_limit`` is off unless given (``MASTODON_RATE_LIMIT`` is Mastodon's 300 per 5
    minutes) and applies to Mastodon and XRPC clients alike. ``access_ttl_s``: lifetime of
    XRPC access tokens in real seconds (a PDS's is 2 hours); ``max_search_results``: posts one
    ``searchPosts`` query pages through before its cursor ends. ``politeness``: robots.txt
    and TDM signals on a share of the media files (:class:`~simulator.politeness.Politeness`;
    default none).
    """
    if world is None:
        world = build_world(seed, posts, tuple(hashtags), now, bluesky_share)
    elif bluesky_share and bluesky_share != world.params.bluesky_share:
        raise ValueError(f"start_server: bluesky_share={bluesky_share} but the given world has "
                         f"{world.params.bluesky_share}; build the world with that share")
    state = SimState(world, rate_limit, image_cache_mb * 1024 * 1024, access_ttl_s, max_search_results,
                     politeness)
    handler = type("SimHandler", (_Handler,), {"state": state})
    httpd = _Server((host, port), handler)
    bound_host, bound_port = httpd.server_address[:2]
    state.base = f"http://{bound_host}:{bound_port}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"likerank-sim:{bound_port}", daemon=True)
    thread.start()
    return SimServer(state, httpd, thread)


def rate_limit_from_config(requests_per_5_min: int) -> RateLimit | None:
    """``[simulator] rate_limit`` (requests per 5 minutes, 0 = off) as a :class:`RateLimit`."""
    if requests_per_5_min <= 0:
        return None
    return RateLimit(requests_per_5_min, MASTODON_RATE_LIMIT.period_s)


def wait_until_up(url: str, timeout_s: float = 10.0) -> None:
    """Block until ``url`` accepts TCP connections (for servers started in another process)."""
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((parts.hostname, parts.port or 80), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)

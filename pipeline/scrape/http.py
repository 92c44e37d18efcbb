"""One HTTP client for API pages and image downloads: the same politeness and failure policy.

- **Sessions**: one pooled keep-alive ``requests.Session`` per thread (a Session is not
  thread-safe), each mounting an adapter whose connections re-check the SSRF guard on the
  connected peer address.
- **Per host**: a token bucket (``per_host_rps``, burst of one second's worth) and a cap on
  simultaneous requests (``per_host_concurrency``). A 429 or an exhausted
  ``X-RateLimit-Remaining`` / ``RateLimit-Remaining`` closes the host until ``Retry-After`` /
  ``X-RateLimit-Reset`` / ``RateLimit-Reset`` has passed: no request to that host is sent
  before then, from any thread.
- **Retries**: connection errors, timeouts, 5xx and 429 are retried ``retries`` times with
  exponential backoff (``backoff_s``, doubling) and full jitter, or after the server's
  ``Retry-After`` when it gives one. Every other 4xx is final. A 5xx waits for the quota's
  reset only when the quota is exhausted: Mastodon and Bluesky send a reset time on every
  response, and it says when the window ends, not when an outage will.
- **Methods**: GET by default; ``method="POST"`` with ``json_body`` for APIs that log in.
  A request that is not idempotent (``idempotent=False``, the default for anything but GET
  and HEAD) is retried only where the server cannot have acted on it: a connect timeout and
  a 429. A 5xx, a read timeout or a dropped connection may come after the server acted, so
  they are final. A redirect of a request with a body is not followed: the body (a password,
  say) goes only to the URL the caller chose.
- **Timeouts**: ``connect_timeout_s`` and ``read_timeout_s`` per socket operation, and a
  total budget per fetch (every attempt, wait and byte included) checked between reads.
  Bodies are read with ``read1`` so a server that drips bytes cannot stretch one read past
  ``read_timeout_s``.
- **Size**: ``Content-Length`` is checked first, then the decoded body is counted while
  streaming and the transfer is abandoned as soon as it passes ``max_bytes``.
- **Redirects**: followed by hand (at most :data:`MAX_REDIRECTS`), the SSRF guard checking
  each hop before it is requested; a hop back to a URL already visited is a loop. A hop to
  another origin (scheme, host, port) drops the credential headers (:data:`CREDENTIAL_HEADERS`):
  a token is sent only to the origin it was given for.
- **Server waits**: a wait longer than ``max_server_wait_s`` is never slept through: the
  fetch ends ``http_error`` with :attr:`FetchResult.retry_after_s` set, so the caller can say
  when to come back.

A fetch never raises for an item-level failure; it returns a :class:`FetchResult` whose
``status`` is one of ``ok, http_error, timeout, too_large, blocked, bad_url,
connection_error, redirect_loop`` (the ``downloads`` table's vocabulary).
"""

from __future__ import annotations

import email.utils
import json
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from pipeline.core.config import ScrapeConfig
from pipeline.scrape.ssrf import BlockedURL, SSRFGuard, UnresolvableHost

MAX_REDIRECTS = 5
CHUNK = 64 * 1024
#: The most bytes of a 4xx body kept when the caller asks for it (APIs explain errors in JSON).
MAX_ERROR_BODY = 64 * 1024
#: A ``RateLimit-Reset`` below this is a delay in seconds (the IETF draft); above, an epoch
#: time in seconds (Bluesky). 10**9 s is 2001-09-09: no epoch reset is that old, no delay that long.
EPOCH_THRESHOLD_S = 1e9
#: Headers that carry credentials: never sent past a redirect to another origin.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


@dataclass
class FetchResult:
    url: str
    status: str
    http_status: int | None = None
    error: str | None = None
    body: bytes | None = None
    body_bytes: int = 0  # bytes received (also when the transfer was abandoned)
    attempts: int = 0
    elapsed_ms: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)
    final_url: str = ""
    retry_after_s: float | None = None  # set when the server asked for a wait beyond max_server_wait_s

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --------------------------------------------------------------------------- rate limiting


class _Host:
    __slots__ = ("tokens", "stamp", "closed_until", "slots")

    def __init__(self, rps: float, concurrency: int, now: float):
        self.tokens = max(1.0, rps)
        self.stamp = now
        self.closed_until = 0.0
        self.slots = threading.BoundedSemaphore(concurrency)


class HostLimiter:
    """Per-host token bucket, concurrency cap and server-requested pauses (monotonic time)."""

    def __init__(self, rps: float, concurrency: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rps, self.concurrency = rps, concurrency
        self.burst = max(1.0, rps)
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._hosts: dict[str, _Host] = {}

    def _host(self, host: str) -> _Host:
        with self._lock:
            h = self._hosts.get(host)
            if h is None:
                h = self._hosts[host] = _Host(self.rps, self.concurrency, self.clock())
            return h

    def close_until(self, host: str, until: float) -> None:
        """No request to ``host`` before monotonic time ``until``."""
        h = self._host(host)
        with self._lock:
            h.closed_until = max(h.closed_until, until)

    def closed_until(self, host: str) -> float:
        return self._host(host).closed_until

    def acquire(self, host: str, deadline: float | None) -> bool:
        """Take a slot and a token for ``host``; False if ``deadline`` passes first."""
        h = self._host(host)
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        if not h.slots.acquire(timeout=timeout):
            return False
        while True:
            with self._lock:
                now = self.clock()
                h.tokens = min(self.burst, h.tokens + (now - h.stamp) * self.rps)
                h.stamp = now
                wait = h.closed_until - now
                if wait <= 0:
                    if h.tokens >= 1.0:
                        h.tokens -= 1.0
                        return True
                    wait = (1.0 - h.tokens) / self.rps
            if deadline is not None and now + wait > deadline:
                h.slots.release()
                return False
            self.sleep(min(wait, 1.0))

    def release(self, host: str) -> None:
        self._host(host).slots.release()


# --------------------------------------------------------------------------- guarded transport


def _guarded_adapter(guard: SSRFGuard, pool_maxsize: int) -> HTTPAdapter:
    """An adapter whose new connections are refused when the peer address is not allowed."""

    def new_conn(base):
        def _new_conn(self):
            sock = base._new_conn(self)
            try:
                guard.check_ip(sock.getpeername()[0], self.host)
            except BlockedURL:
                sock.close()
                raise
            return sock
        return _new_conn

    conn_http = type("GuardedHTTPConnection", (HTTPConnection,), {"_new_conn": new_conn(HTTPConnection)})
    conn_https = type("GuardedHTTPSConnection", (HTTPSConnection,), {"_new_conn": new_conn(HTTPSConnection)})
    pool_http = type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": conn_http})
    pool_https = type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": conn_https})

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": pool_http, "https": pool_https}

    return GuardedAdapter(pool_connections=16, pool_maxsize=pool_maxsize, max_retries=0)


# --------------------------------------------------------------------------- server hints


def retry_after_s(headers: Mapping[str, str], now_wall: datetime | None = None) -> float | None:
    """Seconds the server asks us to wait: ``Retry-After`` (seconds or HTTP date), else
    ``X-RateLimit-Reset`` (Mastodon: ISO 8601; others: epoch seconds), else ``RateLimit-Reset``
    (Bluesky: epoch seconds; the IETF draft: seconds from now, told apart by
    :data:`EPOCH_THRESHOLD_S`). None if none of them."""
    now_wall = now_wall or datetime.now(UTC)
    value = headers.get("Retry-After")
    if value:
        value = value.strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, (email.utils.parsedate_to_datetime(value) - now_wall).total_seconds())
            except (TypeError, ValueError):
                pass
    reset = headers.get("X-RateLimit-Reset")
    if reset:
        reset = reset.strip()
        try:
            return max(0.0, float(reset) - now_wall.timestamp())
        except ValueError:
            try:
                when = datetime.fromisoformat(reset.replace("Z", "+00:00"))
                if when.tzinfo is None:
                    when = when.replace(tzinfo=UTC)
                return max(0.0, (when - now_wall).total_seconds())
            except ValueError:
                pass
    reset = headers.get("RateLimit-Reset")
    if reset:
        try:
            value_s = float(reset.strip())
        except ValueError:
            return None
        return max(0.0, value_s - now_wall.timestamp() if value_s >= EPOCH_THRESHOLD_S else value_s)
    return None


def _quota_exhausted(headers: Mapping[str, str]) -> bool:
    """``X-RateLimit-Remaining`` or ``RateLimit-Remaining`` is 0."""
    for name in ("X-RateLimit-Remaining", "RateLimit-Remaining"):
        value = headers.get(name)
        if value is not None and value.strip() == "0":
            return True
    return False


def _server_wait_s(status: int, headers: Mapping[str, str]) -> float | None:
    """The wait before retrying a 429 or 5xx: every hint for a 429; for a 5xx only
    ``Retry-After``, or the quota's reset when the quota is exhausted (see the module doc)."""
    if status == 429 or _quota_exhausted(headers):
        return retry_after_s(headers)
    value = headers.get("Retry-After")
    return retry_after_s({"Retry-After": value}) if value else None


# --------------------------------------------------------------------------- client


class HttpClient:
    """Fetches URLs under one politeness policy; thread-safe (one Session per thread)."""

    def __init__(self, cfg: ScrapeConfig, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self.guard = SSRFGuard(cfg.allow_hosts)
        self.limiter = HostLimiter(cfg.per_host_rps, cfg.per_host_concurrency, clock, sleep)
        self.clock, self.sleep = clock, sleep
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # no proxies or .netrc credentials picked up from the environment
            adapter = _guarded_adapter(self.guard, self.cfg.per_host_concurrency)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.headers["User-Agent"] = self.cfg.user_agent
            self._local.session = s
            with self._sessions_lock:
                self._sessions.append(s)
        return s

    def close(self) -> None:
        with self._sessions_lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _backoff(self, retry: int) -> float:
        # Full jitter (AWS architecture blog, "Exponential Backoff And Jitter").
        return random.uniform(0, self.cfg.backoff_s * (2 ** retry))

    def fetch(self, url: str, *, headers: Mapping[str, str] | None = None,
              max_bytes: int | None = None, total_timeout_s: float | None = None,
              method: str = "GET", json_body: Any = None, idempotent: bool | None = None,
              error_body: bool = False) -> FetchResult:
        """Request ``url`` under the policy above; never raises for a failed item.

        ``json_body`` is sent as ``application/json``. ``idempotent`` (default: True for GET
        and HEAD) says whether a retry after the server may have acted is safe. With
        ``error_body``, a 4xx response's body (up to :data:`MAX_ERROR_BODY` bytes) is kept in
        :attr:`FetchResult.body` so the caller can read the API's error code."""
        method = method.upper()
        if idempotent is None:
            idempotent = method in ("GET", "HEAD")
        data = None
        if json_body is not None:
            data = json.dumps(json_body).encode()
            headers = {**(headers or {}), "Content-Type": "application/json"}
        start = self.clock()
        deadline = None if total_timeout_s is None else start + total_timeout_s
        max_wait = self.cfg.max_server_wait_s
        res = FetchResult(url=url, status="connection_error", final_url=url)
        visited = {url}
        current = url
        retries = 0
        try:
            first_origin = origin(url)
        except ValueError as exc:
            return FetchResult(url=url, status="bad_url", error=f"malformed URL {url!r}: {exc}", final_url=url)

        def done(status: str, error: str | None = None, http_status: int | None = None) -> FetchResult:
            res.status, res.error = status, error
            if http_status is not None:
                res.http_status = http_status
            res.elapsed_ms = (self.clock() - start) * 1000.0
            res.final_url = current
            return res

        while True:
            try:
                self.guard.check_url(current)
            except BlockedURL as exc:
                return done("blocked", f"{exc} ({current})")
            except UnresolvableHost as exc:
                return done("connection_error", str(exc))
            host = urlsplit(current).hostname or ""  # the limiter keys on the host, not user@host:port
            # Without a total budget (API pages), no wait for the host may pass max_server_wait_s.
            if not self.limiter.acquire(host, deadline if deadline is not None else self.clock() + max_wait):
                wait = self.limiter.closed_until(host) - self.clock()
                if wait <= 0:
                    return done("timeout", f"waiting for a request slot at {host}; the time budget would pass first")
                res.retry_after_s = wait
                limit = f"total timeout {total_timeout_s} s" if deadline is not None else f"scrape.max_server_wait_s = {max_wait:g} s"
                return done("http_error", f"rate limited by {host} for {wait:.0f} s more (retry after "
                                          f"{_wall_after(wait)}); beyond {limit}", 429)
            retryable: str | None = None  # why this attempt may be retried
            try:
                res.attempts += 1
                timeout = (self.cfg.connect_timeout_s, self.cfg.read_timeout_s)
                if deadline is not None:
                    left = max(0.001, deadline - self.clock())
                    timeout = (min(timeout[0], left), min(timeout[1], left))
                try:
                    resp = self.session().request(method, current, headers=headers, data=data, stream=True,
                                                  allow_redirects=False, timeout=timeout)
                except BlockedURL as exc:
                    return done("blocked", f"{exc} ({current})")
                except ValueError as exc:  # requests parses a redirect's Location eagerly (Response.next)
                    return done("bad_url", f"malformed redirect Location from {current}: {exc}")
                except requests.exceptions.ConnectTimeout as exc:  # never sent: safe to retry any method
                    retryable, kind, err = "connect", "timeout", f"connect timeout after {timeout[0]} s: {current} ({_short(exc)})"
                except requests.exceptions.ReadTimeout:
                    retryable, kind, err = "timeout", "timeout", f"no response within {timeout[1]} s: {current}"
                except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                        urllib3.exceptions.HTTPError, OSError) as exc:
                    retryable, kind, err = "connection", "connection_error", f"{_short(exc)}: {current}"
                except requests.exceptions.RequestException as exc:  # invalid URL and the like: final
                    return done("connection_error", f"{_short(exc)}: {current}")
                else:
                    with resp:
                        res.http_status = resp.status_code
                        res.headers = resp.headers
                        self._note_rate_limit(host, resp)
                        if resp.is_redirect and data is not None:
                            return done("http_error", f"redirect {resp.status_code} of a {method} with a body "
                                                      f"not followed: {current}")
                        if resp.is_redirect:
                            location = resp.headers.get("Location", "")
                            if not location:
                                return done("http_error", f"redirect {resp.status_code} without Location: {current}")
                            try:
                                nxt = urljoin(current, location)
                                cross_origin = origin(nxt) != first_origin
                            except ValueError as exc:
                                return done("bad_url", f"malformed redirect Location {location!r} from {current}: {exc}")
                            if cross_origin and headers:
                                headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
                            if nxt in visited:
                                return done("redirect_loop", f"redirect loop: {current} -> {nxt}")
                            if len(visited) > MAX_REDIRECTS:
                                return done("redirect_loop", f"more than {MAX_REDIRECTS} redirects from {url}")
                            visited.add(nxt)
                            current = nxt
                            continue
                        if resp.status_code == 429 or resp.status_code >= 500:
                            retryable, kind = "status", "http_error"
                            err = f"HTTP {resp.status_code} {resp.reason or ''}".strip() + f": {current}"
                            if resp.status_code == 429:
                                wait = retry_after_s(resp.headers)
                                self.limiter.close_until(host, self.clock() + (wait if wait is not None else self._backoff(retries + 1)))
                            elif not idempotent:  # the server may have acted: not retried
                                retryable = None
                        elif resp.status_code >= 400:
                            if error_body:
                                self._read_body(resp, res, lambda *a, **k: res, MAX_ERROR_BODY, deadline, current)
                            return done("http_error", f"HTTP {resp.status_code} {resp.reason or ''}".strip() + f": {current}")
                        elif resp.status_code != 200:
                            return done("http_error", f"unexpected HTTP {resp.status_code}: {current}")
                        else:
                            return self._read_body(resp, res, done, max_bytes, deadline, current)
            finally:
                self.limiter.release(host)

            # A retryable failure: wait and go again, within the retry count and the budget.
            if not idempotent and retryable not in ("connect", "status"):
                return done(kind, err + f" (a {method} that may have reached the server is not retried)")
            if retries >= self.cfg.retries:
                return done(kind, err + (f" (after {res.attempts} attempts)" if res.attempts > 1 else ""))
            retries += 1
            server_wait = _server_wait_s(res.http_status or 0, res.headers) if retryable == "status" else None
            now = self.clock()
            if server_wait is not None:
                if server_wait > max_wait:
                    res.retry_after_s = server_wait
                    return done(kind, f"{err}; the server asks to wait {server_wait:.0f} s (retry after "
                                      f"{_wall_after(server_wait)}), beyond scrape.max_server_wait_s = {max_wait:g} s")
                if deadline is not None and now + server_wait > deadline:
                    return done(kind, f"{err}; server asks to wait {server_wait:.1f} s, beyond the time budget")
                self.limiter.close_until(host, now + server_wait)  # acquire() waits it out
            else:
                pause = self._backoff(retries)
                if deadline is not None and now + pause > deadline:
                    return done(kind, err + f" (time budget of {total_timeout_s} s spent)")
                self.sleep(pause)

    def _read_body(self, resp, res: FetchResult, done, max_bytes, deadline, current) -> FetchResult:
        length = resp.headers.get("Content-Length")
        if max_bytes is not None and length and length.isdigit() and int(length) > max_bytes:
            return done("too_large", f"Content-Length {length} exceeds the {max_bytes}-byte limit: {current}")
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                chunk = resp.raw.read1(CHUNK, decode_content=True)
                if not chunk:
                    break
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    res.body_bytes = size
                    return done("too_large", f"body passed the {max_bytes}-byte limit while streaming: {current}")
                chunks.append(chunk)
                if deadline is not None and self.clock() > deadline:
                    res.body_bytes = size
                    return done("timeout", f"body not complete within the total timeout ({size} bytes read): {current}")
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
            res.body_bytes = size
            return done("timeout", f"body stalled for {self.cfg.read_timeout_s} s after {size} bytes: {current}")
        except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, OSError) as exc:
            res.body_bytes = size
            return done("connection_error", f"body cut off after {size} bytes ({_short(exc)}): {current}")
        res.body = b"".join(chunks)
        res.body_bytes = size
        return done("ok")

    def _note_rate_limit(self, host: str, resp: requests.Response) -> None:
        """An exhausted quota (``X-RateLimit-Remaining: 0`` or ``RateLimit-Remaining: 0``)
        closes the host until its reset."""
        if resp.status_code == 429:
            return
        for prefix in ("X-", ""):
            remaining = resp.headers.get(f"{prefix}RateLimit-Remaining")
            if remaining is not None and remaining.strip() == "0":
                name = f"{prefix}RateLimit-Reset"
                wait = retry_after_s({name: resp.headers.get(name, "")})
                if wait:
                    self.limiter.close_until(host, self.clock() + wait)
                return


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the unit credentials belong to; ValueError when malformed."""
    parts = urlsplit(url)
    port = parts.port  # raises ValueError on a bad port
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port if port is not None else default


def _wall_after(seconds: float) -> str:
    """The wall-clock time ``seconds`` from now, for messages that say when to retry."""
    from datetime import timedelta

    try:
        return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%d %H:%M UTC")
    except OverflowError:
        return "a date beyond year 9999"


def _short(exc: BaseException) -> str:
    """A one-line description of a requests/urllib3 exception (their messages nest deeply)."""
    inner = exc
    while True:
        nxt = getattr(inner, "reason", None) or (inner.args[0] if inner.args and isinstance(inner.args[0], BaseException) else None)
        if not isinstance(nxt, BaseException) or nxt is inner:
            break
        inner = nxt
    text = str(inner).split(": ", 1)[-1] if "object at 0x" in str(inner) else str(inner)
    return f"{type(inner).__name__}: {text}"[:300]

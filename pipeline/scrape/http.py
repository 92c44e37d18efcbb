"""One HTTP client for API pages and image downloads: the same politeness and failure policy.

- **Sessions**: one pooled keep-alive ``requests.Session`` per thread (a Session is not
  thread-safe), each mounting an adapter whose connections re-check the SSRF guard on the
  connected peer address.
- **Per host**: a token bucket (``per_host_rps``, burst of one second's worth) and a cap on
  simultaneous requests (``per_host_concurrency``). A 429 or an exhausted
  ``X-RateLimit-Remaining`` / ``RateLimit-Remaining`` closes the host until ``Retry-After`` /
  ``X-RateLimit-Reset`` / ``RateLimit-Reset`` has passed: no request to that host is sent
  before then, from any thread. With ``scrape.limiter_url`` these limits and pauses are shared
  by every process through Redis (:mod:`pipeline.scrape.limiter`).
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
  total budget per fetch (every attempt, wait and byte included). Bodies are read with
  ``read1``, the socket's timeout cut before each read to what the budget has left, and the
  budget checked after each: a server that drips one byte at a time is cut off within one
  read of the deadline. :meth:`HttpClient.fetch_api` bounds an API call by
  ``api_total_timeout_s`` and ``max_api_bytes``; a fetch cut off by its budget says so in
  :attr:`FetchResult.over_budget`.
- **Size**: ``Content-Length`` is checked first, then the decoded body is counted while
  streaming and the transfer is abandoned as soon as it passes ``max_bytes``.
- **Redirects**: followed by hand (at most :data:`MAX_REDIRECTS`), the SSRF guard checking
  each hop before it is requested; a hop back to a URL already visited is a loop. A hop to
  another origin (scheme, host, port) drops the credential headers (:data:`CREDENTIAL_HEADERS`):
  a token is sent only to the origin it was given for.
- **Server waits**: a wait longer than ``max_server_wait_s``, or one the fetch's time budget
  cannot hold, is never slept through: the fetch ends ``http_error`` with
  :attr:`FetchResult.retry_after_s` set, so the caller can say when to come back (an image is
  deferred to a later run, a crawl stops with its state saved).

A fetch never raises for an item-level failure; it returns a :class:`FetchResult` whose
``status`` is one of ``ok, http_error, timeout, too_large, blocked, bad_url,
connection_error, redirect_loop`` (the ``downloads`` table's vocabulary).
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import requests
import tenacity
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from pipeline.core.config import ScrapeConfig
from pipeline.scrape.limiter import build_limiter
from pipeline.scrape.robots import RobotsPolicy, client_fetch
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
    retry_after_s: float | None = None  # set when the server asked for a wait beyond max_server_wait_s or the budget
    over_budget: bool = False  # the fetch ended because its total time budget ran out

    @property
    def ok(self) -> bool:
        return self.status == "ok"


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


# --------------------------------------------------------------------------- retry policy


@dataclass(frozen=True)
class _FailedAttempt:
    """An attempt that failed in a way :class:`RetryPolicy` may retry."""

    #: ``connect_timeout``: the request was never sent. ``read_timeout`` and ``connection``
    #: (refused, reset, cut off): it may have reached the server. ``status``: a 429 or 5xx.
    cause: Literal["connect_timeout", "read_timeout", "connection", "status"]
    status: str  # the fetch's status if this attempt is the last: timeout, connection_error, http_error
    error: str
    host: str  # where it was sent: a wait the server asks for closes this host
    http_status: int | None = None  # with cause "status"
    headers: Mapping[str, str] = field(default_factory=dict)  # with cause "status": the response's


@dataclass(frozen=True)
class _Redirect:
    """A redirect response (``requests.Response.is_redirect``)."""

    http_status: int
    location: str  # the Location header as sent; empty when there is none


@dataclass(frozen=True)
class _RetryAfter:
    """Try the failed hop again after ``wait_s`` seconds."""

    wait_s: float
    #: True: the server asked for the wait, so the host stays closed for it and every thread
    #: waits in the limiter's ``acquire``. False: a backoff that only this fetch sleeps through.
    host_closed: bool


@dataclass(frozen=True)
class _GiveUp:
    """End the fetch with the failed attempt's status and this error text."""

    error: str
    retry_after_s: float | None = None  # a server wait beyond max_server_wait_s or the budget, for the caller
    over_budget: bool = False  # the time budget ran out


@dataclass(frozen=True)
class _Budget:
    """A fetch's total time limit, on the client's monotonic clock, in seconds."""

    start: float
    total_s: float | None  # None: no total limit (API pages; max_server_wait_s bounds their waits)

    @property
    def deadline(self) -> float | None:
        return None if self.total_s is None else self.start + self.total_s

    def allows(self, until: float) -> bool:
        """Whether the budget lasts until clock time ``until``."""
        deadline = self.deadline
        return deadline is None or until <= deadline


class RetryPolicy:
    """Which failed attempts of one fetch are tried again, and after how long: the "Retries",
    "Methods" and "Server waits" rules of the module doc.

    The count of tries is a :class:`tenacity.RetryCallState` (``attempt_number`` from 1; a
    redirect hop is not a try, a retry resumes at the hop that failed), and tenacity's
    strategies say when the count is spent and how long to back off. The rest has no place in
    tenacity's loop and stays here, each rule ending the fetch with its own error text: a wait
    the server asks for closes the host for every thread (through the limiter, :mod:`pipeline.scrape.limiter`) rather
    than sleeping; a wait beyond ``max_server_wait_s`` or past the total budget ends the fetch;
    a request that is not idempotent is retried only where the server cannot have acted on it.
    """

    def __init__(self, cfg: ScrapeConfig, method: str, idempotent: bool) -> None:
        self.method = method
        self.idempotent = idempotent  # repeating the request after the server acted on it is harmless
        self.max_server_wait_s = cfg.max_server_wait_s
        self._tries_spent = tenacity.stop_after_attempt(1 + cfg.retries)
        # Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): retry k waits a
        # uniform [0, backoff_s * 2**k] s. Retry k follows try k, whose window in tenacity is
        # multiplier * 2**(k - 1).
        self._full_jitter = tenacity.wait_random_exponential(multiplier=2 * cfg.backoff_s)

    def start(self) -> tenacity.RetryCallState:
        """The count of tries of a new fetch, at its first."""
        retrying = tenacity.Retrying(stop=self._tries_spent, wait=self._full_jitter)
        return tenacity.RetryCallState(retrying, fn=None, args=(), kwargs={})

    def should_retry(self, failure: _FailedAttempt) -> bool:
        """Whether repeating the request is safe: always when it is idempotent; otherwise only
        where the server cannot have acted on it (a connect timeout, a 429)."""
        if self.idempotent or failure.cause == "connect_timeout":
            return True
        return failure.cause == "status" and failure.http_status == 429

    def backoff_s(self, retry_state: tenacity.RetryCallState) -> float:
        """A random wait, in seconds, before the retry that follows the current try."""
        return self._full_jitter(retry_state)

    def server_wait_s(self, failure: _FailedAttempt) -> float | None:
        """The wait, in seconds, the server asks for before a retry; None when it asks none."""
        if failure.cause != "status":
            return None
        return _server_wait_s(failure.http_status or 0, failure.headers)

    def next_step(self, failure: _FailedAttempt, retry_state: tenacity.RetryCallState, *,
                  requests_sent: int, now: float, budget: _Budget) -> _RetryAfter | _GiveUp:
        """After ``failure``: wait and retry, or give up saying why. ``requests_sent`` counts
        redirect hops too (it is :attr:`FetchResult.attempts`); ``now`` is the client's clock."""
        if not self.should_retry(failure):
            return _GiveUp(f"{failure.error} (a {self.method} that may have reached the server is not retried)")
        server_wait = self.server_wait_s(failure)
        # A wait too long to sit through is said (retry_after_s) whether or not tries are left:
        # the host is closed for it all the same, and the caller defers or stops on it.
        if self._tries_spent(retry_state) and (server_wait is None or (
                server_wait <= self.max_server_wait_s and budget.allows(now + server_wait))):
            return _GiveUp(failure.error + (f" (after {requests_sent} attempts)" if requests_sent > 1 else ""))
        if server_wait is not None:
            if server_wait > self.max_server_wait_s:
                return _GiveUp(f"{failure.error}; the server asks to wait {server_wait:.0f} s (retry after "
                               f"{_wall_after(server_wait)}), beyond scrape.max_server_wait_s = "
                               f"{self.max_server_wait_s:g} s", retry_after_s=server_wait)
            if not budget.allows(now + server_wait):
                return _GiveUp(f"{failure.error}; server asks to wait {server_wait:.1f} s (retry after "
                               f"{_wall_after(server_wait)}), beyond the time budget of {budget.total_s:g} s",
                               retry_after_s=server_wait)
            return _RetryAfter(server_wait, host_closed=True)
        pause = self.backoff_s(retry_state)
        if not budget.allows(now + pause):
            return _GiveUp(failure.error + f" (time budget of {budget.total_s:g} s spent)", over_budget=True)
        return _RetryAfter(pause, host_closed=False)


# --------------------------------------------------------------------------- client


@dataclass
class _Fetch:
    """One :meth:`HttpClient.fetch` call: what was asked, how far it has got, what it has found."""

    result: FetchResult  # filled in attempt by attempt, returned when the fetch ends
    method: str
    body: bytes | None  # json_body, encoded; a request with a body never follows a redirect
    headers: Mapping[str, str] | None  # the credential headers are dropped once a hop leaves first_origin
    max_bytes: int | None
    error_body: bool
    budget: _Budget
    policy: RetryPolicy
    retry_state: tenacity.RetryCallState
    first_origin: tuple[str, str, int | None]  # the origin the caller's credentials are for
    current: str  # the URL the next attempt requests
    visited: set[str]  # the URL asked for and every redirect target: a hop back to one is a loop


class HttpClient:
    """Fetches URLs under one politeness policy; thread-safe (one Session per thread)."""

    def __init__(self, cfg: ScrapeConfig, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self.guard = SSRFGuard(cfg.allow_hosts)
        self.limiter = build_limiter(cfg, clock, sleep)  # in process, or shared through scrape.limiter_url
        self.clock, self.sleep = clock, sleep
        # What each host's robots.txt and TDMRep allow; its files are fetched through this client.
        self.policy = RobotsPolicy(client_fetch(self), cfg.user_agent, limiter=self.limiter,
                                   shared=getattr(self.limiter, "client", None))
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
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers = {**(headers or {}), "Content-Type": "application/json"}
        start = self.clock()
        try:
            first_origin = origin(url)
        except ValueError as exc:
            return FetchResult(url=url, status="bad_url", error=f"malformed URL {url!r}: {exc}", final_url=url)
        policy = RetryPolicy(self.cfg, method, idempotent)
        f = _Fetch(result=FetchResult(url=url, status="connection_error", final_url=url), method=method,
                   body=body, headers=headers, max_bytes=max_bytes, error_body=error_body,
                   budget=_Budget(start, total_timeout_s), policy=policy, retry_state=policy.start(),
                   first_origin=first_origin, current=url, visited={url})
        while True:
            outcome = self._follow_redirects(f)
            if isinstance(outcome, FetchResult):
                return outcome
            now = self.clock()
            step = policy.next_step(outcome, f.retry_state, requests_sent=f.result.attempts, now=now,
                                    budget=f.budget)
            if isinstance(step, _GiveUp):
                if step.retry_after_s is not None:
                    f.result.retry_after_s = step.retry_after_s
                f.result.over_budget = step.over_budget
                return self._finish(f, outcome.status, step.error)
            if step.host_closed:
                self.limiter.close_until(outcome.host, now + step.wait_s)  # the next acquire() waits it out
            else:
                self.sleep(step.wait_s)
            f.retry_state.prepare_for_next_attempt()

    def fetch_api(self, url: str, **kwargs: Any) -> FetchResult:
        """:meth:`fetch` an API URL under the API's bounds: at most ``max_api_bytes`` of body
        and ``api_total_timeout_s`` for the whole call. A path the host's robots.txt disallows
        is not requested: the result's status is ``robots_disallowed``."""
        refusal = self.policy.robots_refusal(url)
        if refusal:
            return FetchResult(url=url, status="robots_disallowed", error=refusal)
        return self.fetch(url, max_bytes=self.cfg.max_api_bytes, total_timeout_s=self.cfg.api_total_timeout_s,
                          **kwargs)

    def _follow_redirects(self, f: _Fetch) -> FetchResult | _FailedAttempt:
        """Request ``f.current`` and each redirect target after it, up to the fetch's end or a
        failure for the retry policy to judge."""
        while True:
            outcome = self._attempt(f)
            if not isinstance(outcome, _Redirect):
                return outcome
            refused = self._take_redirect(f, outcome)
            if refused is not None:
                return refused

    def _take_redirect(self, f: _Fetch, redirect: _Redirect) -> FetchResult | None:
        """Point ``f`` at the redirect's target; the ended fetch instead when it may not follow."""
        if f.body is not None:  # the body (a password, say) goes only to the URL the caller chose
            return self._finish(f, "http_error", f"redirect {redirect.http_status} of a {f.method} with a body "
                                                 f"not followed: {f.current}")
        if not redirect.location:
            return self._finish(f, "http_error", f"redirect {redirect.http_status} without Location: {f.current}")
        try:
            target = urljoin(f.current, redirect.location)
            cross_origin = origin(target) != f.first_origin
        except ValueError as exc:
            return self._finish(f, "bad_url", f"malformed redirect Location {redirect.location!r} "
                                              f"from {f.current}: {exc}")
        if cross_origin and f.headers:  # a token is sent only to the origin it was given for
            f.headers = {k: v for k, v in f.headers.items() if k.lower() not in CREDENTIAL_HEADERS}
        if target in f.visited:
            return self._finish(f, "redirect_loop", f"redirect loop: {f.current} -> {target}")
        if len(f.visited) > MAX_REDIRECTS:
            return self._finish(f, "redirect_loop", f"more than {MAX_REDIRECTS} redirects from {f.result.url}")
        f.visited.add(target)
        f.current = target
        return None

    def _attempt(self, f: _Fetch) -> FetchResult | _FailedAttempt | _Redirect:
        """One request to ``f.current``: the SSRF check, a slot and a token at its host, the
        request, and what its response or error means."""
        try:
            self.guard.check_url(f.current)
        except BlockedURL as exc:
            return self._finish(f, "blocked", f"{exc} ({f.current})")
        except UnresolvableHost as exc:
            return self._finish(f, "connection_error", str(exc))
        host = urlsplit(f.current).hostname or ""  # the limiter keys on the host, not user@host:port
        refused = self._acquire_host(f, host)
        if refused is not None:
            return refused
        try:
            f.result.attempts += 1
            return self._send(f, host)
        finally:
            self.limiter.release(host)

    def _acquire_host(self, f: _Fetch, host: str) -> FetchResult | None:
        """Wait for a request slot and a token at ``host``; the ended fetch instead when the wait
        would pass the time budget or, without one, ``max_server_wait_s``."""
        max_wait = self.cfg.max_server_wait_s
        deadline = f.budget.deadline
        # Without a total budget (API pages), no wait for the host may pass max_server_wait_s.
        if self.limiter.acquire(host, deadline if deadline is not None else self.clock() + max_wait):
            return None
        wait = self.limiter.closed_until(host) - self.clock()
        if wait <= 0:
            f.result.over_budget = True
            return self._finish(f, "timeout", f"waiting for a request slot at {host}; the time budget would pass first")
        f.result.retry_after_s = wait
        limit = (f"total timeout {f.budget.total_s} s" if deadline is not None
                 else f"scrape.max_server_wait_s = {max_wait:g} s")
        return self._finish(f, "http_error", f"rate limited by {host} for {wait:.0f} s more (retry after "
                                             f"{_wall_after(wait)}); beyond {limit}", 429)

    def _send(self, f: _Fetch, host: str) -> FetchResult | _FailedAttempt | _Redirect:
        """Send the request (the caller holds a slot at ``host``) and sort out what comes back."""
        connect_s, read_s = self._socket_timeouts_s(f.budget)
        try:
            resp = self.session().request(f.method, f.current, headers=f.headers, data=f.body, stream=True,
                                          allow_redirects=False, timeout=(connect_s, read_s))
        except BlockedURL as exc:  # the peer address, checked as the connection opens
            return self._finish(f, "blocked", f"{exc} ({f.current})")
        except ValueError as exc:  # requests parses a redirect's Location eagerly (Response.next)
            return self._finish(f, "bad_url", f"malformed redirect Location from {f.current}: {exc}")
        except requests.exceptions.ConnectTimeout as exc:  # never sent: safe to retry any method
            return _FailedAttempt("connect_timeout", "timeout",
                                  f"connect timeout after {connect_s} s: {f.current} ({_short(exc)})", host)
        except requests.exceptions.ReadTimeout:
            return _FailedAttempt("read_timeout", "timeout", f"no response within {read_s} s: {f.current}", host)
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.HTTPError, OSError) as exc:
            return _FailedAttempt("connection", "connection_error", f"{_short(exc)}: {f.current}", host)
        except requests.exceptions.RequestException as exc:  # invalid URL and the like: final
            return self._finish(f, "connection_error", f"{_short(exc)}: {f.current}")
        with resp:
            return self._read_response(f, host, resp)

    def _socket_timeouts_s(self, budget: _Budget) -> tuple[float, float]:
        """(connect, read) timeouts in seconds for the next request, cut to what the budget has left."""
        connect_s, read_s = self.cfg.connect_timeout_s, self.cfg.read_timeout_s
        deadline = budget.deadline
        if deadline is None:
            return connect_s, read_s
        left_s = max(0.001, deadline - self.clock())  # never 0 s: that would make the socket non-blocking
        return min(connect_s, left_s), min(read_s, left_s)

    def _read_response(self, f: _Fetch, host: str,
                       resp: requests.Response) -> FetchResult | _FailedAttempt | _Redirect:
        """What a response means: a redirect, a failure for the retry policy, or the fetch's end
        (the body read, or a final 4xx)."""
        code = resp.status_code
        f.result.http_status = code
        f.result.headers = resp.headers
        self._note_rate_limit(host, resp)
        if resp.is_redirect:
            return _Redirect(code, resp.headers.get("Location", ""))
        if code == 429 or code >= 500:
            if code == 429:  # closed while this request still holds its slot at the host
                wait = retry_after_s(resp.headers)
                self.limiter.close_until(host, self.clock() + (wait if wait is not None
                                                               else f.policy.backoff_s(f.retry_state)))
            return _FailedAttempt("status", "http_error", f"HTTP {code} {resp.reason or ''}".strip() + f": {f.current}",
                                  host, http_status=code, headers=resp.headers)
        if code >= 400:
            if f.error_body:  # the API's error code; the fetch ends http_error however the read goes
                self._read_body(resp, f.result, MAX_ERROR_BODY, f.budget, f.current)
            return self._finish(f, "http_error", f"HTTP {code} {resp.reason or ''}".strip() + f": {f.current}")
        if code != 200:
            return self._finish(f, "http_error", f"unexpected HTTP {code}: {f.current}")
        status, error = self._read_body(resp, f.result, f.max_bytes, f.budget, f.current)
        return self._finish(f, status, error)

    def _finish(self, f: _Fetch, status: str, error: str | None = None,
                http_status: int | None = None) -> FetchResult:
        """End the fetch: its status and error, its time so far and the URL it got to."""
        res = f.result
        res.status, res.error = status, error
        if http_status is not None:
            res.http_status = http_status
        res.elapsed_ms = (self.clock() - f.budget.start) * 1000.0
        res.final_url = f.current
        return res

    def _read_body(self, resp: requests.Response, res: FetchResult, max_bytes: int | None,
                   budget: _Budget, url: str) -> tuple[str, str | None]:
        """Stream the body into ``res.body`` (``res.body_bytes`` counts what arrived, also when the
        transfer is abandoned); the fetch status it comes to (ok, too_large, timeout,
        connection_error) and the error text.

        Before each read the socket's timeout is cut to what the budget has left, and the budget
        is checked after it: a body that drips in ends within one read of the deadline."""
        length = resp.headers.get("Content-Length")
        if max_bytes is not None and length and length.isdigit() and int(length) > max_bytes:
            return "too_large", f"Content-Length {length} exceeds the {max_bytes}-byte limit: {url}"
        deadline = budget.deadline
        sock = _response_socket(resp) if deadline is not None else None
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                if deadline is not None:
                    left_s = deadline - self.clock()
                    if left_s <= 0:
                        res.over_budget = True
                        return "timeout", (f"body not complete within the total timeout of {budget.total_s:g} s "
                                           f"({size} bytes read): {url}")
                    if sock is not None:  # never 0 s: that would make the socket non-blocking
                        sock.settimeout(max(0.001, min(self.cfg.read_timeout_s, left_s)))
                chunk = resp.raw.read1(CHUNK, decode_content=True)
                if not chunk:
                    break
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    return "too_large", f"body passed the {max_bytes}-byte limit while streaming: {url}"
                chunks.append(chunk)
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
            if deadline is not None and self.clock() >= deadline - 0.001:
                res.over_budget = True
                return "timeout", (f"body not complete within the total timeout of {budget.total_s:g} s "
                                   f"({size} bytes read): {url}")
            return "timeout", f"body stalled for {self.cfg.read_timeout_s} s after {size} bytes: {url}"
        except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, OSError) as exc:
            return "connection_error", f"body cut off after {size} bytes ({_short(exc)}): {url}"
        finally:
            res.body_bytes = size
        res.body = b"".join(chunks)
        return "ok", None

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


def _response_socket(resp: requests.Response) -> Any:
    """The socket a streamed response is read from, to cut its timeout; None where urllib3
    does not expose it (the budget is then checked between reads only)."""
    connection = getattr(resp.raw, "connection", None)  # urllib3 2: the HTTPConnection while streaming
    return getattr(connection, "sock", None)


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

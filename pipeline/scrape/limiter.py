"""Per-host politeness: request rate, simultaneous requests, and the pauses a server asks for.

Two backends behind one interface (:class:`Limiter`), picked by ``scrape.limiter_url``
(:func:`build_limiter`):

- **empty**: :class:`HostLimiter`, in this process only: a token bucket (``per_host_rps``,
  burst of one second's worth), a semaphore of ``per_host_concurrency`` slots and a pause time
  per host, on the monotonic clock. N worker processes then send N times the rate to a host,
  and a 429 seen by one slows no other.
- **redis://...**: :class:`SharedHostLimiter`, one set of limits per host for every process and
  machine that points at the same Redis:

  * *rate*: the generic cell rate algorithm (GCRA: a token bucket kept as one timestamp, the
    "theoretical arrival time") with a burst of one, so requests to a host leave evenly spaced,
    ``1 / per_host_rps`` seconds apart, counted for all workers together. It runs in the same
    Lua script as the slot and the pause, on Redis' clock (``TIME``), in one round trip, and
    answers how long to wait, so a blocking acquire sleeps rather than polls.
    The ``limits`` library (moving window on Redis) was tried first and measured with
    bench/polite.py: its window lets a host's whole second's worth go at once, and the few
    milliseconds between a worker's acquire and its request's arrival then put 7 requests into
    one second at a host limited to 5 (1.4 x the limit); evenly spaced requests keep within
    1.1 x. It also keys its window by the rate, so a host tightened by one worker and not yet by
    another would have two windows.
  * *concurrency*: leases, a Redis sorted set of lease ids per host scored by their expiry
    (``limiter_lease_s``), taken by a Lua script that first drops expired leases. A worker
    killed mid-request leaks its slot for at most the lease's lifetime.
  * *pauses*: :meth:`close_until` stores the end of a server-imposed pause (429, Retry-After,
    an exhausted RateLimit quota) as a Redis key, in Redis' own clock (``TIME``), so every
    worker holds back from that host, whatever its own clock says.

  When Redis cannot be reached (refused at start or lost mid-run), the limiter falls back to an
  in-process :class:`HostLimiter` with ``per_host_rps`` and ``per_host_concurrency`` divided by
  ``expected_workers``, logs one warning, and tries Redis again after :data:`REDIS_RETRY_S`. A
  scrape never fails because the limiter's Redis is down.

Both backends accept :meth:`~Limiter.tighten`: a lower rate for one host (a robots.txt
``Crawl-delay`` or ``Request-rate``, :mod:`pipeline.scrape.robots`).

Hosts are keys as the caller names them (:class:`~pipeline.scrape.http.HttpClient` uses the
URL's host name without the port).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

import redis

from pipeline.core.config import ScrapeConfig

log = logging.getLogger(__name__)

#: After Redis was found down, the seconds before the shared limiter tries it again.
REDIS_RETRY_S = 30.0
#: Seconds between looks at a host whose slots are all taken (others release without telling).
SLOT_POLL_S = 0.05
#: Longest single sleep in an acquire, seconds: pauses and turns are looked at again after it.
MAX_SLEEP_S = 1.0
#: Redis client timeouts, seconds: an unreachable Redis costs at most this long before the fallback.
REDIS_CONNECT_TIMEOUT_S = 1.0
REDIS_SOCKET_TIMEOUT_S = 2.0
#: Prefix of every key the limiter writes in Redis.
KEY_PREFIX = "likerank:polite"


class Limiter(Protocol):
    """What :class:`~pipeline.scrape.http.HttpClient` needs of a limiter. Times are on the
    caller's clock (monotonic by default), in seconds."""

    def acquire(self, host: str, deadline: float | None) -> bool:
        """Take a request slot and a rate token for ``host``; False if ``deadline`` passes first."""
        ...

    def release(self, host: str) -> None:
        """Give back the slot this thread took for ``host``."""
        ...

    def close_until(self, host: str, until: float) -> None:
        """No request to ``host`` before clock time ``until``."""
        ...

    def closed_until(self, host: str) -> float:
        """Clock time until which ``host`` is closed (in the past when it is open)."""
        ...

    def tighten(self, host: str, rps: float) -> None:
        """At most ``rps`` requests per second to ``host`` from now on (never raises the rate)."""
        ...


# --------------------------------------------------------------------------- in process


class _Host:
    __slots__ = ("rps", "burst", "tokens", "stamp", "closed_until", "slots")

    def __init__(self, rps: float, concurrency: int, now: float):
        self.rps = rps
        self.burst = max(1.0, rps)
        self.tokens = self.burst
        self.stamp = now
        self.closed_until = 0.0
        self.slots = threading.BoundedSemaphore(concurrency)


class HostLimiter:
    """Per-host token bucket, concurrency cap and server-requested pauses, in this process
    (monotonic time)."""

    def __init__(self, rps: float, concurrency: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rps, self.concurrency = rps, concurrency
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._hosts: dict[str, _Host] = {}

    def _host(self, host: str) -> _Host:
        with self._lock:
            h = self._hosts.get(host)
            if h is None:
                h = self._hosts[host] = _Host(self.rps, self.concurrency, self.clock())
            return h

    def tighten(self, host: str, rps: float) -> None:
        h = self._host(host)
        with self._lock:
            h.rps = min(h.rps, rps)
            h.burst = max(1.0, h.rps)
            h.tokens = min(h.tokens, h.burst)

    def close_until(self, host: str, until: float) -> None:
        h = self._host(host)
        with self._lock:
            h.closed_until = max(h.closed_until, until)

    def closed_until(self, host: str) -> float:
        return self._host(host).closed_until

    def acquire(self, host: str, deadline: float | None) -> bool:
        h = self._host(host)
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        if not h.slots.acquire(timeout=timeout):
            return False
        while True:
            with self._lock:
                now = self.clock()
                h.tokens = min(h.burst, h.tokens + (now - h.stamp) * h.rps)
                h.stamp = now
                wait = h.closed_until - now
                if wait <= 0:
                    if h.tokens >= 1.0:
                        h.tokens -= 1.0
                        return True
                    wait = (1.0 - h.tokens) / h.rps
            if deadline is not None and now + wait > deadline:
                h.slots.release()
                return False
            self.sleep(min(wait, MAX_SLEEP_S))

    def release(self, host: str) -> None:
        self._host(host).slots.release()


# --------------------------------------------------------------------------- shared through Redis

#: One try at a host: its pause, then a slot (a lease), then the rate (GCRA, burst of one).
#: KEYS: the host's lease set, pause key, theoretical arrival time (TAT) key.
#: ARGV: lease id, lease lifetime (ms), slots, interval between requests (ms, may be fractional).
#: Returns {1, 0}: go (lease held, the TAT moved on by one interval);
#: {0, ms}: paused for ms more (a lease this id held is given back: a paused host holds no slots);
#: {-1, 0}: every slot is taken; {2, ms}: lease held (renewed), the next request may go in ms.
_TRY_HOST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {0, math.ceil(paused - now)}
end
local lease_ms = tonumber(ARGV[2])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return {-1, 0}
end
redis.call('ZADD', KEYS[1], now + lease_ms, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease_ms)
local interval = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[3]) or '0')
if tat < now then tat = now end
if tat > now then
  return {2, math.ceil(tat - now)}
end
redis.call('SET', KEYS[3], tostring(tat + interval), 'PX', math.ceil(interval) + 1000)
return {1, 0}
"""

#: Close a host for ARGV[1] ms from Redis' now, unless it is already closed for longer.
#: KEYS: the pause key. Returns the ms it stays closed.
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local until_ms = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > current then
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + 1000)
  return tonumber(ARGV[1])
end
return current - now
"""

#: The ms a host stays closed from Redis' now (0 when open). KEYS: the pause key.
_PAUSE_LEFT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local left = tonumber(redis.call('GET', KEYS[1]) or '0') - now
if left < 0 then return 0 end
return left
"""


#: Requests leave this much further apart than ``1 / rps``: spaced exactly, a one-second window
#: that opens with a request and closes with another catches rps + 1 of them; 5 % wider keeps
#: every window at or under the limit (``bench/polite.py``), for 5 % less throughput.
SPACING_MARGIN = 1.05


class SharedHostLimiter:
    """Per-host limits shared through Redis by every process and machine (see the module doc)."""

    def __init__(self, url: str, rps: float, concurrency: int, *, lease_s: float, expected_workers: int,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 key_prefix: str = KEY_PREFIX):
        self.url, self.rps, self.concurrency, self.lease_s = url, rps, concurrency, lease_s
        self.clock, self.sleep = clock, sleep
        self.key_prefix = key_prefix
        self.client = redis.Redis.from_url(url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
                                           socket_timeout=REDIS_SOCKET_TIMEOUT_S)
        # No round trip here: a Redis that is down shows at the first request, which falls back.
        self._try_host = self.client.register_script(_TRY_HOST)
        self._pause = self.client.register_script(_PAUSE)
        self._pause_left = self.client.register_script(_PAUSE_LEFT)
        self.fallback = HostLimiter(rps / expected_workers, max(1, concurrency // expected_workers), clock, sleep)
        self.expected_workers = expected_workers
        self._rates: dict[str, float] = {}  # host -> tightened rate, requests per second
        self._held = threading.local()  # .leases: host -> stack of lease ids (None: a fallback slot)
        self._state_lock = threading.Lock()
        self._down_until: float | None = None  # clock time before which Redis is not tried again

    # ----------------------------------------------------------------- the interface

    def tighten(self, host: str, rps: float) -> None:
        with self._state_lock:
            self._rates[host] = min(self._rates.get(host, self.rps), rps)
        self.fallback.tighten(host, rps / self.expected_workers)

    def close_until(self, host: str, until: float) -> None:
        self.fallback.close_until(host, until)  # holds in this process even if Redis is lost
        if self._redis_down():
            return
        wait_ms = int((until - self.clock()) * 1000)
        if wait_ms <= 0:
            return
        try:
            self._pause(keys=[self._key("pause", host)], args=[wait_ms])
        except redis.RedisError as exc:
            self._lost(exc)

    def closed_until(self, host: str) -> float:
        local = self.fallback.closed_until(host)
        if self._redis_down():
            return local
        try:
            left_ms = int(self._pause_left(keys=[self._key("pause", host)]))
        except redis.RedisError as exc:
            self._lost(exc)
            return local
        return max(local, self.clock() + left_ms / 1000.0)

    def acquire(self, host: str, deadline: float | None) -> bool:
        if not self._redis_down():
            try:
                lease = self._acquire_shared(host, deadline)
            except redis.RedisError as exc:
                self._lost(exc)
            else:
                if lease is not None:
                    self._leases(host).append(lease)
                return lease is not None
        if not self.fallback.acquire(host, deadline):
            return False
        self._leases(host).append(None)
        return True

    def release(self, host: str) -> None:
        stack = self._leases(host)
        lease = stack.pop() if stack else None
        if lease is None:
            self.fallback.release(host)
            return
        try:
            self.client.zrem(self._key("leases", host), lease)
        except redis.RedisError as exc:  # the lease expires by itself
            self._lost(exc)

    # ----------------------------------------------------------------- steps

    def _acquire_shared(self, host: str, deadline: float | None) -> str | None:
        """Hold a lease and take the rate's next turn for ``host`` in Redis: the lease id, or None
        when ``deadline`` would pass first (the lease is given back)."""
        lease = uuid.uuid4().hex
        keys = [self._key("leases", host), self._key("pause", host), self._key("rate", host)]
        lease_ms = int(self.lease_s * 1000)
        held = False
        try:
            while True:
                state, wait_ms = self._try_host(keys=keys, args=[lease, lease_ms, self.concurrency,
                                                                 SPACING_MARGIN * 1000.0 / self._rate(host)])
                if state == 1:
                    return lease
                held = state == 2
                if state == -1:  # others release without telling: look again soon, not in step
                    wait, needed = SLOT_POLL_S * random.uniform(0.5, 1.5), 0.0
                else:
                    wait = needed = wait_ms / 1000.0
                if deadline is not None and self.clock() + needed > deadline:
                    break
                self.sleep(min(wait, MAX_SLEEP_S))
        except BaseException:
            if held:
                self._drop_lease(keys[0], lease)
            raise
        if held:
            self._drop_lease(keys[0], lease)
        return None

    def _drop_lease(self, lease_key: str, lease: str) -> None:
        try:
            self.client.zrem(lease_key, lease)
        except redis.RedisError:  # the lease expires by itself
            pass

    def _rate(self, host: str) -> float:
        with self._state_lock:
            return self._rates.get(host, self.rps)

    def _leases(self, host: str) -> list[str | None]:
        leases = getattr(self._held, "leases", None)
        if leases is None:
            leases = self._held.leases = {}
        return leases.setdefault(host, [])

    def _key(self, kind: str, host: str) -> str:
        return f"{self.key_prefix}:{kind}:{host}"

    # ----------------------------------------------------------------- Redis down

    def _redis_down(self) -> bool:
        """Whether to use the fallback now; after :data:`REDIS_RETRY_S`, Redis is tried again."""
        with self._state_lock:
            if self._down_until is None:
                return False
            if self.clock() < self._down_until:
                return True
        try:
            self.client.ping()
        except redis.RedisError:
            with self._state_lock:
                self._down_until = self.clock() + REDIS_RETRY_S
            return True
        with self._state_lock:
            self._down_until = None
        log.info("shared limiter: Redis at %s reachable again; per-host limits are shared again",
                    _redacted(self.url))
        return False

    def _lost(self, exc: BaseException) -> None:
        """Redis failed: use the fallback for :data:`REDIS_RETRY_S`, saying so once per outage."""
        with self._state_lock:
            first = self._down_until is None
            self._down_until = self.clock() + REDIS_RETRY_S
        if first:
            log.warning("shared limiter: Redis at %s unreachable (%s: %s); this process now limits each "
                        "host alone to %.3g requests/s and %d at a time (scrape.per_host_rps and "
                        "per_host_concurrency divided by scrape.expected_workers = %d); Redis is tried "
                        "again every %.0f s", _redacted(self.url), type(exc).__name__, exc, self.fallback.rps,
                        self.fallback.concurrency, self.expected_workers, REDIS_RETRY_S)


def _redacted(url: str) -> str:
    """``url`` without a password (redis://:secret@host -> redis://***@host)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


def build_limiter(cfg: ScrapeConfig, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> HostLimiter | SharedHostLimiter:
    """The limiter ``scrape.limiter_url`` names: in process when empty, else shared through Redis."""
    if not cfg.limiter_url:
        return HostLimiter(cfg.per_host_rps, cfg.per_host_concurrency, clock, sleep)
    return SharedHostLimiter(cfg.limiter_url, cfg.per_host_rps, cfg.per_host_concurrency,
                             lease_s=cfg.limiter_lease_s, expected_workers=cfg.expected_workers,
                             clock=clock, sleep=sleep)

"""Mastodon's API rate limit: fixed windows per client, as rack-attack counts them.

Mastodon (``config/initializers/rack_attack.rb``) throttles ``/api`` requests to 300 per
5 minutes per IP (unauthenticated) or per token. Windows are aligned to multiples of the
period since the Unix epoch, so the reset time is the end of the current window. Every API
response carries ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset``
(ISO 8601 with microseconds); a throttled one is ``429`` with ``{"error": "Too many
requests"}`` and, as most servers send and clients honour, ``Retry-After`` in whole seconds.
The clock is the wall clock (throttling is about real request rates), not the world's clock.

Bluesky's services announce the same kind of window in the IETF draft headers instead:
``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` (Unix seconds) and
``RateLimit-Policy`` (``<limit>;w=<window seconds>``); a throttled XRPC request is ``429``
with ``{"error": "RateLimitExceeded"}`` and no ``Retry-After`` (:meth:`Decision.xrpc_headers`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class RateLimit:
    limit: int  # requests per window
    period_s: float  # window length, seconds

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period_s <= 0:
            raise ValueError(f"rate limit: need limit >= 1 and period_s > 0, got {self.limit}/{self.period_s}")


#: Mastodon's default for unauthenticated API clients: 300 requests per 5 minutes.
MASTODON_RATE_LIMIT = RateLimit(300, 300.0)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_at: float  # Unix seconds when the window ends
    retry_after_s: int  # whole seconds until the window ends (>= 1); meaningful when throttled

    def headers(self) -> list[tuple[str, str]]:
        reset = datetime.fromtimestamp(self.reset_at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        h = [("X-RateLimit-Limit", str(self.limit)), ("X-RateLimit-Remaining", str(self.remaining)),
             ("X-RateLimit-Reset", reset)]
        if not self.allowed:
            h.append(("Retry-After", str(self.retry_after_s)))
        return h

    def xrpc_headers(self, period_s: float) -> list[tuple[str, str]]:
        """The headers Bluesky's PDS and AppView send (see the module docstring)."""
        return [("RateLimit-Limit", str(self.limit)), ("RateLimit-Remaining", str(self.remaining)),
                ("RateLimit-Reset", str(math.ceil(self.reset_at))),
                ("RateLimit-Policy", f"{self.limit};w={math.ceil(period_s)}")]


class RateLimiter:
    """Counts requests per (client, window); thread-safe."""

    def __init__(self, rule: RateLimit, clock: Callable[[], float] = time.time):
        self.rule = rule
        self.clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}  # client -> (window number, requests in it)

    def hit(self, client: str) -> Decision:
        now = self.clock()
        window = math.floor(now / self.rule.period_s)
        reset_at = (window + 1) * self.rule.period_s
        with self._lock:
            w, n = self._counts.get(client, (window, 0))
            if w != window:
                n = 0
            n += 1
            self._counts[client] = (window, n)
        allowed = n <= self.rule.limit
        retry = max(1, math.ceil(reset_at - now))
        return Decision(allowed, self.rule.limit, max(0, self.rule.limit - n), reset_at, retry)

"""What a host allows us to fetch and mine: robots.txt (RFC 9309) and TDM reservations (W3C TDMRep).

**robots.txt**, fetched once per origin (scheme, host, port) and kept :data:`ROBOTS_TTL_S`
(24 h, RFC 9309 §2.4), parsed by ``protego`` (Scrapy's RFC 9309 parser) for likerank's product
token (the User-Agent up to its first ``/``):

- 2xx: its rules apply; ``Crawl-delay`` or ``Request-rate`` for us tightens the host's rate in
  the limiter (:meth:`~pipeline.scrape.limiter.Limiter.tighten`);
- 4xx (429 aside): no robots.txt, everything is allowed (§2.3.1.3);
- 5xx, 429, or unreachable: everything is disallowed (§2.3.1.4), for :data:`UNREACHABLE_TTL_S`,
  then asked again; such a verdict is never shared.

**TDMRep** (W3C TDM Reservation Protocol, final community group report): a response header
``tdm-reservation: 1`` reserves that resource; otherwise ``/.well-known/tdmrep.json`` of its
origin, a JSON list of ``{"location": <path pattern>, "tdm-reservation": 0|1, "tdm-policy": <url>}``,
decides: the first rule whose location matches (TDMRep: "the most specific match is the first
in sequence"; unlike robots.txt, not the longest). Locations use robots.txt's pattern syntax
(``*`` any run of characters, a final ``$`` the end of the path), are matched case-sensitively
from the start of the path (with its query), after percent-escapes of unreserved characters are
decoded on both sides. A header overrides the file; a value other than 0 or 1 is a protocol
error and counts as unset. A file that cannot be fetched or parsed means the origin does not
use the protocol.

Every fetch goes through the ``fetch`` callable the policy is given (:func:`client_fetch`
wraps :class:`~pipeline.scrape.http.HttpClient`, with its SSRF guard, retries and byte limit).
With a Redis client, fetched robots.txt and tdmrep.json bodies are shared by every worker for
their TTL, so a host is asked once a day, not once per worker.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
from protego import Protego

if TYPE_CHECKING:
    from pipeline.scrape.http import HttpClient
    from pipeline.scrape.limiter import Limiter

log = logging.getLogger(__name__)

#: How long a fetched robots.txt or tdmrep.json is trusted, seconds (RFC 9309 §2.4: at most 24 h).
ROBOTS_TTL_S = 24 * 3600.0
#: How long "robots.txt unreachable: disallow all" holds before robots.txt is asked again, seconds.
UNREACHABLE_TTL_S = 15 * 60.0
#: Largest robots.txt or tdmrep.json read, bytes (RFC 9309 §2.5: parse at least 500 KiB).
MAX_POLICY_BYTES = 500 * 1024
ROBOTS_PATH = "/robots.txt"
TDMREP_PATH = "/.well-known/tdmrep.json"
#: Key prefix of the shared cache in Redis.
KEY_PREFIX = "likerank:polite:policy"

#: ``fetch(url) -> (HTTP status, body)``; status None when the server could not be reached (or
#: the body was cut off). A body past :data:`MAX_POLICY_BYTES` should count as unreachable.
Fetch = Callable[[str], tuple[int | None, bytes]]

_UNRESERVED_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def client_fetch(client: HttpClient) -> Fetch:
    """A :data:`Fetch` through ``client``: the SSRF guard, redirects, retries and a
    :data:`MAX_POLICY_BYTES` limit; a too-large or failed fetch is unreachable."""

    def fetch(url: str) -> tuple[int | None, bytes]:
        res = client.fetch(url, max_bytes=MAX_POLICY_BYTES, total_timeout_s=client.cfg.total_timeout_s)
        if res.ok:
            return 200, res.body or b""
        if res.status == "http_error" and res.http_status is not None:
            return res.http_status, b""
        return None, b""

    return fetch


def product_token(user_agent: str) -> str:
    """The token robots.txt groups name us by: ``likerank/0.1 (+url)`` -> ``likerank``."""
    return user_agent.split("/", 1)[0].split()[0] if user_agent.strip() else "*"


# --------------------------------------------------------------------------- TDMRep


@dataclass(frozen=True)
class TdmRule:
    """One rule of a tdmrep.json file."""

    location: str  # a path pattern (robots.txt syntax)
    reserved: bool  # tdm-reservation 1
    policy: str | None  # tdm-policy: where the rightsholder's licensing terms are


def tdm_header(headers: Mapping[str, str]) -> bool | None:
    """The ``tdm-reservation`` header: True for 1, False for 0, None when absent or invalid."""
    value = _header(headers, "tdm-reservation")
    if value is None:
        return None
    value = value.strip()
    return True if value == "1" else False if value == "0" else None


def parse_tdmrep(body: bytes) -> list[TdmRule]:
    """The rules of a tdmrep.json body, in file order; rules with an invalid location or
    reservation are skipped (protocol errors: unset). Not JSON, or not a list: no rules."""
    try:
        parsed: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(parsed, list):
        return []
    rules = []
    for item in parsed:
        if not isinstance(item, dict):
            continue
        location, reservation = item.get("location"), item.get("tdm-reservation")
        if not isinstance(location, str) or not location or isinstance(reservation, bool) \
                or reservation not in (0, 1, "0", "1"):
            continue
        policy = item.get("tdm-policy")
        rules.append(TdmRule(location, int(reservation) == 1, policy if isinstance(policy, str) else None))
    return rules


def location_matches(pattern: str, target: str) -> bool:
    """Whether path pattern ``pattern`` (``*``: any run of characters; a final ``$``: the end)
    matches ``target`` (a path with its query) from its start, case-sensitively, with
    percent-escapes of unreserved characters decoded on both sides."""
    pattern, target = _normalize(pattern), _normalize(target)
    anchored = pattern.endswith("$")
    body = pattern[:-1] if anchored else pattern
    regex = ".*".join(re.escape(part) for part in body.split("*")) + ("$" if anchored else "")
    return re.match(regex, target) is not None


def tdm_rule_for(rules: list[TdmRule], url: str) -> TdmRule | None:
    """The rule that decides ``url``: the first in file order whose location matches."""
    target = _path_of(url)
    return next((rule for rule in rules if location_matches(rule.location, target)), None)


def _normalize(path: str) -> str:
    """Decode ``%XX`` of unreserved characters (RFC 3986 §2.3); upper-case the other escapes."""

    def fix(m: re.Match[str]) -> str:
        char = chr(int(m.group(1), 16))
        return char if char.isascii() and (char.isalnum() or char in "-._~") else "%" + m.group(1).upper()

    return _UNRESERVED_ESCAPE.sub(fix, path)


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None and not hasattr(headers, "lower_items"):  # a plain dict: match case-insensitively
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


# --------------------------------------------------------------------------- the policy


@dataclass
class _Robots:
    """What one origin's robots.txt says, and until when (monotonic) we trust it."""

    rules: Protego | None  # None: no rules (4xx: allow all) or unreachable (see ``reachable``)
    reachable: bool
    detail: str  # for the reasons: "HTTP 503", "connection failed"
    expires: float


@dataclass
class _Tdm:
    rules: list[TdmRule]
    expires: float


class RobotsPolicy:
    """robots.txt and TDMRep verdicts per URL, each origin's files fetched once per TTL.

    ``limiter``: where a ``Crawl-delay`` or ``Request-rate`` tightens the host's rate.
    ``shared``: a Redis client whose cache every worker reads (optional; a Redis error falls
    back to fetching). Thread-safe; one fetch per origin at a time.
    """

    def __init__(self, fetch: Fetch, user_agent: str, *, limiter: Limiter | None = None,
                 shared: redis.Redis | None = None, clock: Callable[[], float] = time.monotonic):
        self.fetch, self.token = fetch, product_token(user_agent)
        self.limiter, self.shared, self.clock = limiter, shared, clock
        self._robots: dict[str, _Robots] = {}
        self._tdm: dict[str, _Tdm] = {}
        self._lock = threading.Lock()
        self._origin_locks: dict[str, threading.Lock] = {}

    # ----------------------------------------------------------------- robots.txt

    def robots_refusal(self, url: str) -> str | None:
        """Why robots.txt forbids fetching ``url`` (a sentence naming the origin), or None."""
        origin = _origin(url)
        robots = self._robots_of(origin)
        if not robots.reachable:
            return (f"robots.txt of {origin} unreachable ({robots.detail}): everything there is "
                    f"disallowed for now (RFC 9309 2.3.1.4)")
        if robots.rules is not None and not robots.rules.can_fetch(url, self.token):
            return f"robots.txt of {origin} disallows {_path_of(url)} for {self.token}"
        return None

    def allowed(self, url: str) -> bool:
        return self.robots_refusal(url) is None

    def robots_reachable(self, url: str) -> bool:
        """Whether ``url``'s origin answered for its robots.txt: when not, its refusal is for
        now (RFC 9309 2.3.1.4), and a later run may ask again."""
        return self._robots_of(_origin(url)).reachable

    def crawl_delay_s(self, url: str) -> float | None:
        """The least seconds between two requests robots.txt asks of us (``Crawl-delay``, or
        ``Request-rate`` as seconds per request, whichever is longer); None when it asks none."""
        rules = self._robots_of(_origin(url)).rules
        return None if rules is None else _delay_s(rules, self.token)

    def _robots_of(self, origin: str) -> _Robots:
        with self._lock:
            cached = self._robots.get(origin)
            if cached is not None and cached.expires > self.clock():
                return cached
            origin_lock = self._origin_locks.setdefault(origin, threading.Lock())
        with origin_lock:
            with self._lock:  # another thread may have fetched it meanwhile
                cached = self._robots.get(origin)
                if cached is not None and cached.expires > self.clock():
                    return cached
            robots = self._load_robots(origin)
            with self._lock:
                self._robots[origin] = robots
        if robots.rules is not None and self.limiter is not None:
            delay = _delay_s(robots.rules, self.token)
            if delay:
                self.limiter.tighten(urlsplit(origin).hostname or "", 1.0 / delay)
        return robots

    def _load_robots(self, origin: str) -> _Robots:
        status, body = self._fetch_shared(origin + ROBOTS_PATH)
        now = self.clock()
        if status is not None and 200 <= status < 300:
            return _Robots(Protego.parse(body.decode("utf-8", errors="replace")), True, f"HTTP {status}",
                           now + ROBOTS_TTL_S)
        if status is not None and 400 <= status < 500 and status != 429:
            return _Robots(None, True, f"HTTP {status}", now + ROBOTS_TTL_S)
        detail = f"HTTP {status}" if status is not None else "no response"
        log.warning("robots.txt of %s unreachable (%s): nothing is fetched there for %.0f min",
                    origin, detail, UNREACHABLE_TTL_S / 60)
        return _Robots(None, False, detail, now + UNREACHABLE_TTL_S)

    # ----------------------------------------------------------------- TDMRep

    def tdm_refusal(self, url: str, headers: Mapping[str, str] | None = None) -> str | None:
        """Why text and data mining of ``url`` is reserved (a sentence), or None. ``headers``:
        the response's, when it was fetched (its ``tdm-reservation`` overrides the file)."""
        header = tdm_header(headers) if headers is not None else None
        if header is not None:
            return f"tdm-reservation: 1 on {url}" if header else None
        rule = tdm_rule_for(self._tdm_rules_of(_origin(url)), url)
        if rule is None or not rule.reserved:
            return None
        policy = f" (policy: {rule.policy})" if rule.policy else ""
        return f"{TDMREP_PATH} of {_origin(url)} reserves {rule.location!r}{policy}"

    def _tdm_rules_of(self, origin: str) -> list[TdmRule]:
        with self._lock:
            cached = self._tdm.get(origin)
            if cached is not None and cached.expires > self.clock():
                return cached.rules
            origin_lock = self._origin_locks.setdefault(origin, threading.Lock())
        with origin_lock:
            with self._lock:
                cached = self._tdm.get(origin)
                if cached is not None and cached.expires > self.clock():
                    return cached.rules
            status, body = self._fetch_shared(origin + TDMREP_PATH)
            rules = parse_tdmrep(body) if status is not None and 200 <= status < 300 else []
            with self._lock:
                self._tdm[origin] = _Tdm(rules, self.clock() + ROBOTS_TTL_S)
            return rules

    # ----------------------------------------------------------------- fetching, shared

    def _fetch_shared(self, url: str) -> tuple[int | None, bytes]:
        """``fetch(url)``, through the shared cache when there is one. Only answers the server
        gave (2xx, 4xx) are shared; an unreachable one is this worker's own."""
        key = f"{KEY_PREFIX}:{url}"
        if self.shared is not None:
            try:
                hit = self.shared.get(key)
            except redis.RedisError:
                hit = None
            if hit is not None:
                status, _, body = hit.partition(b"\n")
                return int(status), body
        status, body = self.fetch(url)
        if self.shared is not None and status is not None and status < 500 and status != 429:
            try:
                self.shared.set(key, str(status).encode() + b"\n" + body, ex=int(ROBOTS_TTL_S))
            except redis.RedisError:
                pass
        return status, body


def _origin(url: str) -> str:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"robots: not an absolute URL: {url!r}")
    return f"{parts.scheme.lower()}://{parts.netloc.lower().rsplit('@', 1)[-1]}"


def _delay_s(rules: Protego, token: str) -> float | None:
    delays = []
    if (delay := rules.crawl_delay(token)) is not None and delay > 0:
        delays.append(float(delay))
    if (rate := rules.request_rate(token)) is not None and rate.requests > 0:
        delays.append(rate.seconds / rate.requests)
    return max(delays) if delays else None

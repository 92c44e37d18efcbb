"""Fault modes the simulator's server can inject, each off until switched on.

A rule names a mode and what it targets:

* ``scope`` — ``api`` (``/api/...`` and Bluesky's ``/xrpc/...``), ``media`` (attachment files,
  Bluesky's ``/img/...`` and ``/watch/...`` included) or ``all``; each mode has a default
  (table below).
* ``post_ids`` — only requests about these statuses: their attachment files, their
  ``/api/v1/statuses/:id``, and (``missing_fields``) their entries in timeline pages.
  Empty = any request in scope. A Bluesky post is named by its world status id too (the
  ``post_id`` of the truth table, not its rkey or at-URI), so one rule can target both
  platforms: its image files and (``missing_fields``) its post views in search and getPosts.
* ``fraction`` — the share of targets hit, chosen by a stable hash of (mode, target): the
  same URL is hit every time, so a test knows which items must end as error rows
  (:meth:`FaultRule.selects`). The target is the attachment id for media, the status id for
  ``/statuses/:id`` and per-status faults, and the path with query otherwise.
* ``count`` — fire at most this many times, then behave normally (a *burst*; ``None`` =
  forever).

==================  =======  ===========================================================
mode                scope    what the client gets (parameters, defaults)
==================  =======  ===========================================================
error_5xx           all      ``status`` (503) with a JSON error body
slow                all      the normal response after sleeping ``delay_s`` (2.0) seconds
truncated           media    full ``Content-Length``, then the connection closes after
                             ``keep_fraction`` (0.5) of the body
wrong_content_type  media    the normal body labeled ``content_type`` ("text/html; charset=utf-8")
html                api      an HTML error page with ``status`` (200) and ``text/html``
malformed_json      api      ``application/json`` whose body is cut in the middle
missing_fields      api      statuses without ``fields`` (["account", "created_at"]); in
                             Bluesky post views "account" drops ``author``, "created_at"
                             drops ``record.createdAt``, any other name the view key of that
                             name, "record.<key>" a key of the record
bomb                media    a valid 1-bit PNG of ``width`` x ``height`` (30,000 x 30,000 =
                             9e8 pixels) in ~110 kB
oversized           media    ``size_bytes`` (64 MiB) streamed; ``declare_length`` (true) sends
                             ``Content-Length``, false ends the body by closing
redirect_loop       media    302 between the URL and ``URL?loop=1`` forever
redirect_private    media    302 to ``target`` ("http://169.254.169.254/latest/meta-data/"),
                             e.g. "http://10.0.0.1/x.jpg"
redirect_origin     api      302 to the same path on another origin of this server: ``host``
                             ("localhost") instead of 127.0.0.1 (see ``SimServer.credentials_seen``)
bad_media_url       api      statuses whose attachment URLs are malformed (``http://[::1/<id>.jpg``)
retry_after         all      429 with ``Retry-After: seconds`` (315,360,000: ten years); on
                             XRPC also ``RateLimit-Reset`` (Unix seconds, now + seconds) and
                             ``{"error": "RateLimitExceeded"}``
expired_token       api      XRPC only: an authenticated request gets 400 ``ExpiredToken`` and
                             its access token is expired from then on, so the client must
                             call ``refreshSession``; ``count`` bounds how many requests fire
==================  =======  ===========================================================

On XRPC every error body is ``{"error": <Name>, "message": ...}``: ``error_5xx`` names the
status as the XRPC client libraries do (500 InternalServerError, 502 UpstreamFailure, 503
NotEnoughResources, 504 UpstreamTimeout), ``html`` and ``malformed_json`` replace the body of
a successful response, as for Mastodon.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any

#: mode -> (default scope, default parameters)
MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "error_5xx": ("all", {"status": 503}),
    "slow": ("all", {"delay_s": 2.0}),
    "truncated": ("media", {"keep_fraction": 0.5}),
    "wrong_content_type": ("media", {"content_type": "text/html; charset=utf-8"}),
    "html": ("api", {"status": 200}),
    "malformed_json": ("api", {}),
    "missing_fields": ("api", {"fields": ["account", "created_at"]}),
    "bomb": ("media", {"width": 30_000, "height": 30_000}),
    "oversized": ("media", {"size_bytes": 64 * 1024 * 1024, "declare_length": True}),
    "redirect_loop": ("media", {}),
    "redirect_private": ("media", {"target": "http://169.254.169.254/latest/meta-data/"}),
    "redirect_origin": ("api", {"host": "localhost"}),
    "bad_media_url": ("api", {}),
    "retry_after": ("all", {"seconds": 315_360_000}),
    "expired_token": ("api", {}),
}
SCOPES = ("api", "media", "all")


class FaultError(ValueError):
    """A fault rule is malformed (unknown mode, scope or parameter)."""


@dataclass
class FaultRule:
    mode: str
    scope: str
    fraction: float = 1.0
    post_ids: frozenset[str] = frozenset()
    count: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    fired: int = 0

    def selects(self, target: str) -> bool:
        """Whether the stable hash of (mode, target) falls in the rule's fraction."""
        if self.fraction >= 1.0:
            return True
        h = int.from_bytes(hashlib.sha256(f"{self.mode}:{target}".encode()).digest()[:8], "big")
        return h / 2**64 < self.fraction

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "scope": self.scope, "fraction": self.fraction,
                "post_ids": sorted(self.post_ids), "count": self.count, "params": self.params,
                "fired": self.fired}


def make_rule(mode: str, *, fraction: float = 1.0, post_ids: Any = (), count: int | None = None,
              scope: str | None = None, **params: Any) -> FaultRule:
    if mode not in MODES:
        raise FaultError(f"fault: unknown mode {mode!r} (known: {', '.join(MODES)})")
    default_scope, defaults = MODES[mode]
    scope = scope or default_scope
    if scope not in SCOPES:
        raise FaultError(f"fault {mode}: scope must be one of {SCOPES}, got {scope!r}")
    unknown = set(params) - set(defaults)
    if unknown:
        raise FaultError(f"fault {mode}: unknown parameter(s) {sorted(unknown)} (known: {sorted(defaults)})")
    if not 0.0 <= float(fraction) <= 1.0:
        raise FaultError(f"fault {mode}: fraction must be within 0..1, got {fraction}")
    if count is not None and int(count) < 0:
        raise FaultError(f"fault {mode}: count must be >= 0, got {count}")
    if isinstance(post_ids, str):
        post_ids = [post_ids]
    return FaultRule(mode, scope, float(fraction), frozenset(str(p) for p in post_ids),
                     None if count is None else int(count), {**defaults, **params})


class FaultSet:
    """The active rules (at most one per mode); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: dict[str, FaultRule] = {}
        self.hits: dict[str, int] = {}

    def set(self, rule: FaultRule) -> None:
        with self._lock:
            self._rules[rule.mode] = rule

    def clear(self, mode: str | None = None) -> None:
        with self._lock:
            if mode is None:
                self._rules.clear()
            else:
                self._rules.pop(mode, None)

    def rules(self) -> list[FaultRule]:
        with self._lock:
            return list(self._rules.values())

    def __bool__(self) -> bool:
        return bool(self._rules)

    def fire(self, mode: str, scope: str, target: str, post_id: str | None = None) -> FaultRule | None:
        """The rule for ``mode`` if it applies to this request (counting it as fired), else None."""
        with self._lock:
            rule = self._rules.get(mode)
            if rule is None or (rule.scope != "all" and rule.scope != scope):
                return None
            if rule.post_ids and post_id not in rule.post_ids:
                return None
            if rule.count is not None and rule.fired >= rule.count:
                return None
            if not rule.selects(target):
                return None
            rule.fired += 1
            self.hits[mode] = self.hits.get(mode, 0) + 1
            return rule


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=4)
def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid black 1-bit grayscale PNG: tiny file, enormous decoded size."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    rows_per_chunk = max(1, (4 << 20) // len(row))
    parts = []
    left = height
    while left:
        k = min(left, rows_per_chunk)
        parts.append(comp.compress(row * k))
        left -= k
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


HTML_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
    b"<title>We're sorry, but something went wrong (500)</title></head>"
    b"<body><div class=\"dialog\"><h1>We're sorry, but something went wrong.</h1>"
    b"<p>The server is temporarily unavailable. Please try again later.</p></div></body></html>\n"
)


def truncate_json(body: bytes) -> bytes:
    """Cut a JSON document in the middle (as a dropped proxy connection would)."""
    return body[: max(1, len(body) // 2)]

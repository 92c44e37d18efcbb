"""Select the statuses of a hashtag timeline page the way Mastodon paginates them.

Mastodon's ``paginate_by_id``: with ``min_id`` it takes the ``limit`` statuses immediately
newer than ``min_id`` (oldest first) and returns them newest first; otherwise it takes the
``limit`` newest statuses older than ``max_id`` and newer than ``since_id``. ``limit``
defaults to 20 and is capped at 40 (``[limit.to_i.abs, 2 * 20].min``). The ``Link`` header
carries the permitted params (``local``, ``limit``, ``only_media``) plus ``max_id`` of the
last status (``rel="next"``) and ``min_id`` of the first (``rel="prev"``); an empty page has
no ``Link`` header.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, urlencode

import numpy as np

from simulator.world import World

DEFAULT_LIMIT = 20
MAX_LIMIT = 40
LINK_PARAMS = ("local", "limit", "only_media")  # Api::V1::Timelines::TagController::PERMITTED_PARAMS


class BadParam(ValueError):
    """A query parameter Mastodon would refuse (answered with 422)."""


@dataclass(frozen=True)
class TagQuery:
    tag: str
    limit: int = DEFAULT_LIMIT
    max_id: int | None = None
    since_id: int | None = None
    min_id: int | None = None
    only_media: bool = False
    any: tuple[str, ...] = ()
    all: tuple[str, ...] = ()
    none: tuple[str, ...] = ()


def _truthy(v: str) -> bool:
    return v.strip().lower() in ("1", "true", "t", "on", "yes")


def _id(name: str, v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise BadParam(f"{name}: not a status id: {v!r}") from None


def parse_limit(v: str | None) -> int:
    """Ruby's ``to_i.abs`` capped at MAX_LIMIT; absent = DEFAULT_LIMIT."""
    if v is None:
        return DEFAULT_LIMIT
    digits = ""
    for ch in v.strip().lstrip("+-"):
        if not ch.isdigit():
            break
        digits += ch
    return min(int(digits or 0), MAX_LIMIT)


def parse_query(tag: str, params: dict[str, list[str]]) -> TagQuery:
    def one(name: str) -> str | None:
        vals = params.get(name)
        return vals[-1] if vals else None

    def many(name: str) -> tuple[str, ...]:
        return tuple(t.lower() for t in params.get(f"{name}[]", []) + params.get(name, []) if t)

    return TagQuery(
        tag=tag.lower(),
        limit=parse_limit(one("limit")),
        max_id=_id("max_id", v) if (v := one("max_id")) else None,
        since_id=_id("since_id", v) if (v := one("since_id")) else None,
        min_id=_id("min_id", v) if (v := one("min_id")) else None,
        only_media=_truthy(one("only_media") or ""),
        any=many("any"), all=many("all"), none=many("none"),
    )


class TimelineIndex:
    """Per world: status ids as integers and a fast tag -> candidates lookup."""

    def __init__(self, world: World):
        self.world = world
        self.ids = np.array([int(p.id) for p in world.posts], dtype=np.int64)
        self.has_media = np.array([bool(p.media) for p in world.posts])
        self.tagsets = [frozenset(world.posts[p.reblog_of].tags if p.kind == "boost" else p.tags)
                        for p in world.posts]
        # Served on Mastodon: statuses of Mastodon accounts, except boosts of Bluesky posts
        # (a cross-platform boost is visible on neither API).
        on_bsky = world.on_bluesky
        self.served = np.array([
            not on_bsky[p.author] and (p.kind != "boost" or not on_bsky[world.posts[p.reblog_of].author])
            for p in world.posts
        ], dtype=bool)
        self.mixed = not bool(self.served.all()) if len(self.served) else False

    def n_visible(self, now_ms: int) -> int:
        """Statuses of either platform created at or before ``now_ms``."""
        return int(np.searchsorted(self.world.created_ms, now_ms, side="right"))

    def n_served(self, now_ms: int) -> int:
        """Statuses the Mastodon API serves at ``now_ms``."""
        n = self.n_visible(now_ms)
        return int(np.count_nonzero(self.served[:n])) if self.mixed else n

    def select(self, q: TagQuery, now_ms: int) -> list[int]:
        """Post indices of the page, newest first."""
        idx = self.world.tag_index
        cands = idx.get(q.tag, np.empty(0, dtype=np.int64))
        for t in q.any:
            cands = np.union1d(cands, idx.get(t, np.empty(0, dtype=np.int64)))
        cands = cands[cands < self.n_visible(now_ms)]
        if self.mixed:
            cands = cands[self.served[cands]]
        if q.only_media:
            cands = cands[self.has_media[cands]]
        if q.all or q.none:
            need, avoid = set(q.all), set(q.none)
            keep = [c for c in cands if need <= self.tagsets[c] and not avoid & self.tagsets[c]]
            cands = np.asarray(keep, dtype=np.int64)
        ids = self.ids[cands]
        lo, hi = 0, len(cands)  # candidate range [lo, hi) in ascending id order
        if q.max_id is not None:
            hi = int(np.searchsorted(ids, q.max_id, side="left"))
        if q.min_id is not None:
            lo = int(np.searchsorted(ids, q.min_id, side="right"))
            return [int(c) for c in cands[lo:min(hi, lo + q.limit)][::-1]]
        if q.since_id is not None:
            lo = int(np.searchsorted(ids, q.since_id, side="right"))
        return [int(c) for c in cands[max(lo, hi - q.limit):hi][::-1]]


def link_header(base: str, tag: str, params: dict[str, list[str]], first_id: str, last_id: str) -> str:
    """``Link: <...max_id=LAST>; rel="next", <...min_id=FIRST>; rel="prev"`` as Mastodon sends it."""
    kept = [(k, params[k][-1]) for k in LINK_PARAMS if params.get(k)]
    url = f"{base}/api/v1/timelines/tag/{quote(tag, safe='')}"
    nxt = f"{url}?{urlencode([*kept, ('max_id', last_id)])}"
    prv = f"{url}?{urlencode([*kept, ('min_id', first_id)])}"
    return f'<{nxt}>; rel="next", <{prv}>; rel="prev"'

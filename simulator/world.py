"""Generate the simulator's social world: accounts, statuses, attachments and their engagement.

Deterministic from ``(seed, posts, hashtags, now, bluesky_share)``: the same parameters give
identical worlds (ids, texts, image plans, like arrivals) on every run, since every random
draw comes from numpy's PCG64 streams spawned from the seed, one stream per concern so that,
e.g., changing how captions are drawn does not move follower counts.

Shape of the world (numbers are defaults; the likes model is in :mod:`.likes`):

* ``max(10, posts // 3)`` accounts. Followers log-normal (median 250, log-sd 1.5) plus a 1%
  tail of popular accounts, log-uniform 30,000..800,000. 12% are ``discoverable: false``,
  20% ``indexable: false``, 2% bots. Posting activity per account is log-normal (sd 1).
* ``posts`` statuses created uniformly over the ``DAYS_BEFORE`` = 90 days before ``now`` and
  the ``DAYS_AFTER`` = 14 days after it (those appear as the clock advances). Kinds: 86%
  photo posts, 4% text-only, 4% video, 6% boosts (``reblog`` set) of an earlier photo post,
  boosted 0..several days later.
* Every non-boost status carries one of the world's hashtags plus Poisson(1.2) extra tags.
* Photo posts have 1 + min(Poisson(0.35), 3) images; the first decides quality. An image is
  a single face with probability 0.58, the group photo with 0.08 and faceless with 0.34
  (about a third of posts carry no face).
* Status ids are Mastodon snowflakes: ``(unix_ms << 16) | 16 random bits``, strings,
  increasing with ``created_at``.
* Each account lives on Mastodon or, with probability ``bluesky_share`` (default 0), on
  Bluesky; a post lives where its author does. The draw comes from a stream of its own that
  is spawned after the others, so a world with ``bluesky_share = 0`` is exactly the world
  generated before platforms existed, and changing the share moves nothing but platforms.
  A boost by a Bluesky author is a repost (not a post there; see :mod:`.bluesky`), and a
  Mastodon boost of a Bluesky post is served by neither API.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from simulator.images import ImageFactors, ImagePlan, draw_factors, plan_image
from simulator.likes import (
    NOISE_SD,
    Engagement,
    draw_engagement,
    expected_likes,
    visual_quality,
)

DEFAULT_NOW = datetime(2025, 6, 2, tzinfo=UTC)
DAYS_BEFORE = 90.0
DAYS_AFTER = 14.0
DAY_MS = 86_400_000

KINDS = ("photo", "text", "video", "boost")
PLATFORMS = ("mastodon", "bluesky")
KIND_P = (0.86, 0.04, 0.04, 0.06)
IMAGE_KIND_P = {"face": 0.58, "group": 0.08, "noface": 0.34}
EXTRA_TAGS = (
    "me", "portrait", "photography", "nofilter", "sunday", "friends", "travel", "happy", "love",
    "photooftheday", "fashion", "smile", "summer", "art", "mastodon", "fediverse", "weekend",
    "goodmorning", "instagood", "cute", "style", "girl", "boy", "beach", "city", "coffee", "cat",
)
LANGUAGES = ("en", "de", "fr", "es", "ja", "pt")
LANGUAGE_P = (0.70, 0.08, 0.07, 0.07, 0.04, 0.04)
CAPTIONS = (
    "New haircut, who dis", "Sunday mood", "Finally some sun", "Me, again", "Trying a new filter",
    "Good morning everyone", "First selfie on here", "Coffee first", "Back from the trip",
    "Felt cute", "Birthday vibes", "Monday...", "Hello fediverse", "Late night thoughts", "",
)
WORDS = (
    "amber", "birch", "cedar", "delta", "ember", "fjord", "glade", "harbor", "iris", "juniper",
    "kestrel", "lumen", "maple", "nova", "orchid", "pebble", "quartz", "raven", "sage", "tundra",
    "umber", "vale", "willow", "xeno", "yarrow", "zephyr",
)
ALT_TEXT = {
    "face": "A selfie", "group": "Friends around a card table", "chelsea": "A tabby cat",
    "coffee": "A cup of coffee", "rocket": "A rocket on the launch pad", "brick": "A brick wall",
    "grass": "Grass", "gravel": "Gravel", "motorcycle": "A motorcycle", "hubble": "Galaxies",
}


@dataclass(frozen=True)
class Account:
    index: int
    id: str
    username: str
    display_name: str
    followers: int
    following: int
    statuses_base: int  # statuses outside the world's window (the count's constant part)
    created_ms: int
    discoverable: bool
    indexable: bool
    bot: bool


@dataclass(frozen=True)
class Media:
    index: int
    id: str
    post: int
    type: str  # image | video
    plan: ImagePlan  # the image itself, or a video's preview frame
    description: str | None


@dataclass(frozen=True)
class Post:
    index: int
    id: str
    created_ms: int
    author: int
    kind: str  # photo | text | video | boost
    tags: tuple[str, ...]  # lower case; the first is one of the world's hashtags; () for boosts
    media: tuple[int, ...]
    reblog_of: int  # index of the boosted post, or -1
    language: str
    sensitive: bool
    spoiler_text: str
    caption: str
    quality: float  # NaN for boosts
    visual_quality: float

    @property
    def first_image(self) -> int:
        return self.media[0] if self.kind == "photo" else -1


@dataclass(frozen=True)
class WorldParams:
    seed: int = 7
    posts: int = 5000
    hashtags: tuple[str, ...] = ("selfie",)
    now: datetime = DEFAULT_NOW  # the world's "now" when its server starts (UTC)
    bluesky_share: float = 0.0  # share of accounts that live on Bluesky (0..1)


@dataclass
class World:
    params: WorldParams
    accounts: list[Account]
    posts: list[Post]
    media: list[Media]
    engagement: Engagement
    created_ms: np.ndarray  # per post, ascending (posts are in id order)
    post_by_id: dict[str, int] = field(repr=False)
    account_by_id: dict[str, int] = field(repr=False)
    media_by_id: dict[str, int] = field(repr=False)
    tag_index: dict[str, np.ndarray] = field(repr=False)  # tag -> post indices, ascending
    author_created: list[np.ndarray] = field(repr=False)  # per account: its statuses' created_ms
    on_bluesky: np.ndarray = field(repr=False)  # per account: bool, the account lives on Bluesky

    @property
    def now_ms(self) -> int:
        return int(self.params.now.timestamp() * 1000)

    def account_platform(self, account: int) -> str:
        """Where an account lives: "mastodon" or "bluesky"."""
        return PLATFORMS[int(self.on_bluesky[account])]

    def platform(self, post: int) -> str:
        """Where a post lives: its author's platform, "mastodon" or "bluesky"."""
        return self.account_platform(self.posts[post].author)

    def counts(self, post: int, now_ms: int) -> tuple[int, int, int]:
        """(favourites, reblogs, replies) of a post when the world's clock reads ``now_ms``."""
        age_days = (now_ms - self.posts[post].created_ms) / DAY_MS
        return self.engagement.counts(post, age_days)


def snowflake(ms: int, low: int) -> int:
    """Mastodon's id layout: milliseconds since the Unix epoch in the high bits, 16 low bits."""
    return (ms << 16) | (low & 0xFFFF)


def _streams(seed: int) -> dict[str, np.random.Generator]:
    names = ("accounts", "times", "tags", "media", "quality", "engagement", "text", "ids")
    root = np.random.SeedSequence(seed)
    children = root.spawn(len(names))
    # Streams added later are spawned in a second call: their spawn keys come after the
    # first eight, which therefore draw exactly what they drew before the addition.
    later = ("platform",)
    children += root.spawn(len(later))
    return {n: np.random.Generator(np.random.PCG64(c)) for n, c in zip(names + later, children, strict=True)}


def _accounts(rng: np.random.Generator, n: int, now_ms: int, id_rng: np.random.Generator) -> list[Account]:
    followers = np.exp(rng.normal(np.log(250.0), 1.5, size=n))
    popular = rng.random(n) < 0.01
    followers[popular] = np.exp(rng.uniform(np.log(30_000), np.log(800_000), size=int(popular.sum())))
    following = np.exp(rng.normal(np.log(180.0), 1.0, size=n))
    statuses_base = np.exp(rng.normal(np.log(120.0), 1.2, size=n))
    created = now_ms - (rng.uniform(60, 2200, size=n) * DAY_MS).astype(np.int64)
    discoverable = rng.random(n) >= 0.12
    indexable = rng.random(n) >= 0.20
    bot = rng.random(n) < 0.02
    w1 = rng.integers(len(WORDS), size=n)
    w2 = rng.integers(len(WORDS), size=n)
    lows = id_rng.integers(0, 1 << 16, size=n)
    out = []
    for i in range(n):
        username = f"{WORDS[w1[i]]}_{WORDS[w2[i]]}{i}"
        out.append(Account(
            index=i, id=str(snowflake(int(created[i]), int(lows[i]))), username=username,
            display_name=f"{WORDS[w1[i]].title()} {WORDS[w2[i]].title()}",
            followers=int(followers[i]), following=int(following[i]), statuses_base=int(statuses_base[i]),
            created_ms=int(created[i]), discoverable=bool(discoverable[i]), indexable=bool(indexable[i]),
            bot=bool(bot[i]),
        ))
    return out


def generate_world(params: WorldParams) -> World:
    """Build a world (metadata and image plans only; pixels are rendered on request)."""
    if params.posts < 1:
        raise ValueError(f"simulator world: posts must be >= 1, got {params.posts}")
    hashtags = tuple(h.lower().lstrip("#") for h in params.hashtags)
    if not hashtags or any(not h for h in hashtags):
        raise ValueError(f"simulator world: need at least one non-empty hashtag, got {params.hashtags!r}")
    if not 0.0 <= params.bluesky_share <= 1.0:
        raise ValueError(f"simulator world: bluesky_share must be within 0..1, got {params.bluesky_share}")
    rs = _streams(params.seed)
    now_ms = int(params.now.timestamp() * 1000)
    n = params.posts
    accounts = _accounts(rs["accounts"], max(10, n // 3), now_ms, rs["ids"])
    activity = np.exp(rs["accounts"].normal(0.0, 1.0, size=len(accounts)))
    activity /= activity.sum()
    on_bluesky = rs["platform"].random(len(accounts)) < params.bluesky_share

    # ---- kinds, times, authors (boosts come after the post they boost)
    tr = rs["times"]
    kinds = tr.choice(len(KINDS), size=n, p=KIND_P)
    if kinds[0] == 3:
        kinds[0] = 0  # a boost needs an earlier post to boost
    t = now_ms + (tr.uniform(-DAYS_BEFORE, DAYS_AFTER, size=n) * DAY_MS).astype(np.int64)
    authors = tr.choice(len(accounts), size=n, p=activity)
    originals = np.flatnonzero(kinds == 0)
    if originals.size == 0:
        kinds[0] = 0
        originals = np.array([0])
    reblog_of = np.full(n, -1, dtype=np.int64)
    for i in np.flatnonzero(kinds == 3):
        o = int(originals[tr.integers(originals.size)])
        reblog_of[i] = o
        t[i] = t[o] + int(tr.exponential(1.5) * DAY_MS) + 1000  # boosted a bit later
    # Sort by (time, random low bits): that order is the id order.
    lows = rs["ids"].integers(0, 1 << 16, size=n)
    order = np.lexsort((lows, t))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    kinds, t, authors, lows = kinds[order], t[order], authors[order], lows[order]
    reblog_of = np.where(reblog_of[order] >= 0, rank[np.maximum(reblog_of[order], 0)], -1)
    ids = [snowflake(int(t[i]), int(lows[i])) for i in range(n)]
    for i in range(1, n):
        if ids[i] <= ids[i - 1]:  # same millisecond and low bits out of order: nudge (rare)
            ids[i] = ids[i - 1] + 1

    # ---- tags
    gr = rs["tags"]
    tags: list[tuple[str, ...]] = []
    vocab = [x for x in EXTRA_TAGS if x not in hashtags]
    for i in range(n):
        if kinds[i] == 3:
            tags.append(())
            continue
        primary = hashtags[int(gr.integers(len(hashtags)))]
        extra = min(int(gr.poisson(1.2)), len(vocab))
        picked = [vocab[j] for j in gr.choice(len(vocab), size=extra, replace=False)] if extra else []
        tags.append((primary, *picked))

    # ---- media and image plans
    mr = rs["media"]
    img_kinds = list(IMAGE_KIND_P)
    img_p = list(IMAGE_KIND_P.values())
    media: list[Media] = []
    media_ids: set[int] = set()
    post_media: list[tuple[int, ...]] = []
    first_factors: list[ImageFactors | None] = []

    def add_media(post: int, mtype: str, kind: str, j: int) -> int:
        plan = plan_image(mr, draw_factors(mr, kind))
        mid = snowflake(int(t[post]) - 30_000 * (j + 1), int(mr.integers(1 << 16)))  # uploaded before posting
        while mid in media_ids:
            mid += 1
        media_ids.add(mid)
        alt = None
        if mr.random() < 0.4:
            alt = ALT_TEXT.get(plan.factors.kind) or ALT_TEXT.get(plan.source) or "A photo"
        media.append(Media(len(media), str(mid), post, mtype, plan, alt))
        return len(media) - 1

    for i in range(n):
        kind = KINDS[kinds[i]]
        if kind == "photo":
            k = 1 + min(int(mr.poisson(0.35)), 3)
            m = tuple(add_media(i, "image", img_kinds[int(mr.choice(3, p=img_p))], j) for j in range(k))
            first_factors.append(media[m[0]].plan.factors)
        elif kind == "video":
            m = (add_media(i, "video", "noface", 0),)
            first_factors.append(None)
        else:
            m = ()
            first_factors.append(None)
        post_media.append(m)

    # ---- quality and engagement
    qr = rs["quality"]
    vq = np.array([visual_quality(f) for f in first_factors])
    quality = vq + qr.normal(0.0, NOISE_SD, size=n)
    is_boost = kinds == 3
    quality[is_boost] = np.nan
    vq[is_boost] = np.nan
    followers = np.array([accounts[a].followers for a in authors], dtype=np.float64)
    extra_tags = np.array([max(len(x) - 1, 0) for x in tags], dtype=np.float64)
    mu = np.where(is_boost, 0.0, expected_likes(followers, extra_tags, np.nan_to_num(quality)))
    engagement = draw_engagement(rs["engagement"], mu)

    # ---- texts
    xr = rs["text"]
    langs = xr.choice(len(LANGUAGES), size=n, p=LANGUAGE_P)
    sensitive = xr.random(n) < 0.03
    caps = xr.integers(len(CAPTIONS), size=n)

    posts = [
        Post(
            index=i, id=str(ids[i]), created_ms=int(t[i]), author=int(authors[i]), kind=KINDS[kinds[i]],
            tags=tags[i], media=post_media[i], reblog_of=int(reblog_of[i]), language=LANGUAGES[langs[i]],
            sensitive=bool(sensitive[i]), spoiler_text="selfie" if sensitive[i] else "",
            caption=CAPTIONS[caps[i]], quality=float(quality[i]), visual_quality=float(vq[i]),
        )
        for i in range(n)
    ]
    tag_lists: dict[str, list[int]] = {}
    for p in posts:
        for tag in (posts[p.reblog_of].tags if p.kind == "boost" else p.tags):
            tag_lists.setdefault(tag, []).append(p.index)
    per_author: list[list[int]] = [[] for _ in accounts]
    for p in posts:
        per_author[p.author].append(p.created_ms)
    return World(
        params=WorldParams(params.seed, n, hashtags, params.now, float(params.bluesky_share)),
        accounts=accounts, posts=posts, media=media, engagement=engagement,
        created_ms=np.asarray(t, dtype=np.int64),
        post_by_id={p.id: p.index for p in posts},
        account_by_id={a.id: a.index for a in accounts},
        media_by_id={m.id: m.index for m in media},
        tag_index={k: np.asarray(v, dtype=np.int64) for k, v in tag_lists.items()},
        author_created=[np.asarray(v, dtype=np.int64) for v in per_author],
        on_bluesky=on_bluesky,
    )


@functools.lru_cache(maxsize=8)
def _cached_world(params: WorldParams) -> World:
    return generate_world(params)


def build_world(seed: int = 7, posts: int = 5000, hashtags: tuple[str, ...] | list[str] = ("selfie",),
                now: datetime = DEFAULT_NOW, bluesky_share: float = 0.0) -> World:
    """The world for these parameters, generated once per process (worlds are immutable)."""
    if now.tzinfo is None:
        raise ValueError("simulator world: now must be timezone-aware (UTC)")
    return _cached_world(WorldParams(seed, posts, tuple(hashtags), now.astimezone(UTC), float(bluesky_share)))

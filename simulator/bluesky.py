"""Bluesky's AT Protocol (XRPC) view of the simulator's world: identities, views, search, sessions.

The accounts that live on Bluesky (:meth:`World.account_platform`) and their posts are served
under ``/xrpc/<nsid>`` as the AppView (through a PDS) serves them, with the shapes of the
``app.bsky`` lexicons; :mod:`.server` does the HTTP, this module what is in the bodies.

Identities are pure functions of the world, so a test or a ground-truth join can recompute them:

* DID: ``did:plc:`` + 24 base32 characters (a-z, 2-7) of ``sha256("did:" + account id)``.
* Handle: the username with ``_`` as ``-`` (handles allow letters, digits and hyphens only)
  plus ``.bsky.sim``.
* rkey: a TID, ``(created_ms * 1000 microseconds, 53 bits) << 10 | clock id``, the clock id
  being the status id's low 10 bits, as 13 characters of the sortable base32 alphabet.
* at-URI: ``at://<did>/app.bsky.feed.post/<rkey>``; record CIDs are CIDv1 dag-cbor sha-256
  (``bafyrei...``) and blob CIDs CIDv1 raw sha-256 (``bafkrei...``), as Bluesky's are; both
  hash the world ids, not bytes.

A world boost by a Bluesky author is a repost, which is no post: search, getPosts and the
post counts leave reposts out. Quote posts: about one photo post in ten (a stable hash of its
id) quotes an earlier Bluesky post, embedding its images as ``recordWithMedia``. Quote counts
are 0. ``indexedAt`` is ``createdAt`` plus 1..9 seconds.

Image URLs follow the CDN's layout, ``/img/feed_fullsize/plain/<did>/<blob cid>@jpeg`` (the
attachment's original file) and ``/img/feed_thumbnail/...`` (its preview), and carry the very
bytes the Mastodon media route serves for the same attachment. Videos get
``/watch/<did>/<cid>/playlist.m3u8`` (a stub) and ``.../thumbnail.jpg`` (the preview frame).
Blob ``size`` is estimated from the pixel count (the server renders only when an image is
fetched); the CDN re-encodes anyway, so real clients cannot rely on it either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import numpy as np

from simulator.entities import iso_ms
from simulator.world import Account, Media, Post, World

HANDLE_SUFFIX = ".bsky.sim"
TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"  # base32-sortable: ASCII order is numeric order
POST_COLLECTION = "app.bsky.feed.post"
OPT_OUT_LABEL = "!no-unauthenticated"  # the self-label of accounts that opt out of logged-out views
MAX_BATCH = 25  # actors per getProfiles, uris per getPosts
SEARCH_DEFAULT_LIMIT = 25
SEARCH_MAX_LIMIT = 100
QUOTE_SHARE = 0.1  # photo posts that quote an earlier post (recordWithMedia)
REFRESH_TTL_S = 90 * 86_400.0  # refresh tokens live 90 days on a real PDS

_CODEC_DAG_CBOR = 0x71  # record CIDs
_CODEC_RAW = 0x55  # blob CIDs


class XrpcError(Exception):
    """An XRPC error response: HTTP ``status`` with ``{"error": name, "message": message}``."""

    def __init__(self, status: int, name: str, message: str):
        super().__init__(message)
        self.status, self.name, self.message = status, name, message

    def body(self) -> dict[str, str]:
        return {"error": self.name, "message": self.message}


# --------------------------------------------------------------------------- identities


def _sha(*parts: str) -> bytes:
    return hashlib.sha256(":".join(parts).encode()).digest()


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().lower().rstrip("=")


def did_for(account: Account) -> str:
    return "did:plc:" + _b32(_sha("did", account.id))[:24]


def handle_for(account: Account) -> str:
    return account.username.replace("_", "-") + HANDLE_SUFFIX


def tid(created_ms: int, status_id: str) -> str:
    """A TID: microseconds (53 bits) then a 10-bit clock id, 13 sortable base32 characters."""
    micros = (created_ms * 1000) & ((1 << 53) - 1)
    value = (micros << 10) | (int(status_id) & 0x3FF)
    return "".join(TID_ALPHABET[(value >> (5 * (12 - k))) & 31] for k in range(13))


def tid_value(rkey: str) -> int:
    """The integer of a TID (inverse of :func:`tid`'s encoding)."""
    value = 0
    for ch in rkey:
        value = (value << 5) | TID_ALPHABET.index(ch)
    return value


def _cid(codec: int, *parts: str) -> str:
    """A CIDv1 string (multibase base32, sha2-256) over a hash of ``parts``."""
    return "b" + _b32(bytes([0x01, codec, 0x12, 0x20]) + _sha(*parts))


def post_cid(post: Post) -> str:
    return _cid(_CODEC_DAG_CBOR, "post", post.id)


def blob_cid(media: Media) -> str:
    return _cid(_CODEC_RAW, "blob", media.id)


def at_uri(world: World, post: int) -> str:
    """The at-URI of a world post (meaningful for Bluesky posts)."""
    p = world.posts[post]
    return f"at://{did_for(world.accounts[p.author])}/{POST_COLLECTION}/{tid(p.created_ms, p.id)}"


def _stable_unit(*parts: str) -> float:
    """A number in [0, 1) from a hash: stable per input, no random stream consumed."""
    return int.from_bytes(_sha(*parts)[:8], "big") / 2**64


# --------------------------------------------------------------------------- search query


@dataclass(frozen=True)
class SearchQuery:
    tags: tuple[str, ...]  # all must be among the post's tags (lower case, no '#')
    words: tuple[str, ...]  # all must be words of the text (lower case, '#' stripped)
    since_ms: int | None  # createdAt >= since
    until_ms: int | None  # createdAt < until
    limit: int
    lang: str | None
    author: str | None  # a DID or handle
    served: int  # results this query served on earlier pages (from the cursor)
    before: int | None  # only posts with a smaller index (from the cursor)


def _one(params: dict[str, list[str]], name: str) -> str | None:
    vals = params.get(name)
    return vals[-1] if vals else None


def parse_datetime(name: str, value: str) -> int:
    """An ISO 8601 datetime (or date) as Unix milliseconds; naive means UTC."""
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise XrpcError(400, "InvalidRequest", f"{name} must be a valid datetime, got {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def encode_cursor(served: int, last: int) -> str:
    return base64.urlsafe_b64encode(f"{served}.{last}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        served, last = raw.split(".")
        return int(served), int(last)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise XrpcError(400, "InvalidRequest", "malformed cursor") from None


def parse_search(params: dict[str, list[str]]) -> SearchQuery:
    """``app.bsky.feed.searchPosts`` parameters; raises :class:`XrpcError` 400 on bad ones."""
    q = _one(params, "q")
    if q is None:
        raise XrpcError(400, "InvalidRequest", 'Params must have the property "q"')
    tags = [t.lower().lstrip("#") for t in params.get("tag", []) if t.strip("#")]
    words: list[str] = []
    for token in q.lower().split():
        if token.startswith("#") and len(token) > 1:
            tags.append(token[1:])
        elif token != "*":
            words.append(token)
    raw_limit = _one(params, "limit")
    try:
        limit = SEARCH_DEFAULT_LIMIT if raw_limit is None else int(raw_limit)
    except ValueError:
        raise XrpcError(400, "InvalidRequest", "limit must be an integer") from None
    if limit < 1:
        raise XrpcError(400, "InvalidRequest", "limit can not be less than 1")
    if limit > SEARCH_MAX_LIMIT:
        raise XrpcError(400, "InvalidRequest", f"limit can not be greater than {SEARCH_MAX_LIMIT}")
    sort = _one(params, "sort") or "latest"
    if sort not in ("latest", "top"):
        raise XrpcError(400, "InvalidRequest", 'sort must be one of "top", "latest"')
    since, until, cursor = _one(params, "since"), _one(params, "until"), _one(params, "cursor")
    served, before = decode_cursor(cursor) if cursor else (0, None)
    return SearchQuery(
        tags=tuple(dict.fromkeys(tags)), words=tuple(words),
        since_ms=parse_datetime("since", since) if since else None,
        until_ms=parse_datetime("until", until) if until else None,
        limit=limit, lang=(_one(params, "lang") or None), author=(_one(params, "author") or None),
        served=served, before=before,
    )


# --------------------------------------------------------------------------- the index


class BlueskyIndex:
    """Per world: the Bluesky accounts and posts, their identities, and search over them."""

    def __init__(self, world: World):
        self.world = world
        posts = world.posts
        on_bsky = world.on_bluesky
        #: Per post: a Bluesky post (not a repost), served by XRPC.
        self.is_post = np.array([bool(on_bsky[p.author]) and p.kind != "boost" for p in posts], dtype=bool)
        self.post_indices = np.flatnonzero(self.is_post).astype(np.int64)  # ascending = oldest first
        self.accounts = [int(a) for a in np.flatnonzero(on_bsky)]
        self.did = {a: did_for(world.accounts[a]) for a in self.accounts}
        self.handle = {a: handle_for(world.accounts[a]) for a in self.accounts}
        self.account_by_actor: dict[str, int] = {}
        for a in self.accounts:
            self.account_by_actor[self.did[a]] = a
            self.account_by_actor[self.handle[a]] = a
        self.rkey = {int(i): tid(posts[i].created_ms, posts[i].id) for i in self.post_indices}
        self.post_by_key = {(self.did[posts[i].author], k): i for i, k in self.rkey.items()}
        self.media_by_cid = {blob_cid(world.media[m]): m for i in self.post_indices for m in posts[i].media}
        per_author: dict[int, list[int]] = {a: [] for a in self.accounts}
        for i in self.post_indices:
            per_author[posts[i].author].append(posts[i].created_ms)
        #: Per account: createdAt of its posts (reposts excluded), ascending.
        self.author_posts = {a: np.asarray(v, dtype=np.int64) for a, v in per_author.items()}
        # Quotes: a stable hash of the post id picks the photo posts that quote, and which
        # earlier Bluesky post each quotes.
        self.quotes: dict[int, int] = {}
        for k, i in enumerate(self.post_indices):
            p = posts[i]
            if k and p.kind == "photo" and _stable_unit("quote", p.id) < QUOTE_SHARE:
                self.quotes[int(i)] = int(self.post_indices[int(_stable_unit("quoted", p.id) * k)])

    # ---- lookups

    def post_by_uri(self, uri: str) -> int | None:
        """The world post index of an at-URI, if it names a Bluesky post (at any clock)."""
        prefix = "at://"
        if not uri.startswith(prefix):
            return None
        parts = uri[len(prefix):].split("/")
        if len(parts) != 3 or parts[1] != POST_COLLECTION:
            return None
        actor = self.account_by_actor.get(parts[0])
        if actor is None:
            return None
        return self.post_by_key.get((self.did[actor], parts[2]))

    def uri(self, post: int) -> str:
        p = self.world.posts[post]
        return f"at://{self.did[p.author]}/{POST_COLLECTION}/{self.rkey[post]}"

    def n_posts(self, now_ms: int) -> int:
        """Bluesky posts (reposts excluded) created at or before ``now_ms``."""
        n = int(np.searchsorted(self.world.created_ms, now_ms, side="right"))
        return int(np.searchsorted(self.post_indices, n, side="left"))

    # ---- search

    def search(self, q: SearchQuery, now_ms: int, max_results: int) -> tuple[list[int], str | None, int]:
        """(post indices newest first, next cursor or None, hits in total) of one page.

        A query serves at most ``max_results`` results over all its pages: the page that
        reaches that many carries no cursor, as the AppView's search stops paging early.
        """
        w = self.world
        n_visible = int(np.searchsorted(w.created_ms, now_ms, side="right"))
        cands = self.post_indices[: int(np.searchsorted(self.post_indices, n_visible, side="left"))]
        for t in q.tags:
            cands = np.intersect1d(cands, w.tag_index.get(t, np.empty(0, dtype=np.int64)), assume_unique=True)
        created = w.created_ms[cands]
        keep = np.ones(len(cands), dtype=bool)
        if q.since_ms is not None:
            keep &= created >= q.since_ms
        if q.until_ms is not None:
            keep &= created < q.until_ms
        cands = cands[keep]
        if q.lang or q.author or q.words:
            author = self.account_by_actor.get(q.author, -1) if q.author else None
            cands = np.asarray([
                c for c in cands
                if (not q.lang or w.posts[c].language == q.lang)
                and (author is None or w.posts[c].author == author)
                and (not q.words or set(q.words) <= self._words(int(c)))
            ], dtype=np.int64)
        total = len(cands)
        newest_first = cands[::-1]
        if q.before is not None:
            newest_first = newest_first[newest_first < q.before]
        room = max(0, min(q.limit, max_results - q.served))
        page = [int(c) for c in newest_first[:room]]
        served = q.served + len(page)
        more = len(newest_first) > len(page) and served < max_results
        cursor = encode_cursor(served, page[-1]) if page and more else None
        return page, cursor, total

    def _words(self, post: int) -> set[str]:
        text, _, _ = self.text(post)
        return {w.lstrip("#").strip(".,!?") for w in text.lower().split()}

    # ---- records and views

    def text(self, post: int) -> tuple[str, list[dict[str, Any]], list[str]]:
        """(text, facets, record tags) of a post.

        The world's hashtag and every other extra tag are hashtags in the text, each with a
        ``#tag`` facet over its UTF-8 bytes; the remaining extra tags go to ``record.tags``
        (tags a client attached without writing them out).
        """
        p = self.world.posts[post]
        primary, extras = p.tags[0], list(p.tags[1:])
        in_text = [primary, *extras[0::2]]
        hidden = extras[1::2]
        text = p.caption
        facets = []
        for t in in_text:
            if text:
                text += " "
            start = len(text.encode())
            text += f"#{t}"
            facets.append({
                "$type": "app.bsky.richtext.facet",
                "index": {"byteStart": start, "byteEnd": len(text.encode())},
                "features": [{"$type": "app.bsky.richtext.facet#tag", "tag": t}],
            })
        return text, facets, hidden

    def record(self, post: int) -> dict[str, Any]:
        p = self.world.posts[post]
        text, facets, hidden = self.text(post)
        rec: dict[str, Any] = {"$type": POST_COLLECTION, "text": text, "createdAt": iso_ms(p.created_ms),
                               "langs": [p.language], "facets": facets}
        if hidden:
            rec["tags"] = hidden
        if embed := self._record_embed(post):
            rec["embed"] = embed
        return rec

    def _blob(self, m: Media, mime: str, size: int) -> dict[str, Any]:
        return {"$type": "blob", "ref": {"$link": blob_cid(m)}, "mimeType": mime, "size": size}

    def _images_record(self, post: int) -> dict[str, Any]:
        images = []
        for mi in self.world.posts[post].media:
            m = self.world.media[mi]
            # Rough encoded size: ~0.25 bytes per pixel for JPEG, ~1.5 for PNG (see module docstring).
            per_px = 1.5 if m.plan.format == "PNG" else 0.25
            images.append({
                "alt": m.description or "",
                "image": self._blob(m, m.plan.mime, int(m.plan.width * m.plan.height * per_px)),
                "aspectRatio": {"width": m.plan.width, "height": m.plan.height},
            })
        return {"$type": "app.bsky.embed.images", "images": images}

    def _record_embed(self, post: int) -> dict[str, Any] | None:
        p = self.world.posts[post]
        if p.kind == "video":
            m = self.world.media[p.media[0]]
            return {"$type": "app.bsky.embed.video", "video": self._blob(m, "video/mp4", 250_000 * 12 // 8),
                    "aspectRatio": {"width": m.plan.width, "height": m.plan.height}}
        if p.kind != "photo":
            return None
        images = self._images_record(post)
        quoted = self.quotes.get(post)
        if quoted is None:
            return images
        strong_ref = {"uri": self.uri(quoted), "cid": post_cid(self.world.posts[quoted])}
        return {"$type": "app.bsky.embed.recordWithMedia",
                "record": {"$type": "app.bsky.embed.record", "record": strong_ref}, "media": images}

    def _images_view(self, post: int, base: str) -> dict[str, Any]:
        p = self.world.posts[post]
        did = self.did[p.author]
        images = []
        for mi in p.media:
            m = self.world.media[mi]
            cid = blob_cid(m)
            images.append({
                "thumb": f"{base}/img/feed_thumbnail/plain/{did}/{cid}@jpeg",
                "fullsize": f"{base}/img/feed_fullsize/plain/{did}/{cid}@jpeg",
                "alt": m.description or "",
                "aspectRatio": {"width": m.plan.width, "height": m.plan.height},
            })
        return {"$type": "app.bsky.embed.images#view", "images": images}

    def embed_view(self, post: int, base: str, now_ms: int, depth: int = 0) -> dict[str, Any] | None:
        """The hydrated ``embed`` of a post view; a quoted post's own quote is not hydrated."""
        p = self.world.posts[post]
        if p.kind == "video":
            m = self.world.media[p.media[0]]
            cid = blob_cid(m)
            watch = f"{base}/watch/{quote(self.did[p.author], safe='')}/{cid}"
            return {"$type": "app.bsky.embed.video#view", "cid": cid, "playlist": f"{watch}/playlist.m3u8",
                    "thumbnail": f"{watch}/thumbnail.jpg",
                    "aspectRatio": {"width": m.plan.width, "height": m.plan.height}}
        if p.kind != "photo":
            return None
        images = self._images_view(post, base)
        quoted = self.quotes.get(post)
        if quoted is None or depth > 0:
            return images
        return {"$type": "app.bsky.embed.recordWithMedia#view",
                "record": {"$type": "app.bsky.embed.record#view",
                           "record": self._view_record(quoted, base, now_ms, depth + 1)},
                "media": images}

    def _view_record(self, post: int, base: str, now_ms: int, depth: int) -> dict[str, Any]:
        p = self.world.posts[post]
        likes, reposts, replies = self.world.counts(post, now_ms)
        out: dict[str, Any] = {
            "$type": "app.bsky.embed.record#viewRecord", "uri": self.uri(post), "cid": post_cid(p),
            "author": self.profile_basic(p.author), "value": self.record(post), "labels": [],
            "likeCount": likes, "replyCount": replies, "repostCount": reposts, "quoteCount": 0,
            "indexedAt": self.indexed_at(post),
        }
        if embed := self.embed_view(post, base, now_ms, depth):
            out["embeds"] = [embed]
        return out

    def indexed_at(self, post: int) -> str:
        p = self.world.posts[post]
        return iso_ms(p.created_ms + 1000 + int(_stable_unit("indexed", p.id) * 8000))

    def post_view(self, post: int, base: str, now_ms: int) -> dict[str, Any]:
        """``app.bsky.feed.defs#postView`` of a Bluesky post at the world clock ``now_ms``."""
        p = self.world.posts[post]
        likes, reposts, replies = self.world.counts(post, now_ms)
        view: dict[str, Any] = {
            "uri": self.uri(post), "cid": post_cid(p), "author": self.profile_basic(p.author),
            "record": self.record(post),
        }
        if embed := self.embed_view(post, base, now_ms):
            view["embed"] = embed
        view.update({
            "replyCount": replies, "repostCount": reposts, "likeCount": likes, "quoteCount": 0,
            "indexedAt": self.indexed_at(post), "viewer": {"threadMuted": False, "embeddingDisabled": False},
            "labels": [],
        })
        return view

    # ---- profiles

    def labels(self, account: int) -> list[dict[str, Any]]:
        """Self-labels of an account: the logged-out opt-out when it is not discoverable or indexable."""
        a = self.world.accounts[account]
        if a.discoverable and a.indexable:
            return []
        did = self.did[account]
        return [{"src": did, "uri": f"at://{did}/app.bsky.actor.profile/self",
                 "cid": _cid(_CODEC_DAG_CBOR, "profile", a.id), "val": OPT_OUT_LABEL,
                 "cts": iso_ms(a.created_ms)}]

    def profile_basic(self, account: int) -> dict[str, Any]:
        """``app.bsky.actor.defs#profileViewBasic`` (the accounts have no avatar)."""
        a = self.world.accounts[account]
        return {"did": self.did[account], "handle": self.handle[account], "displayName": a.display_name,
                "viewer": {"muted": False, "blockedBy": False}, "labels": self.labels(account),
                "createdAt": iso_ms(a.created_ms)}

    def profile_detailed(self, account: int, now_ms: int) -> dict[str, Any]:
        """``app.bsky.actor.defs#profileViewDetailed``; postsCount counts posts up to the clock."""
        a = self.world.accounts[account]
        posts = int(np.searchsorted(self.author_posts[account], now_ms, side="right"))
        return {
            "did": self.did[account], "handle": self.handle[account], "displayName": a.display_name,
            "description": "Just here for the pictures.",
            "followersCount": a.followers, "followsCount": a.following, "postsCount": a.statuses_base + posts,
            "associated": {"lists": 0, "feedgens": 0, "starterPacks": 0, "labeler": False},
            "viewer": {"muted": False, "blockedBy": False}, "labels": self.labels(account),
            "createdAt": iso_ms(a.created_ms), "indexedAt": iso_ms(a.created_ms),
        }


# --------------------------------------------------------------------------- sessions


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _token(typ: str, scope: str, did: str, ttl_s: float) -> str:
    """A JWT-shaped token (header.payload.signature) with ``exp``; the signature is random.

    The server tracks tokens itself; the shape lets a client read ``exp`` as it would from a
    real PDS's tokens.
    """
    now = int(time.time())
    header = {"typ": typ, "alg": "ES256K"}
    payload = {"scope": scope, "sub": did, "aud": "did:web:bsky.sim", "iat": now, "exp": now + int(ttl_s),
               "jti": secrets.token_urlsafe(12)}
    return ".".join([_b64url(json.dumps(header, separators=(",", ":")).encode()),
                     _b64url(json.dumps(payload, separators=(",", ":")).encode()),
                     _b64url(secrets.token_bytes(64))])


@dataclass
class _Session:
    did: str
    handle: str
    expires: float  # monotonic seconds


class Sessions:
    """Access and refresh tokens (``com.atproto.server.*Session``); thread-safe.

    Access tokens expire ``access_ttl_s`` seconds of real (monotonic) time after they are
    issued; refreshing revokes the refresh token used and issues a new pair, while the old
    access token stays valid until it expires, as on a real PDS.
    """

    def __init__(self, access_ttl_s: float, clock: Callable[[], float] = time.monotonic):
        if access_ttl_s <= 0:
            raise ValueError(f"bluesky sessions: access_ttl_s must be > 0, got {access_ttl_s}")
        self.access_ttl_s = access_ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._access: dict[str, _Session] = {}
        self._refresh: dict[str, _Session] = {}
        self.calls = {"createSession": 0, "refreshSession": 0}

    def _issue(self, did: str, handle: str) -> dict[str, Any]:
        access = _token("at+jwt", "com.atproto.access", did, self.access_ttl_s)
        refresh = _token("refresh+jwt", "com.atproto.refresh", did, REFRESH_TTL_S)
        now = self.clock()
        self._access[access] = _Session(did, handle, now + self.access_ttl_s)
        self._refresh[refresh] = _Session(did, handle, now + REFRESH_TTL_S)
        return {"accessJwt": access, "refreshJwt": refresh, "handle": handle, "did": did, "active": True}

    def note_call(self, name: str) -> None:
        """Count a ``createSession`` / ``refreshSession`` request, answered with success or not."""
        with self._lock:
            self.calls[name] += 1

    def create(self, did: str, handle: str) -> dict[str, Any]:
        with self._lock:
            return self._issue(did, handle)

    def refresh(self, token: str | None) -> dict[str, Any]:
        with self._lock:
            if not token:
                raise XrpcError(401, "AuthenticationRequired", "Authentication Required")
            if token in self._access:
                raise XrpcError(400, "InvalidToken", "Invalid token type")
            s = self._refresh.pop(token, None)
            if s is None:
                raise XrpcError(400, "InvalidToken", "Token has been revoked")
            if s.expires <= self.clock():
                raise XrpcError(400, "ExpiredToken", "Token has expired")
            return self._issue(s.did, s.handle)

    def check(self, token: str | None) -> str:
        """The DID of a valid access token; raises the error a PDS answers otherwise."""
        if not token:
            raise XrpcError(401, "AuthenticationRequired", "Authentication Required")
        with self._lock:
            s = self._access.get(token)
            if s is None:
                if token in self._refresh:
                    raise XrpcError(400, "InvalidToken", "Invalid token type")
                raise XrpcError(400, "InvalidToken", "Token could not be verified")
            if s.expires <= self.clock():
                raise XrpcError(400, "ExpiredToken", "Token has expired")
            return s.did

    def calls_snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.calls)

    def did_of(self, token: str | None) -> str | None:
        """The DID behind an access token, valid or not (rate limits count per account)."""
        if not token:
            return None
        with self._lock:
            s = self._access.get(token)
            return s.did if s else None

    def expire(self, token: str) -> None:
        """End an access token now (the ``expired_token`` fault)."""
        with self._lock:
            if s := self._access.get(token):
                s.expires = self.clock()


def session_identity(index: BlueskyIndex, identifier: str) -> tuple[str, str]:
    """(did, handle) a login as ``identifier`` gets: the world account it names, else a made-up one."""
    a = index.account_by_actor.get(identifier.lower().lstrip("@"))
    if a is not None:
        return index.did[a], index.handle[a]
    handle = identifier.lower().lstrip("@")
    if handle.startswith("did:"):
        return handle, "handle.invalid"
    if "." not in handle:
        handle += HANDLE_SUFFIX
    return "did:plc:" + _b32(_sha("login", handle))[:24], handle

"""Bluesky (AT Protocol): hashtag search and post re-reads through a PDS or AppView.

Endpoints (lexicons under github.com/bluesky-social/atproto, ``lexicons/``):

- ``POST /xrpc/com.atproto.server.createSession`` ``{identifier, password}`` → ``{accessJwt,
  refreshJwt, ...}``: a login with an app password, done lazily before the first request.
- ``POST /xrpc/com.atproto.server.refreshSession`` (``Authorization: Bearer <refreshJwt>``) →
  a new token pair, when a request answers ``ExpiredToken`` (HTTP 400) or ``ExpiredToken`` /
  ``InvalidToken`` (HTTP 401). A failed refresh logs in again, once; then the request fails.
- ``GET /xrpc/app.bsky.feed.searchPosts?q=%23tag&tag=tag&sort=latest&limit=N[&until=T][&cursor=C]``
  → ``{cursor?, posts: [postView]}``, newest first. ``until`` is exclusive and compares with
  the post's ``sortAt`` (the earlier of ``createdAt`` and ``indexedAt``). The search's cursor
  may end before the result set does: a page with posts but no cursor continues with
  ``until`` = the earliest ``sortAt`` on it, without a cursor, until a page comes back empty.
  A post sharing that exact millisecond but not on the page is missed (rare: it takes a
  cursor stop falling inside one millisecond's posts).
- ``GET /xrpc/app.bsky.actor.getProfiles?actors=...`` (at most 25): follower counts, which a
  postView's author lacks; cached per source for the run.
- ``GET /xrpc/app.bsky.feed.getPosts?uris=...`` (at most 25): re-reads; a URI not returned is
  deleted (or no longer visible).

Normalization of a postView into a ``posts`` row, and what is skipped (in this order):

1. a repost (a feed item whose ``reason`` is ``app.bsky.feed.defs#reasonRepost``) or a record
   that is not an ``app.bsky.feed.post`` → ``boost``.
2. a video embed (``app.bsky.embed.video#view``, also as the media of a
   ``recordWithMedia#view``) → ``video``.
3. no ``app.bsky.embed.images#view`` (top level or as ``recordWithMedia`` media) → ``no_image``:
   a link card, a quoted post's images or text alone are not this post's photo.
4. a ``!no-unauthenticated`` label on the author (post view or profile) or on the post →
   ``opted_out``: the account asked not to be shown to logged-out viewers, and a research
   copy is such a viewer.
5. a required field missing or malformed, including an author whose profile could not be
   read → ``missing_field``, with a warning naming the post id (never the DID).

Ids and pseudonyms: ``author_key`` = HMAC of the author's DID. ``post_id`` =
``<rkey>-<author_key[:8]>``: the rkey is a TID (13 base32-sortable characters whose value is
microseconds since the epoch), so ids have one length and sort as text in creation order
(see :func:`pipeline.core.crawl_state.id_key`), and the suffix tells apart posts of two
authors with the same rkey without naming either. A post whose rkey is not a TID (the post
lexicon requires one) has no place in that order and is counted as unplaced. The post's
``at://`` URI, which names the DID, is :attr:`Post.ref`: kept in the crawl state for re-reads,
never in a table. Image URLs are stored with any path segment equal to the author's DID or
handle replaced by ``_`` (the CDN path is ``/img/feed_fullsize/plain/<did>/<cid>@jpeg``) and
downloaded from the real ones (:attr:`Post.fetch_urls`).

Known limit: the walk pages by time (``until``) while ids order by the rkey's TID. A post
whose TID is earlier than its ``sortAt`` (a client that minted the key well before the
``createdAt`` it wrote) can fall outside a ``max_id`` window and be missed.

Counts: ``reposts`` is ``repostCount`` only. A quote is a new post with its own audience and
counts, and Mastodon (the other source) has no quotes, so adding ``quoteCount`` would make the
column mean different things per source. ``views`` is None: Bluesky does not count views.
``sensitive`` is any ``porn``, ``sexual``, ``nudity`` or ``graphic-media`` label, from a
moderation service (the post's ``labels``) or the author (the record's self-labels).

Credentials: the app password and the tokens are held in :class:`_Secret` wrappers (their
repr hides them), sent only to the service's own origin, and never logged or put in an error.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from pipeline.core.crawl_state import id_key
from pipeline.scrape.http import FetchResult, HttpClient, origin
from pipeline.scrape.sources.base import (
    CrossOriginLink,
    Item,
    Observation,
    OptedOut,
    Page,
    Post,
    Source,
    SourceError,
    SourceRateLimited,
    refused,
)
from pipeline.scrape.sources.mastodon import parse_time, server_time, without_handles

log = logging.getLogger(__name__)

IDENTIFIER_ENV = "LIKERANK_BLUESKY_IDENTIFIER"
APP_PASSWORD_ENV = "LIKERANK_BLUESKY_APP_PASSWORD"

POST_TYPE = "app.bsky.feed.post"
REASON_REPOST = "app.bsky.feed.defs#reasonRepost"
IMAGES_VIEW = "app.bsky.embed.images#view"
VIDEO_VIEW = "app.bsky.embed.video#view"
RECORD_WITH_MEDIA_VIEW = "app.bsky.embed.recordWithMedia#view"
VIDEO_RECORD = "app.bsky.embed.video"  # the record's own embed, for a view that lacks one
TAG_FACET = "app.bsky.richtext.facet#tag"
#: The label an account sets to ask not to be shown to logged-out viewers.
NO_UNAUTHENTICATED = "!no-unauthenticated"
SENSITIVE_LABELS = frozenset({"porn", "sexual", "nudity", "graphic-media"})
#: XRPC error codes of a token that a refresh (or a new login) fixes.
TOKEN_ERRORS = frozenset({"ExpiredToken", "InvalidToken"})
#: Most actors per getProfiles and URIs per getPosts (the lexicons' maxLength).
BATCH = 25
#: Most posts per searchPosts page (the lexicon's maximum).
MAX_PAGE = 100

#: base32-sortable, the TID alphabet: character order is value order.
TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
TID_RE = re.compile(r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$")
#: Suffix of :meth:`BlueskySource.max_id_before`: sorts below every author-key suffix (hex).
LOWEST_SUFFIX = "0" * 8


# --------------------------------------------------------------------------- credentials


class _Secret:
    """A credential whose repr and str never show it (debug dumps, tracebacks' locals)."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "<hidden>"

    __str__ = __repr__


def credentials_from_env(env: Mapping[str, str], identifier_env: str = IDENTIFIER_ENV,
                         password_env: str = APP_PASSWORD_ENV) -> tuple[str, str] | None:
    """``(identifier, app_password)`` from the two environment variables (by default
    ``LIKERANK_BLUESKY_IDENTIFIER`` and ``LIKERANK_BLUESKY_APP_PASSWORD``); None when neither
    is set. One without the other is a ValueError naming the missing variable (never a value)."""
    identifier = env.get(identifier_env, "")
    password = env.get(password_env, "")
    if not identifier and not password:
        return None
    if not identifier:
        raise ValueError(f"${password_env} is set but ${identifier_env} is not: set both (the account's handle "
                         "or email, and an app password from Settings → App passwords)")
    if not password:
        raise ValueError(f"${identifier_env} is set but ${password_env} is not: set both (an app password "
                         "from Settings → App passwords, not the account password)")
    return identifier, password


# --------------------------------------------------------------------------- TIDs and ids


def tid_to_datetime(tid: str) -> datetime:
    """The creation time a TID encodes (its top 53 bits: microseconds since the epoch, UTC)."""
    if not TID_RE.match(tid):
        raise ValueError(f"not a TID: {tid!r}")
    value = 0
    for ch in tid:
        value = value * 32 + TID_ALPHABET.index(ch)
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=value >> 10)


def datetime_to_tid(when: datetime, clock_id: int = 0) -> str:
    """The TID of ``when`` (microseconds) and ``clock_id`` (0..1023)."""
    micros = (when.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    value = (micros << 10) | (clock_id & 0x3FF)
    chars = []
    for _ in range(13):
        chars.append(TID_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def iso_ms(when: datetime) -> str:
    """``2024-05-01T12:00:00.123Z``: the datetime form the search parameters take."""
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def ceil_ms(when: datetime) -> datetime:
    """``when`` rounded up to a whole millisecond (``until`` is compared at that resolution)."""
    rest = when.microsecond % 1000
    return when if rest == 0 else when + timedelta(microseconds=1000 - rest)


def split_at_uri(uri: Any) -> tuple[str, str, str] | None:
    """``at://<did>/<collection>/<rkey>`` → (did, collection, rkey); None when malformed."""
    if not isinstance(uri, str) or not uri.startswith("at://"):
        return None
    parts = uri[len("at://"):].split("/")
    if len(parts) != 3 or not parts[0].startswith("did:") or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def make_post_id(rkey: str, author_key: str) -> str:
    return f"{rkey}-{author_key[:8]}"


# --------------------------------------------------------------------------- normalization


@dataclass(frozen=True)
class Profile:
    """What a post needs from its author's profile (nothing that names them)."""

    followers: int | None  # None: the profile had no valid followersCount
    opted_out: bool


class _Missing(Exception):
    def __init__(self, field: str):
        self.field = field


def _count(obj: Any, key: str, where: str = "") -> int:
    v = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _Missing(where + key)
    return v


def _label_values(labels: Any) -> set[str]:
    """Label ``val``s from a list of label objects or a ``selfLabels`` object (``{values: [...]}``)."""
    if isinstance(labels, dict):
        labels = labels.get("values")
    if not isinstance(labels, list):
        return set()
    return {lab["val"] for lab in labels if isinstance(lab, dict) and isinstance(lab.get("val"), str)}


def _unwrap(entry: Any) -> tuple[Any, bool]:
    """A postView, or a feed item ``{post, reason}``: (the postView, whether it is a repost)."""
    if isinstance(entry, dict) and isinstance(entry.get("post"), dict) and "uri" not in entry:
        reason = entry.get("reason")
        return entry["post"], isinstance(reason, dict) and reason.get("$type") == REASON_REPOST
    return entry, False


def _media(view: dict) -> tuple[list[Any], bool]:
    """The post's own images (the ``images#view`` entries) and whether it has a video."""
    embed = view.get("embed")
    record = view.get("record") if isinstance(view.get("record"), dict) else {}
    record_embed = record.get("embed") if isinstance(record.get("embed"), dict) else {}
    media = embed.get("media") if isinstance(embed, dict) and embed.get("$type") == RECORD_WITH_MEDIA_VIEW else embed
    media_type = media.get("$type") if isinstance(media, dict) else None
    record_media = record_embed.get("media") if isinstance(record_embed.get("media"), dict) else record_embed
    video = media_type == VIDEO_VIEW or record_media.get("$type") == VIDEO_RECORD
    images = media.get("images") if media_type == IMAGES_VIEW and isinstance(media.get("images"), list) else []
    return images, video


def author_opted_out(view: dict, profile: Profile | None = None) -> bool:
    """A ``!no-unauthenticated`` label on the author (post view or profile) or on the post."""
    author = view.get("author") if isinstance(view.get("author"), dict) else {}
    return (NO_UNAUTHENTICATED in _label_values(author.get("labels"))
            or NO_UNAUTHENTICATED in _label_values(view.get("labels"))
            or (profile is not None and profile.opted_out))


def candidate_did(entry: Any) -> str | None:
    """The author DID of a post that would be kept but for its profile (whose followers the
    row needs); None for a post skipped before that. Only those profiles are fetched."""
    view, repost = _unwrap(entry)
    if repost or not isinstance(view, dict):
        return None
    ids = split_at_uri(view.get("uri"))
    record = view.get("record")
    if ids is None or not isinstance(record, dict) or record.get("$type", POST_TYPE) != POST_TYPE:
        return None
    images, video = _media(view)
    if video or not images or author_opted_out(view):
        return None
    return ids[0]


def _tags(record: dict, hashtag: str) -> list[str]:
    """The tag facets (in text order), then ``record.tags`` (tags outside the text),
    lowercased, first occurrence kept, plus ``hashtag``."""
    names: list[Any] = []
    facets = record.get("facets")
    for facet in facets if isinstance(facets, list) else []:
        features = facet.get("features") if isinstance(facet, dict) else None
        for feature in features if isinstance(features, list) else []:
            if isinstance(feature, dict) and feature.get("$type") == TAG_FACET:
                names.append(feature.get("tag"))
    if isinstance(record.get("tags"), list):
        names.extend(record["tags"])
    tags: list[str] = []
    for name in names:
        if isinstance(name, str):
            name = name.lstrip("#").lower()
            if name and name not in tags:
                tags.append(name)
    if hashtag not in tags:  # the search matched it (e.g. in the text without a facet)
        tags.append(hashtag)
    return tags


def normalize_post(entry: Any, *, instance: str, hashtag: str, author_key: Callable[[str], str],
                   scraped_at: datetime, profiles: Mapping[str, Profile | None]) -> Item | None:
    """One postView (or feed item) → an :class:`Item` (kept or skipped); None when it has no
    usable id (no ``at://`` post URI with a TID record key). ``profiles`` maps DIDs to what
    :meth:`BlueskySource.profiles` read (a DID absent or None: the profile could not be read)."""
    view, repost = _unwrap(entry)
    ids = split_at_uri(view.get("uri")) if isinstance(view, dict) else None
    if ids is None or not TID_RE.match(ids[2]):
        log.warning("%s #%s: a post without an at:// URI with a TID record key was skipped (field 'uri')",
                    instance, hashtag)
        return None
    did, _collection, rkey = ids
    key = author_key(did)
    record = view.get("record") if isinstance(view.get("record"), dict) else None
    created_at = None
    for value in ((record or {}).get("createdAt"), view.get("indexedAt")):
        try:
            created_at = parse_time(value)
            break
        except ValueError:
            continue
    item = Item(post_id=make_post_id(rkey, key), created_at=created_at)
    if repost or (record is not None and record.get("$type", POST_TYPE) != POST_TYPE):
        item.skip = "boost"
        return item
    images, video = _media(view)
    if video:
        item.skip = "video"
        return item
    if not images:
        item.skip = "no_image"
        return item
    profile = profiles.get(did)
    if author_opted_out(view, profile):
        item.skip = "opted_out"
        return item
    try:
        if record is None:
            raise _Missing("record")
        if created_at is None:
            raise _Missing("record.createdAt")
        if profile is None or profile.followers is None:
            raise _Missing("author profile followersCount")
        author = view.get("author") if isinstance(view.get("author"), dict) else {}
        urls = []
        for i, image in enumerate(images):
            u = image.get("fullsize") if isinstance(image, dict) else None
            if not isinstance(u, str) or not u.startswith(("http://", "https://")):
                raise _Missing(f"embed.images[{i}].fullsize")
            urls.append(u)
        names = {did, quote(did, safe="")}
        if isinstance(author.get("handle"), str) and author["handle"]:
            names.add(author["handle"])
        stored = [without_handles(u, {n.lower() for n in names}) for u in urls]
        tags = _tags(record, hashtag)
        langs = record.get("langs")
        language = langs[0] if isinstance(langs, list) and langs and isinstance(langs[0], str) and langs[0] else None
        labels = _label_values(view.get("labels")) | _label_values(record.get("labels"))
        item.post = Post(
            source="bluesky",
            instance=instance,
            hashtag=hashtag,
            post_id=item.post_id,
            created_at=created_at,
            author_key=key,
            author_followers=profile.followers,
            tags=tags,
            n_tags=len(tags),
            likes=_count(view, "likeCount"),
            reposts=_count(view, "repostCount"),  # quotes are posts of their own: see the module doc
            replies=_count(view, "replyCount"),
            views=None,  # Bluesky does not count views
            image_urls=stored,
            fetch_urls=urls if stored != urls else None,
            sensitive=bool(labels & SENSITIVE_LABELS),
            language=language,
            scraped_at=scraped_at,
            ref=view["uri"],
        )
    except _Missing as exc:
        log.warning("%s: post %s skipped: required field %r is missing or malformed", instance, item.post_id, exc.field)
        item.skip = "missing_field"
    return item


def sort_time(view: Any) -> datetime | None:
    """A postView's ``sortAt`` as the search computes it: the earlier of ``createdAt`` and
    ``indexedAt`` (a back-dated post sorts at its claimed time, a future-dated one at indexing)."""
    view, _ = _unwrap(view)
    if not isinstance(view, dict):
        return None
    times = []
    record = view.get("record") if isinstance(view.get("record"), dict) else {}
    for value in (record.get("createdAt"), view.get("indexedAt")):
        try:
            times.append(parse_time(value))
        except ValueError:
            pass
    return min(times) if times else None


def _profile(obj: dict) -> Profile:
    followers = obj.get("followersCount")
    ok = isinstance(followers, int) and not isinstance(followers, bool) and followers >= 0
    return Profile(followers=followers if ok else None,
                   opted_out=NO_UNAUTHENTICATED in _label_values(obj.get("labels")))


# --------------------------------------------------------------------------- source


class BlueskySource(Source):
    """Bluesky through a PDS that proxies ``app.bsky`` calls (or an AppView that takes the same
    tokens): ``BlueskySource("https://bsky.social", client, author_key=..., identifier=...,
    app_password=...)``. ``refs`` maps post ids to their ``at://`` URIs for :meth:`reobserve`."""

    kind = "bluesky"

    def __init__(self, service_url: str, client: HttpClient, *, author_key: Callable[[str], str],
                 identifier: str, app_password: str, refs: Mapping[str, str] | None = None,
                 page_limit: int = MAX_PAGE, now: Callable[[], datetime] = lambda: datetime.now(UTC)):
        """``now`` dates pages and observations only when a response has no usable ``Date``
        header. ``page_limit`` is clamped to the search's 1..100."""
        parts = urlsplit(service_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"service URL {service_url!r}: expected http(s)://host[:port]")
        if not identifier or not app_password:
            raise ValueError("a Bluesky source needs an identifier and an app password "
                             f"(${IDENTIFIER_ENV}, ${APP_PASSWORD_ENV})")
        self.instance = f"{parts.scheme}://{parts.netloc}".lower()
        self.client = client
        self.author_key = author_key
        self.refs: Mapping[str, str] = refs if refs is not None else {}
        self.page_limit = max(1, min(MAX_PAGE, page_limit))
        self.now = now
        self._identifier = _Secret(identifier)
        self._password = _Secret(app_password)
        self._access: _Secret | None = None
        self._refresh: _Secret | None = None
        self._session_lock = threading.Lock()
        self._profiles: dict[str, Profile | None] = {}
        self._service_time: datetime | None = None  # the Date of the last session call's answer

    def __repr__(self) -> str:  # never shows the credentials
        return f"BlueskySource({self.instance!r})"

    # ---------------------------------------------------------------- session

    def _secrets(self) -> list[str]:
        return [s.value for s in (self._password, self._identifier, self._access, self._refresh) if s and s.value]

    def _scrub(self, text: str) -> str:
        """``text`` without any credential in it (a server may echo what it was sent)."""
        for secret in self._secrets():
            text = text.replace(secret, "<hidden>")
        return text

    def _session_call(self, nsid: str, *, body: Any = None, bearer: _Secret | None = None,
                      idempotent: bool) -> tuple[dict | None, str]:
        """POST a session call; (the new session, "") or (None, why it failed)."""
        url = f"{self.instance}/xrpc/{nsid}"
        headers = {"Accept": "application/json"}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer.value}"
        res = self.client.fetch_api(url, method="POST", headers=headers, json_body=body,
                                    idempotent=idempotent, error_body=True)
        self._service_time = server_time(res.headers) or self._service_time
        if res.retry_after_s is not None:
            raise SourceRateLimited(self._scrub(res.error or f"{url}: rate limited"), res.retry_after_s)
        too_much = refused(res, url, self.client.cfg)
        if too_much is not None:
            raise too_much
        if not res.ok:
            code, message = _xrpc_error(res)
            detail = f" ({code}: {message[:200]})" if code else ""
            return None, self._scrub(f"{res.error}{detail}")
        try:
            data = json.loads(res.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, f"{url}: the answer is not JSON"
        if not (isinstance(data, dict) and isinstance(data.get("accessJwt"), str)
                and isinstance(data.get("refreshJwt"), str) and data["accessJwt"] and data["refreshJwt"]):
            return None, f"{url}: the answer has no accessJwt/refreshJwt"
        return data, ""

    def _login(self) -> None:
        """createSession with the app password. Retried like a GET: a second session left by
        a retry after a lost answer is harmless (sessions expire on their own)."""
        data, why = self._session_call("com.atproto.server.createSession", idempotent=True,
                                       body={"identifier": self._identifier.value, "password": self._password.value})
        if data is None:
            raise SourceError(f"cannot log in to {self.instance}: {why} (check ${IDENTIFIER_ENV} and "
                              f"${APP_PASSWORD_ENV}; an app password, not the account password)")
        self._access, self._refresh = _Secret(data["accessJwt"]), _Secret(data["refreshJwt"])
        log.info("%s: logged in", self.instance)

    def _renew(self, stale: _Secret | None) -> None:
        """A new access token after ``stale`` was refused: refreshSession, else a new login.
        Not retried on a 5xx: a refresh the server did act on has spent its refresh token."""
        with self._session_lock:
            if self._access is not stale:  # another thread renewed it meanwhile
                return
            if self._refresh is not None:
                data, why = self._session_call("com.atproto.server.refreshSession", bearer=self._refresh,
                                               idempotent=False)
                if data is not None:
                    self._access, self._refresh = _Secret(data["accessJwt"]), _Secret(data["refreshJwt"])
                    log.info("%s: session refreshed", self.instance)
                    return
                log.warning("%s: session refresh failed (%s); logging in again", self.instance, why)
            self._login()

    def _access_token(self) -> _Secret:
        with self._session_lock:
            if self._access is None:
                self._login()
            assert self._access is not None
            return self._access

    def server_now(self) -> datetime:
        """The service's clock: the ``Date`` of the login's answer (logging in if not yet)."""
        self._access_token()
        return self._service_time or self.now()

    # ---------------------------------------------------------------- requests

    def xrpc_url(self, nsid: str, params: Mapping[str, Any]) -> str:
        return f"{self.instance}/xrpc/{nsid}?{urlencode(params, doseq=True)}"

    def get_json(self, url: str, *, shown: str | None = None) -> tuple[Any, dict[str, str]]:
        """GET an XRPC URL of this service with the session's token; return its parsed JSON
        and the response headers. An expired token is renewed once; bodies that are not JSON
        (an HTML error page from a proxy is usually transient) are retried. Raises
        :class:`SourceError` naming ``shown`` (default: the URL) when it cannot be read, a
        :class:`~pipeline.scrape.sources.base.ResponseRefused` when it passes the API's bounds or
        is not on the service's origin (the search's next page is built here from its cursor, so
        only a bug could ask for one)."""
        shown = shown or url
        try:
            foreign = origin(url) != origin(self.instance)
        except ValueError:
            foreign = True
        if foreign:  # the token belongs to this service alone
            raise CrossOriginLink(f"{shown}: not a URL of {self.instance}; not requested", url=shown,
                                  limit=f"the origin of {self.instance}")
        renewed = False
        problem = ""
        tries = self.client.cfg.retries + 1
        attempt = 0
        while attempt < tries:
            token = self._access_token()
            res = self.client.fetch_api(url, headers={"Accept": "application/json",
                                                      "Authorization": f"Bearer {token.value}"}, error_body=True)
            error = self._scrub((res.error or "").replace(url, shown))
            if res.retry_after_s is not None:
                raise SourceRateLimited(error or f"{shown}: rate limited", res.retry_after_s)
            too_much = refused(res, shown, self.client.cfg)
            if too_much is not None:
                raise too_much
            if not res.ok:
                code, message = _xrpc_error(res)
                if res.http_status in (400, 401) and code in TOKEN_ERRORS:
                    if not renewed:
                        self._renew(token)
                        renewed = True
                        continue
                    raise SourceError(f"cannot read {shown}: the service refused a renewed session too ({code})")
                detail = f" ({code}: {self._scrub(message)[:200]})" if code else ""
                raise SourceError(f"cannot read {shown}: {res.status}: {error}{detail}")
            try:
                return json.loads(res.body), dict(res.headers)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                ctype = res.headers.get("Content-Type", "?")
                looks = "an HTML page" if (res.body or b"").lstrip()[:1] == b"<" else "malformed JSON"
                problem = f"{looks} (Content-Type {ctype}: {exc})"
                log.warning("%s: got %s, attempt %d of %d", shown, problem, attempt + 1, tries)
                attempt += 1
                if attempt < tries:
                    self.client.sleep(random.uniform(0, self.client.cfg.backoff_s * 2 ** (attempt - 1)))
        raise SourceError(f"cannot read {shown}: {problem}, {tries} attempt(s)")

    def profiles(self, dids: Iterable[str]) -> dict[str, Profile | None]:
        """Profiles of ``dids`` (None: not returned, e.g. a deleted account), read in batches of
        :data:`BATCH` and cached for the life of this source (one run)."""
        wanted = list(dict.fromkeys(d for d in dids if d not in self._profiles))
        nsid = "app.bsky.actor.getProfiles"
        for i in range(0, len(wanted), BATCH):
            batch = wanted[i:i + BATCH]
            # The URL names the DIDs: errors show the endpoint and the batch size instead.
            data, _ = self.get_json(self.xrpc_url(nsid, {"actors": batch}),
                                    shown=f"{self.instance}/xrpc/{nsid} ({len(batch)} actors)")
            found = data.get("profiles") if isinstance(data, dict) else None
            if not isinstance(found, list):
                raise SourceError(f"cannot read {self.instance}/xrpc/{nsid}: no 'profiles' list in the answer")
            for did in batch:
                self._profiles[did] = None
            for obj in found:
                if isinstance(obj, dict) and obj.get("did") in batch:
                    self._profiles[obj["did"]] = _profile(obj)
        return self._profiles

    # ---------------------------------------------------------------- pages

    def search_url(self, hashtag: str, until: datetime | None = None, cursor: str | None = None) -> str:
        params: dict[str, Any] = {"q": f"#{hashtag}", "tag": hashtag, "sort": "latest", "limit": self.page_limit}
        if until is not None:
            params["until"] = iso_ms(until)
        if cursor:
            params["cursor"] = cursor
        return self.xrpc_url("app.bsky.feed.searchPosts", params)

    def max_id_before(self, when: datetime) -> str:
        # The TID of ``when`` with the lowest suffix: above every post id of an earlier TID,
        # and (``max_id`` being exclusive) below every post created at ``when`` or later.
        return make_post_id(datetime_to_tid(when), LOWEST_SUFFIX)

    def pages(self, hashtag: str, max_id: str | None = None) -> Iterator[Page]:
        """Search pages of ``#hashtag``, newest first, below ``max_id`` (a post id of this
        source, exclusive): the walk starts at ``until`` = its TID's time (rounded up to the
        millisecond the search compares at), and posts whose id is not below ``max_id`` are
        left out of the pages: they lie above the window asked for."""
        tag = hashtag.lstrip("#").lower()
        until: datetime | None = None
        if max_id is not None:
            try:
                until = ceil_ms(tid_to_datetime(max_id.split("-", 1)[0]))
            except ValueError:
                raise ValueError(f"max_id {max_id!r} is not a post id of a Bluesky source") from None
        bound = id_key(max_id) if max_id is not None else None
        cursor: str | None = None
        seen: set[str] = set()  # post ids listed so far: a repeat would look like covered ground
        url = self.search_url(tag, until)
        while True:
            data, headers = self.get_json(url)
            posts = data.get("posts") if isinstance(data, dict) else None
            if not isinstance(posts, list):
                detail = f" ({str(data.get('error'))[:200]})" if isinstance(data, dict) and data.get("error") else ""
                raise SourceError(f"cannot read {url}: expected an object with a 'posts' array{detail}")
            page = self._page(url, posts, tag, headers, bound, seen)
            if posts:
                next_cursor = data.get("cursor")
                if isinstance(next_cursor, str) and next_cursor:
                    cursor = next_cursor
                else:
                    # The cursor stopped short of the result set: go on below the earliest post.
                    times = [t for t in map(sort_time, posts) if t is not None]
                    oldest = min(times) if times else None
                    if oldest is None or (until is not None and oldest >= until):
                        log.warning("%s: no page cursor and no earlier post time; the walk ends here", url)
                        yield page
                        return
                    until, cursor = oldest, None
                page.next_url = self.search_url(tag, until, cursor)
            yield page
            if page.next_url is None:
                return
            url = page.next_url

    def _page(self, url: str, posts: list[Any], hashtag: str, headers: Mapping[str, str],
              bound: tuple[int, str] | None, seen: set[str]) -> Page:
        page = Page(url=url)
        scraped_at = server_time(headers) or self.now()
        profiles = self.profiles(d for d in map(candidate_did, posts) if d is not None)
        for entry in posts:
            item = normalize_post(entry, instance=self.instance, hashtag=hashtag, author_key=self.author_key,
                                  scraped_at=scraped_at, profiles=profiles)
            if item is None:
                page.unplaced["missing_field"] = page.unplaced.get("missing_field", 0) + 1
            elif (bound is None or id_key(item.post_id) < bound) and item.post_id not in seen:
                seen.add(item.post_id)
                page.items.append(item)
        page.items.sort(key=lambda it: id_key(it.post_id), reverse=True)
        return page

    def retry_url(self, post_id: str, stored_url: str, ref: str | None = None) -> str | None:
        """The CDN URL with the author's DID back in the segment the stored form blanked
        (``/img/feed_fullsize/plain/<did>/<cid>@jpeg``); None without the post's ``at://`` ref."""
        parts = split_at_uri(ref) if ref else None
        if parts is None:
            return super().retry_url(post_id, stored_url)
        did = parts[0]
        try:
            url = urlsplit(stored_url)
        except ValueError:
            return None
        return url._replace(path="/".join(did if seg == "_" else seg for seg in url.path.split("/"))).geturl()

    # ---------------------------------------------------------------- re-reads

    def reobserve(self, post_ids: Iterable[str]) -> Iterator[tuple[str, Observation | OptedOut | str]]:
        """Re-read posts through their ``refs`` (``at://`` URIs), :data:`BATCH` per getPosts:
        each post's :class:`Observation`, :class:`OptedOut` when its author has opted out since,
        ``"deleted"`` when the service no longer returns it, or an error text."""
        nsid = "app.bsky.feed.getPosts"
        with_ref: list[tuple[str, str]] = []
        for pid in post_ids:
            uri = self.refs.get(pid)
            if isinstance(uri, str) and split_at_uri(uri) is not None:
                with_ref.append((pid, uri))
            else:
                yield pid, "the crawl state has no at:// reference for this post; it cannot be re-read"
        for i in range(0, len(with_ref), BATCH):
            batch = with_ref[i:i + BATCH]
            shown = f"{self.instance}/xrpc/{nsid} ({len(batch)} posts)"
            try:
                data, headers = self.get_json(self.xrpc_url(nsid, {"uris": [uri for _, uri in batch]}), shown=shown)
                found = data.get("posts") if isinstance(data, dict) else None
                if not isinstance(found, list):
                    raise SourceError(f"cannot read {shown}: no 'posts' list in the answer")
                by_uri = {v["uri"]: v for v in found if isinstance(v, dict) and isinstance(v.get("uri"), str)}
                profiles = self.profiles(split_at_uri(uri)[0] for _, uri in batch if uri in by_uri)
            except SourceError as exc:  # a rate limit too: an error per post, as a Mastodon re-read gives
                for pid, _ in batch:
                    yield pid, str(exc)
                continue
            observed_at = server_time(headers) or self.now()
            for pid, uri in batch:
                yield pid, self._observation(pid, uri, by_uri.get(uri), profiles, observed_at)

    def _observation(self, pid: str, uri: str, view: dict | None, profiles: Mapping[str, Profile | None],
                     observed_at: datetime) -> Observation | OptedOut | str:
        if view is None:
            return "deleted"
        did = split_at_uri(uri)[0]
        profile = profiles.get(did)
        if author_opted_out(view, profile):
            return OptedOut(self.author_key(did))
        if profile is None or profile.followers is None:
            return "the author's profile could not be read (no followersCount)"
        try:
            return Observation(source="bluesky", instance=self.instance, post_id=pid, observed_at=observed_at,
                               likes=_count(view, "likeCount"), reposts=_count(view, "repostCount"),
                               replies=_count(view, "replyCount"), views=None, author_followers=profile.followers)
        except _Missing as exc:
            return f"field {exc.field!r} missing or malformed in the re-read post"


def _xrpc_error(res: FetchResult) -> tuple[str, str]:
    """An XRPC error answer's ``(error, message)``; ``("", "")`` when the body has none."""
    try:
        data = json.loads(res.body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    code, message = data.get("error"), data.get("message")
    return (code if isinstance(code, str) else "", message if isinstance(message, str) else "")

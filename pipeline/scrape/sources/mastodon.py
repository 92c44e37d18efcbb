"""Mastodon (and any server speaking its REST API): hashtag timelines and status re-reads.

Endpoints (docs.joinmastodon.org/methods/timelines/#tag, /methods/statuses/#get):

- ``GET /api/v1/timelines/tag/:hashtag?limit=N&max_id=ID`` — public statuses with the tag,
  newest first; the ``Link`` header's ``rel="next"`` URL is the next (older) page.
- ``GET /api/v1/statuses/:id`` — one status; 404 when deleted (or no longer visible).

Normalization of a Status (entity: docs.joinmastodon.org/entities/Status/) into a ``posts``
row, and what is skipped (each skipped status counted under one reason, in this order):

1. ``reblog`` set → ``boost``: the boosted original is counted on its own, and a boost's
   counters are not the original's audience.
2. any ``video``, ``gifv`` or ``audio`` attachment → ``video``: the likes of a post with a clip
   may be the clip's, so even its still images are not a clean label.
3. no attachment of ``type == "image"`` → ``no_image``.
4. the author's ``discoverable`` or ``indexable`` is ``false``, or ``noindex`` is ``true`` →
   ``opted_out`` (a ``null`` means the account predates the setting and is kept).
5. a required field missing or of the wrong type → ``missing_field``, with a warning naming
   the status id and the field.

The author is stored only as ``author_key`` = HMAC-SHA256(secret, account ``uri``) (falling
back to the account's ``url`` for servers older than 4.2, which lack ``uri``); the secret is
read from the environment variable named by ``source.author_key_secret_env``. Handles and
display names are never read into a row: the post's URL (``/@handle/id``) is not kept, and an
image URL path segment naming the author (``username``, ``acct``) is stored as ``_``. An access token, when given, is sent only to the
instance's API, never to media hosts, and is never logged.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

from requests.utils import parse_header_links

from pipeline.core.crawl_state import id_key
from pipeline.scrape.http import HttpClient, origin
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

log = logging.getLogger(__name__)

VIDEO_TYPES = frozenset({"video", "gifv", "audio"})

def server_time(headers: Any) -> datetime | None:
    """The response's ``Date`` header as an aware UTC datetime (None if absent or unreadable).

    Observations are dated by the server's clock: for a real instance it is the wall clock to
    the second, and the simulator's ``Date`` carries its world clock, so ages come out right."""
    value = headers.get("Date") if headers else None
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)


def parse_time(value: Any) -> datetime:
    """ISO 8601 (Mastodon: ``2019-12-08T03:48:33.901Z``) → aware UTC datetime; ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 string, got {type(value).__name__}")
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC)


class _Missing(Exception):
    def __init__(self, field: str):
        self.field = field


def _int(obj: dict, key: str, where: str = "") -> int:
    v = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _Missing(where + key)
    return v


def without_handles(url: str, handles: set[str]) -> str:
    """``url`` with every path segment that names the author (``alice``, ``@alice``) replaced by ``_``."""
    if not handles:
        return url

    def blank(path: str) -> str:
        return "/".join("_" if seg.lower().lstrip("@") in handles else seg for seg in path.split("/"))

    try:
        parts = urlsplit(url)
    except ValueError:  # unparseable: stored as given but blanked all the same; it downloads as bad_url
        scheme, sep, rest = url.partition("://")
        host, slash, path = rest.partition("/")
        return f"{scheme}{sep}{host}{slash}{blank(path)}"
    return parts._replace(path=blank(parts.path)).geturl()


def opted_out(account: dict) -> bool:
    """The account asks not to be collected: ``discoverable`` or ``indexable`` false, or
    ``noindex`` true (a ``null`` predates the setting and is not an opt-out)."""
    return account.get("discoverable") is False or account.get("indexable") is False or account.get("noindex") is True


def normalize_status(status: Any, *, instance: str, hashtag: str, author_key: Callable[[str], str],
                     scraped_at: datetime, source: str = "mastodon") -> Item | None:
    """One Status → an :class:`Item` (kept or skipped); None when it has no usable id at all."""
    if not isinstance(status, dict) or not isinstance(status.get("id"), str | int) or status.get("id") == "":
        log.warning("%s #%s: a status without an id was skipped (field 'id')", instance, hashtag)
        return None
    sid = str(status["id"])
    try:
        created_at = parse_time(status.get("created_at"))
    except ValueError:
        created_at = None
    item = Item(post_id=sid, created_at=created_at)
    if status.get("reblog") is not None:
        item.skip = "boost"
        return item
    media = status.get("media_attachments")
    if not isinstance(media, list):
        return _missing(item, instance, "media_attachments")
    types = [m.get("type") if isinstance(m, dict) else None for m in media]
    if any(t in VIDEO_TYPES for t in types):
        item.skip = "video"
        return item
    images = [m for m in media if isinstance(m, dict) and m.get("type") == "image"]
    if not images:
        item.skip = "no_image"
        return item
    account = status.get("account")
    if not isinstance(account, dict):
        return _missing(item, instance, "account")
    if opted_out(account):
        item.skip = "opted_out"
        return item
    try:
        if created_at is None:
            raise _Missing("created_at")
        uri = account.get("uri") or account.get("url")
        if not isinstance(uri, str) or not uri:
            raise _Missing("account.uri")
        urls = []
        for i, m in enumerate(images):
            u = m.get("url") or m.get("remote_url")
            if not isinstance(u, str) or not u.startswith(("http://", "https://")):
                raise _Missing(f"media_attachments[{i}].url")
            urls.append(u)
        handles = {h.lower() for h in (account.get("username"), *str(account.get("acct") or "").split("@")[:1])
                   if isinstance(h, str) and h}
        stored = [without_handles(u, handles) for u in urls]
        tags = []
        for t in status.get("tags") or []:
            name = t.get("name") if isinstance(t, dict) else None
            if isinstance(name, str) and name and name.lower() not in tags:
                tags.append(name.lower())
        if hashtag.lower() not in tags:  # the timeline matched it (e.g. a tag in a quote or edit)
            tags.append(hashtag.lower())
        language = status.get("language")
        item.post = Post(
            source=source,
            instance=instance,
            hashtag=hashtag.lower(),
            post_id=sid,
            created_at=created_at,
            author_key=author_key(uri),
            author_followers=_int(account, "followers_count", "account."),
            tags=tags,
            n_tags=len(tags),
            likes=_int(status, "favourites_count"),
            reposts=_int(status, "reblogs_count"),
            replies=_int(status, "replies_count"),
            views=None,  # Mastodon does not count views
            image_urls=stored,
            fetch_urls=urls if stored != urls else None,
            sensitive=bool(status.get("sensitive", False)),
            language=language if isinstance(language, str) and language else None,
            scraped_at=scraped_at,
        )
    except _Missing as exc:
        return _missing(item, instance, exc.field)
    return item


def _missing(item: Item, instance: str, field: str) -> Item:
    log.warning("%s: status %s skipped: required field %r is missing or malformed", instance, item.post_id, field)
    item.skip = "missing_field"
    return item


def observation(status: dict, *, instance: str, observed_at: datetime, source: str = "mastodon") -> Observation:
    """A Status's counts now; raises ValueError naming the field when one is missing."""
    try:
        return Observation(
            source=source, instance=instance, post_id=str(status["id"]), observed_at=observed_at,
            likes=_int(status, "favourites_count"), reposts=_int(status, "reblogs_count"),
            replies=_int(status, "replies_count"), views=None,
            author_followers=_int(status.get("account") or {}, "followers_count", "account."),
        )
    except (_Missing, KeyError) as exc:
        raise ValueError(f"field {getattr(exc, 'field', 'id')!r} missing or malformed") from None


class MastodonSource(Source):
    """Any Mastodon-compatible instance: ``MastodonSource("https://mastodon.social", client)``."""

    kind = "mastodon"

    def __init__(self, instance_url: str, client: HttpClient, *, author_key: Callable[[str], str],
                 token: str | None = None, page_limit: int = 40,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC), source: str = "mastodon"):
        """``now`` dates observations only when a response has no usable ``Date`` header."""
        parts = urlsplit(instance_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"instance URL {instance_url!r}: expected http(s)://host[:port]")
        self.instance = f"{parts.scheme}://{parts.netloc}".lower()
        self.client = client
        self.author_key = author_key
        self.page_limit = page_limit
        self.now = now
        self.kind = source
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

    def __repr__(self) -> str:  # never shows the token
        return f"MastodonSource({self.instance!r})"

    def _same_instance(self, url: str) -> bool:
        try:
            return origin(url) == origin(self.instance)
        except ValueError:
            return False

    def get_json(self, url: str) -> tuple[Any, dict[str, str]]:
        """GET an API URL; return its parsed JSON and the response headers. Bodies that are
        not JSON (an HTML error page from a proxy is usually transient) are retried; raises
        :class:`SourceError` naming the URL when the page cannot be read, a
        :class:`~pipeline.scrape.sources.base.ResponseRefused` when it passes the API's bounds."""
        # The token goes only to the instance itself, never to a host a Link header names.
        headers = self._headers if self._same_instance(url) else {"Accept": "application/json"}
        problem = ""
        tries = self.client.cfg.retries + 1
        for attempt in range(tries):
            res = self.client.fetch_api(url, headers=headers)
            if res.retry_after_s is not None:
                raise SourceRateLimited(res.error or f"{url}: rate limited", res.retry_after_s)
            too_much = refused(res, url, self.client.cfg)
            if too_much is not None:
                raise too_much
            if not res.ok:
                hint = " (the instance may need an access token: source.token_env)" if res.http_status in (401, 403) else ""
                raise SourceError(f"cannot read {url}: {res.status}: {res.error}{hint}")
            try:
                return json.loads(res.body), dict(res.headers)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                ctype = res.headers.get("Content-Type", "?")
                looks = "an HTML page" if res.body.lstrip()[:1] == b"<" else "malformed JSON"
                problem = f"{looks} (Content-Type {ctype}: {exc})"
                log.warning("%s: got %s, attempt %d of %d", url, problem, attempt + 1, tries)
                if attempt + 1 < tries:
                    self.client.sleep(random.uniform(0, self.client.cfg.backoff_s * 2 ** attempt))
        raise SourceError(f"cannot read {url}: {problem}, {tries} attempt(s)")

    def page_url(self, hashtag: str, max_id: str | None = None) -> str:
        params: dict[str, Any] = {"limit": self.page_limit}
        if max_id is not None:
            params["max_id"] = max_id
        return f"{self.instance}/api/v1/timelines/tag/{quote(hashtag, safe='')}?{urlencode(params)}"

    def read_page(self, url: str, hashtag: str) -> Page:
        """One timeline page: every status as an :class:`Item`, newest first, and the next URL
        (the ``Link`` header's ``rel="next"``, else ``max_id`` = the oldest id on the page).

        A ``rel="next"`` on another origin (scheme, host, port) than the instance is not
        followed: its statuses would be stored as this instance's. The page's own statuses are
        kept and the walk ends after them (:attr:`Page.stop_error`, a :class:`CrossOriginLink`)."""
        data, headers = self.get_json(url)
        if not isinstance(data, list):
            detail = f" ({str(data.get('error'))[:200]})" if isinstance(data, dict) and data.get("error") else ""
            raise SourceError(f"cannot read {url}: expected a JSON array of statuses, got {type(data).__name__}{detail}")
        page = Page(url=url)
        scraped_at = server_time(headers) or self.now()
        for status in data:
            item = normalize_status(status, instance=self.instance, hashtag=hashtag,
                                    author_key=self.author_key, scraped_at=scraped_at, source=self.kind)
            if item is None:
                page.unplaced["missing_field"] = page.unplaced.get("missing_field", 0) + 1
            else:
                page.items.append(item)
        page.items.sort(key=lambda it: id_key(it.post_id), reverse=True)
        if data:
            for link in parse_header_links(headers.get("Link", "") or ""):
                if link.get("rel") == "next" and link.get("url"):
                    try:
                        page.next_url = urljoin(url, link["url"])
                        origin(page.next_url)
                    except ValueError:
                        log.warning("%s: malformed Link rel=next %r; paging by max_id instead", url, link["url"][:200])
                        page.next_url = None
                    if page.next_url is not None and not self._same_instance(page.next_url):
                        shown = page.next_url[:200]
                        page.stop_error = CrossOriginLink(
                            f"{url}: Link rel=next {shown} is not on {self.instance} (scheme, host and port must "
                            "match); not followed", url=shown, limit=f"the origin of {self.instance}")
                        page.next_url = None
                        return page
            if page.next_url is None and page.items:
                page.next_url = self.page_url(hashtag, page.items[-1].post_id)
        return page

    def retry_url(self, post_id: str, stored_url: str, ref: str | None = None) -> str | None:
        """The stored URL, or where the author's handle was blanked out of it, the attachment's
        URL as the status gives it now (one re-read); None when the status cannot be read or no
        longer has that image."""
        plain = super().retry_url(post_id, stored_url)
        if plain is not None:
            return plain
        res = self.client.fetch_api(f"{self.instance}/api/v1/statuses/{quote(post_id, safe='')}",
                                    headers=self._headers)
        if not res.ok:
            return None
        try:
            status = json.loads(res.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        item = normalize_status(status, instance=self.instance, hashtag="", author_key=self.author_key,
                                scraped_at=self.now(), source=self.kind)
        if item is None or item.post is None:
            return None
        fetch_urls = item.post.fetch_urls or item.post.image_urls
        return dict(zip(item.post.image_urls, fetch_urls, strict=True)).get(stored_url)

    def max_id_before(self, when: datetime) -> str:
        # Mastodon status ids are snowflakes: creation time in ms, shifted past 16 random bits.
        return str(int(when.timestamp() * 1000) << 16)

    def server_now(self) -> datetime:
        res = self.client.fetch_api(f"{self.instance}/api/v1/instance", headers=self._headers)
        if res.status in ("connection_error", "timeout", "blocked"):
            raise SourceError(f"{self.instance}: unreachable ({res.error})")
        return server_time(res.headers) or self.now()

    def pages(self, hashtag: str, max_id: str | None = None) -> Iterator[Page]:
        url: str | None = self.page_url(hashtag, max_id)
        while url:
            page = self.read_page(url, hashtag)
            yield page
            url = page.next_url

    def reobserve(self, post_ids: Iterable[str], *,
                  workers: int | None = None) -> Iterator[tuple[str, Observation | OptedOut | str]]:
        """Re-read each post: its :class:`Observation`, :class:`OptedOut` when its author has opted
        out since, ``"deleted"`` (404/410), or an error message."""
        ids = list(post_ids)
        workers = workers or max(1, self.client.cfg.per_host_concurrency)

        def one(pid: str) -> tuple[str, Observation | OptedOut | str]:
            url = f"{self.instance}/api/v1/statuses/{quote(pid, safe='')}"
            res = self.client.fetch_api(url, headers=self._headers)
            if res.http_status in (404, 410):
                return pid, "deleted"
            if not res.ok:
                return pid, f"{res.status}: {res.error}"
            try:
                status = json.loads(res.body)
                if not isinstance(status, dict):
                    raise ValueError("not a JSON object")
                account = status.get("account") if isinstance(status.get("account"), dict) else {}
                uri = account.get("uri") or account.get("url")
                if opted_out(account) and isinstance(uri, str) and uri:
                    return pid, OptedOut(self.author_key(uri))
                observed_at = server_time(res.headers) or self.now()
                return pid, observation(status, instance=self.instance, observed_at=observed_at, source=self.kind)
            except (ValueError, UnicodeDecodeError) as exc:
                return pid, f"unreadable status from {url}: {exc}"

        # Batches keep the number of queued futures (and results held) bounded.
        with ThreadPoolExecutor(workers, thread_name_prefix="reobserve") as pool:
            for i in range(0, len(ids), 200):
                yield from pool.map(one, ids[i:i + 200])

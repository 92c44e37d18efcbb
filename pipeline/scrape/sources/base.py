"""The source interface: page through a hashtag, yield normalized posts; re-observe posts.

A source turns one platform's API into :class:`Post` rows (the ``posts`` schema) and
:class:`Observation` rows (the ``engagement`` schema). Pages are walked newest to oldest;
each :class:`Page` lists *every* status it held, kept or skipped, with its id, so the scrape
stage can keep exact coverage of the timeline (see :mod:`pipeline.scrape.scrape`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

from pipeline.core.config import ScrapeConfig
from pipeline.scrape.http import FetchResult

#: Why a status was not kept. Every skipped status is counted under exactly one of these.
SKIP_REASONS = {
    "boost": "a boost/reblog/repost, or not a post record (the original is counted where it was posted)",
    "no_image": "no image attachment",
    "video": "has a video, gifv or audio attachment (a still of a clip is not the photo that was liked)",
    "opted_out": "author account has discoverable: false, indexable: false or noindex: true "
                 "(Mastodon), or a !no-unauthenticated label (Bluesky)",
    "missing_field": "a required field is missing or malformed (logged with the status id and field)",
    "forgotten": "the author or the post was removed by `likerank forget` (tombstoned)",
}


class SourceError(RuntimeError):
    """A whole page (or request) could not be read after retries; the message names the URL."""


class SourceRateLimited(SourceError):
    """The server asked for a wait longer than ``scrape.max_server_wait_s``: come back later.

    Not a failure of the run: what was read is kept and the crawl state saved."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ResponseRefused(SourceError):
    """An API response broke a bound the scrape sets on what it accepts (its size, its time,
    where its next-page link points). Not read: the (platform, instance, hashtag) run ends with
    what it read kept and its crawl state saved, and its summary names this error.

    ``url`` is the request's URL as shown (no credential, no author); ``limit`` names the bound."""

    def __init__(self, message: str, *, url: str, limit: str):
        super().__init__(message)
        self.url, self.limit = url, limit


class ResponseTooLarge(ResponseRefused):
    """The body passed ``scrape.max_api_bytes``."""


class ResponseTooSlow(ResponseRefused):
    """The call did not complete within ``scrape.api_total_timeout_s`` (every attempt, wait and byte)."""


class RobotsDisallowed(ResponseRefused):
    """The host's robots.txt disallows the API path for likerank's user agent (or cannot be
    read, which RFC 9309 counts as disallowing everything): not requested."""


class CrossOriginLink(ResponseRefused):
    """A next-page link names another origin (scheme, host, port) than the instance's: its posts
    would be stored as the instance's, and the token would follow it. Not followed."""


def refused(res: FetchResult, shown: str, cfg: ScrapeConfig) -> ResponseRefused | None:
    """The :class:`ResponseRefused` an API fetch comes to, or None: its body passed
    ``max_api_bytes`` or its time passed ``api_total_timeout_s``. ``shown`` is the URL as errors
    may show it."""
    if res.status == "robots_disallowed":
        return RobotsDisallowed(f"{res.error}; the API call {shown} was not made", url=shown, limit="robots.txt")
    if res.status == "too_large":
        return ResponseTooLarge(f"API response from {shown} is larger than scrape.max_api_bytes = "
                                f"{cfg.max_api_bytes} bytes; not read", url=shown,
                                limit=f"scrape.max_api_bytes = {cfg.max_api_bytes}")
    if res.over_budget:
        return ResponseTooSlow(f"API response from {shown} not complete within scrape.api_total_timeout_s = "
                               f"{cfg.api_total_timeout_s:g} s ({res.body_bytes} bytes read); not read", url=shown,
                               limit=f"scrape.api_total_timeout_s = {cfg.api_total_timeout_s:g}")
    return None


@dataclass
class Post:
    """One kept post, exactly the ``posts`` table's columns."""

    source: str
    instance: str
    hashtag: str
    post_id: str
    created_at: datetime
    author_key: str
    author_followers: int
    tags: list[str]
    n_tags: int
    likes: int
    reposts: int
    replies: int
    views: int | None
    image_urls: list[str]
    sensitive: bool
    language: str | None
    scraped_at: datetime

    #: The URLs to download, where they differ from the stored ``image_urls`` (which have any
    #: path segment naming the author replaced by ``_``). Not a column.
    fetch_urls: list[str] | None = field(default=None, repr=False, compare=False)
    #: What the platform needs to re-read the post when ``post_id`` alone is not enough (Bluesky:
    #: the post's ``at://`` URI, which names the author's DID; None for Mastodon). The scrape
    #: stage keeps it in the crawl state, never in a table, and hands it back to
    #: :meth:`Source.reobserve` through the source's ``refs``. Not a column.
    ref: str | None = field(default=None, repr=False, compare=False)

    def row(self) -> dict:
        row = asdict(self)
        del row["fetch_urls"], row["ref"]
        return row


@dataclass
class Observation:
    """A re-read of a post's counts (``engagement`` columns minus age, which the caller computes)."""

    source: str
    instance: str
    post_id: str
    observed_at: datetime
    likes: int
    reposts: int
    replies: int
    views: int | None
    author_followers: int


@dataclass(frozen=True)
class OptedOut:
    """A re-read found that the author has opted out since (their pseudonym, to forget them)."""

    author_key: str


@dataclass
class Item:
    """One status on a page: kept (``post`` set) or skipped (``skip`` names the reason)."""

    post_id: str
    created_at: datetime | None
    post: Post | None = None
    skip: str | None = None


@dataclass
class Page:
    url: str
    items: list[Item] = field(default_factory=list)
    #: statuses that could not even be placed (no id at all), by reason
    unplaced: dict[str, int] = field(default_factory=dict)
    next_url: str | None = None
    #: Raised once the page's statuses are taken: the walk ends after this page (a next link
    #: that was refused, say), with what it read kept.
    stop_error: SourceError | None = None


class Source(ABC):
    """A platform behind one interface."""

    kind: str
    instance: str

    @abstractmethod
    def pages(self, hashtag: str, max_id: str | None = None) -> Iterator[Page]:
        """Pages of ``hashtag``'s timeline from ``max_id`` (exclusive; None = newest) down to
        the oldest, each page newest first. Raises :class:`SourceError` when a page cannot be read."""

    def max_id_before(self, when: datetime) -> str | None:
        """A ``max_id`` that starts :meth:`pages` at the posts created before ``when`` (a backfill
        of a past day reads that day's posts, not today's); None where ids carry no time."""
        return None

    @abstractmethod
    def reobserve(self, post_ids: Iterable[str]) -> Iterator[tuple[str, Observation | OptedOut | str]]:
        """Re-read posts: yields ``(post_id, Observation)``, ``(post_id, OptedOut)`` when the
        author has opted out since, or ``(post_id, reason)`` where reason is ``'deleted'``
        (gone) or an error text for a post that could not be read."""

    @abstractmethod
    def server_now(self) -> datetime:
        """The service's clock (its ``Date`` header): the refresh computes post ages on it.
        Raises :class:`SourceError` when the service cannot be reached."""

    def retry_url(self, post_id: str, stored_url: str, ref: str | None = None) -> str | None:
        """The URL to fetch when a later run tries an image again, from the form the
        ``downloads`` row stored (``image_urls``: any path segment naming the author blanked to
        ``_``) and the post's reference (:attr:`Post.ref`, from ``post_refs``); None when it
        cannot be recovered. Here: the stored URL, where nothing was blanked out of it."""
        return None if "_" in urlsplit(stored_url).path.split("/") else stored_url

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

"""The scrape stage: crawl a hashtag → download its images → write the day's tables → advance state.

``scrape(cfg, instance, hashtag, logical_date, platform=...)`` reads the hashtag on one
platform's service (a Mastodon instance's tag timeline, Bluesky's search: :func:`make_source`),
keeps the eligible posts (see :mod:`pipeline.scrape.sources.mastodon` and
:mod:`pipeline.scrape.sources.bluesky` for what is skipped and why),
downloads their images (:mod:`pipeline.scrape.download`) and writes, for partition ``dt=<date>``:
``posts``, ``engagement`` (one snapshot per kept post, taken when it was read), ``images``
(index rows; the bytes are content-addressed) and ``downloads`` (one row per attempted URL).

Coverage state (``state/scrape/<instance-host>/[<platform>/]<hashtag>.json``)
    The timeline is walked newest to oldest (``max_id`` paging, following ``Link: rel="next"``).
    The state records which id ranges have been read completely, as disjoint intervals
    ``[low, high]``, plus how far down the lowest one reaches (``bottom``: the timeline's end,
    or a backfill horizon). A run starts at the newest status and walks down; on reaching a
    covered interval it jumps to just below it (``max_id = low``), so the walk reads exactly the
    statuses it has not read before: new posts above the newest interval, and the gaps a run
    stopped by ``max_posts`` (or a crash) left. Below the lowest interval it walks only to
    backfill: to ``logical_date - scrape.backfill_days`` (or the timeline's end). With
    ``backfill_days = 0`` ("forward only") a first run reads just the newest page and later
    runs read what appears after it. A run for a past day (``airflow backfill create``)
    starts at the end of that day (``max_id`` from the snowflake id), so its partition holds
    the posts created up to then that no run read before.

Durability and reruns
    Rows are buffered and flushed every :data:`FLUSH_EVERY` statuses and at the end: the
    downloads in flight are awaited, each table's ``dt=<date>`` partition is **merged** (the
    existing partition is read, the new rows appended, duplicates by key dropped keeping the
    newest, the partition rewritten atomically), and only then is the state advanced to cover
    what was flushed. A crash therefore loses at most the unflushed statuses, which the next
    run reads again because the state does not cover them; a flush that happened before the
    crash but whose state write did not is re-read and merged without duplicating (same date).
    Rerunning a finished date reads only what is new and merges it: the partition is never
    emptied by a rerun. Keys: posts and engagement (``instance, post_id``), downloads
    (``source, post_id, url``), images (``sha256``). A post read under two hashtags the same
    day is one ``posts`` row (the hashtag read last).

    Because a partition is one file, two runs must not write the same date at once: the DAG
    runs its mapped scrape tasks one at a time (``max_active_tis_per_dag=1``).

Tries again
    A run first tries again the images of its timeline (its posts: same platform, instance and
    hashtag) whose latest ``downloads`` row is due (:func:`due_retries`: a retryable status,
    ``next_attempt_at`` passed, fewer than ``scrape.max_attempts`` tries), then walks the
    timeline. Each try is a new row with ``attempt`` + 1 in this run's partition; a URL that
    already has a row in this run's partition waits for a later run, so a try never replaces
    another. The fetch URL comes back through :meth:`Source.retry_url` (the stored URL has the
    author blanked out of it where it named them). Forgotten posts are not tried; ``forget``
    removes every try's row with the post's.

Known limit: Mastodon gives a status that federates in late an id from its creation time, so
one that arrives after its id range was covered is never read (as with ``since_id`` paging).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import keys
from pipeline.core.config import PLATFORMS, Config
from pipeline.core.crawl_state import id_key, without_ids
from pipeline.core.forget import load_tombstones, remove_tombstoned, salt_for
from pipeline.core.post_refs import load_refs, save_refs
from pipeline.core.pseudonym import author_keyer, is_started_simulator, key_required
from pipeline.core.schemas import TABLES
from pipeline.core.storage import Storage, open_storage
from pipeline.core.tables import (
    get_json,
    last_per_key,
    merge_rows,
    put_json,
    read_table,
)
from pipeline.scrape import crawl_lease
from pipeline.scrape.download import Downloaded, Downloader
from pipeline.scrape.http import HttpClient
from pipeline.scrape.sources.base import (
    Item,
    Page,
    Post,
    ResponseRefused,
    Source,
    SourceRateLimited,
)
from pipeline.scrape.sources.mastodon import MastodonSource

log = logging.getLogger(__name__)

#: Statuses read between durable flushes (each flush rewrites the day's partitions).
FLUSH_EVERY = 1000
STATE_VERSION = 1


# --------------------------------------------------------------------------- state


def state_key(instance: str, hashtag: str, platform: str = "mastodon") -> str:
    return keys.crawl_state(urlsplit(instance).netloc, hashtag, platform)


def load_state(storage: Storage, instance: str, hashtag: str, platform: str = "mastodon") -> dict:
    state = get_json(storage, state_key(instance, hashtag, platform), default=None) or {}
    return {"version": STATE_VERSION, "intervals": state.get("intervals", []),
            "bottom": state.get("bottom", {"end": False, "horizon": None})}


class Coverage:
    """Which id ranges of one timeline have been read; decides where the walk goes next."""

    def __init__(self, state: dict, *, backfill: bool, horizon: datetime | None, limit: int):
        self.intervals: list[list[str]] = [list(iv) for iv in state["intervals"]]
        self.bottom = dict(state["bottom"])
        self.first_run = not self.intervals
        self.backfill, self.horizon, self.limit = backfill, horizon, limit
        self.seg: list[str] | None = None  # [low, high]: the range this walk is extending downward
        self.read = 0
        self.stop = ""

    def _covering(self, pid: str) -> list[str] | None:
        k = id_key(pid)
        for iv in self.intervals:
            if id_key(iv[0]) <= k <= id_key(iv[1]):
                return iv
        return None

    def _lowest(self) -> bool:
        """True when no covered interval lies below the walk's position."""
        if self.seg is None:
            return not self.intervals
        low = id_key(self.seg[0])
        return all(id_key(iv[1]) > low for iv in self.intervals)

    def _backfill_more(self) -> bool:
        if not self.backfill or self.bottom.get("end"):
            return False
        reached = self.bottom.get("horizon")
        return reached is None or self.horizon is None or self.horizon < datetime.fromisoformat(reached)

    def take(self, page: Page) -> tuple[list[Item], str]:
        """The page's unread statuses, and what to do next: ``next`` (follow the page's next
        link), ``jump`` (continue below ``self.seg[0]``) or ``stop``."""
        new: list[Item] = []
        for it in page.items:
            iv = self._covering(it.post_id)
            if iv is not None:
                self.intervals.remove(iv)
                self.seg = [iv[0], self.seg[1] if self.seg else iv[1]]
                if not self._lowest() or self._backfill_more():
                    return new, "jump"
                self.stop = "caught up"
                return new, "stop"
            if self.limit and self.read >= self.limit:
                self.stop = "max_posts"
                return new, "stop"
            new.append(it)
            self.read += 1
            self.seg = [it.post_id, self.seg[1] if self.seg else it.post_id]
        if not page.items:
            if self._lowest():
                self.bottom = {"end": True, "horizon": self.bottom.get("horizon")}
            self.stop = "end of timeline"
            return new, "stop"
        if self.limit and self.read >= self.limit:
            self.stop = "max_posts"
            return new, "stop"
        if self._lowest():
            if self.first_run and not self.backfill:
                self.stop = "first page (forward only: scrape.backfill_days = 0)"
                return new, "stop"
            if not self.first_run and not self._backfill_more():
                self.stop = "caught up"
                return new, "stop"
            if self.horizon is not None and any(i.created_at and i.created_at < self.horizon for i in page.items):
                self.bottom = {"end": False, "horizon": self.horizon.isoformat()}
                self.stop = f"backfill horizon {self.horizon.date()}"
                return new, "stop"
        return new, "next" if page.next_url else "stop"

    def state(self) -> dict:
        ivs = [list(iv) for iv in self.intervals] + ([list(self.seg)] if self.seg else [])
        ivs.sort(key=lambda iv: id_key(iv[1]), reverse=True)
        return {"version": STATE_VERSION, "intervals": ivs, "bottom": self.bottom}


# --------------------------------------------------------------------------- tables


def merge_partition(storage: Storage, table: str, value: str, rows: list[dict]) -> int:
    """Upsert ``rows`` into partition ``value`` of ``table`` in one commit: on the table's
    identity key, the newest row wins, so a rerun duplicates nothing. Returns the rows written."""
    counts = merge_rows(storage, table, pa.Table.from_pylist(rows, schema=TABLES[table].schema),
                        partition_value=value, operation=f"scrape {table}")
    return counts.inserted + counts.updated


def due_retries(storage: Storage, source: str, day: str, now: datetime) -> pa.Table:
    """The latest ``downloads`` row of each ``(source, post_id, url)`` of ``source`` that a run
    for ``day`` should try again: ``next_attempt_at`` set and passed (see
    :func:`pipeline.scrape.download.next_attempt_at`), and no row of the URL in partition
    ``dt=day`` (a try there would replace it). Columns: post_id, url, status, attempt."""
    columns = ["dt", "source", "post_id", "url", "status", "attempt", "next_attempt_at", "attempted_at"]
    rows = read_table(storage, "downloads", columns=columns)
    # Filtered here, not in the scan: the columns are absent from files written before they existed.
    rows = rows.filter(pc.equal(rows["source"], source))
    if not rows.num_rows:
        return rows.select(["post_id", "url", "status", "attempt"])
    order = rows.append_column("try", pc.fill_null(rows["attempt"], 1)).sort_by([("try", "ascending"),
                                                                                ("attempted_at", "ascending")])
    in_day = order.filter(pc.equal(order["dt"], day))
    taken = set(zip(in_day["post_id"].to_pylist(), in_day["url"].to_pylist(), strict=True))
    latest = last_per_key(order, ["source", "post_id", "url"])
    due = latest.filter(pc.and_(pc.is_valid(latest["next_attempt_at"]),
                                pc.less_equal(latest["next_attempt_at"], pa.scalar(now, type=latest["next_attempt_at"].type))))
    if taken:
        keep = [(p, u) not in taken for p, u in zip(due["post_id"].to_pylist(), due["url"].to_pylist(), strict=True)]
        due = due.filter(pa.array(keep, pa.bool_()))
    return due.select(["post_id", "url", "status", "try"]).rename_columns(["post_id", "url", "status", "attempt"])


class DayBuffer:
    """Rows waiting for the next flush into the day's partitions."""

    ORDER = ("images", "downloads", "engagement", "posts")  # posts last: a post row implies its images

    def __init__(self, storage: Storage, value: str):
        self.storage, self.value = storage, value
        self.rows: dict[str, list[dict]] = {t: [] for t in self.ORDER}
        self.written: Counter[str] = Counter()  # rows committed per table (inserted or updated)

    def flush(self) -> list[dict]:
        """Commit the buffered rows, table by table; return the ``posts`` rows committed."""
        posts = self.rows["posts"]
        for table in self.ORDER:
            if self.rows[table]:
                self.written[table] += merge_partition(self.storage, table, self.value, self.rows[table])
                self.rows[table] = []
        return posts


# --------------------------------------------------------------------------- the stage


def logical_day(logical_date: str | date | datetime) -> str:
    if isinstance(logical_date, datetime):
        return logical_date.astimezone(UTC).date().isoformat() if logical_date.tzinfo else logical_date.date().isoformat()
    if isinstance(logical_date, date):
        return logical_date.isoformat()
    return date.fromisoformat(str(logical_date)[:10]).isoformat()


def resolve_token(cfg: Config, token: str | None = None) -> str | None:
    """The access token: given (the DAG reads it from an Airflow connection), else ``$source.token_env``."""
    return token or os.environ.get(cfg.source.token_env) or None


#: The login ``make run`` and the tests use against the simulator, which accepts any login.
SIMULATOR_LOGIN = ("likerank-demo.bsky.sim", "simulator-app-password")


def resolve_bluesky_login(cfg: Config, service: str, login: tuple[str, str] | None = None) -> tuple[str, str]:
    """The Bluesky identifier and app password: given (the DAG reads them from an Airflow
    connection), else the environment (``source.bluesky_identifier_env`` and
    ``source.bluesky_password_env``), else, when ``service`` is a simulator this process tree
    started, :data:`SIMULATOR_LOGIN`.
    Raises ValueError naming the variables (never a value) when none is found."""
    from pipeline.scrape.sources.bluesky import credentials_from_env

    found = login or credentials_from_env(os.environ, cfg.source.bluesky_identifier_env,
                                          cfg.source.bluesky_password_env)
    if found:
        return found
    if is_started_simulator(service):
        return SIMULATOR_LOGIN
    raise ValueError(f"Bluesky needs a login: set ${cfg.source.bluesky_identifier_env} (handle or email) and "
                     f"${cfg.source.bluesky_password_env} (an app password: Settings → Privacy and security → "
                     "App passwords), or source.bluesky_airflow_conn_id")


def make_source(cfg: Config, platform: str, instance: str, client: HttpClient, *, now: Callable[[], datetime],
                token: str | None = None, login: tuple[str, str] | None = None,
                refs: Mapping[str, str] | None = None) -> Source:
    """The :class:`Source` of ``platform`` at ``instance`` (a Mastodon instance, a Bluesky XRPC service)."""
    author_key = author_keyer(cfg.source.author_key_secret_env, required=key_required([instance]),
                              target=f"the accounts of {instance}")
    if platform == "mastodon":
        return MastodonSource(instance, client, author_key=author_key, token=resolve_token(cfg, token),
                              page_limit=cfg.scrape.page_limit, now=now)
    if platform == "bluesky":
        from pipeline.scrape.sources.bluesky import MAX_PAGE, BlueskySource

        identifier, password = resolve_bluesky_login(cfg, instance, login)
        # scrape.page_limit is Mastodon's (at most 40); Bluesky's search pages hold up to 100.
        return BlueskySource(instance, client, author_key=author_key, identifier=identifier, app_password=password,
                             refs=refs, page_limit=MAX_PAGE, now=now)
    raise ValueError(f"unknown platform {platform!r} (known: {', '.join(PLATFORMS)})")


def scrape(cfg: Config, instance: str, hashtag: str, logical_date: str | date | datetime,
           max_posts: int | None = None, progress: bool = False, *, platform: str = "mastodon",
           token: str | None = None, login: tuple[str, str] | None = None,
           now: Callable[[], datetime] | None = None, source: Source | None = None,
           flush_every: int = FLUSH_EVERY) -> dict[str, Any]:
    """Scrape one (platform, instance, hashtag) for one logical date; return a summary (small, XCom-safe).

    ``max_posts`` (default ``scrape.max_posts``; 0 = no limit) caps the statuses read this run.
    ``scraped_at``/``observed_at`` come from the server's ``Date`` header (the simulator's world
    clock); ``now`` is the fallback clock when a response has none (default: UTC wall clock).
    ``token`` (Mastodon) and ``login`` (Bluesky: identifier, app password) come from an Airflow
    connection when the DAG has one, else from the environment (:func:`make_source`).
    ``source`` replaces the platform's source (tests).
    ``flush_every``: statuses between durable flushes.
    """
    started = time.monotonic()  # the summary's elapsed_s includes opening the source (a Bluesky login)
    day = logical_day(logical_date)
    hashtag = hashtag.lstrip("#").lower()
    now = now or (lambda: datetime.now(UTC))
    limit = cfg.scrape.max_posts if max_posts is None else max_posts
    storage = open_storage(cfg.storage)
    key = state_key(instance.rstrip("/"), hashtag, platform)
    try:
        lease = crawl_lease.acquire(storage, key)
    except crawl_lease.CrawlBusy as exc:  # not a failure: the scrape that holds it reads these posts
        log.warning("scrape %s %s #%s: nothing to do: %s", platform, instance, hashtag, exc)
        return {"source": platform, "instance": instance, "hashtag": hashtag, "date": day, "pages": 0, "seen": 0,
                "kept": 0, "skipped": {}, "downloads": {}, "retried": 0, "images": 0, "stopped": f"busy: {exc}",
                "state": key,
                "rows_written": {}, "elapsed_s": round(time.monotonic() - started, 2)}
    client = HttpClient(cfg.scrape)
    try:
        src = source or make_source(cfg, platform, instance, client, now=now, token=token, login=login)
        crawl = Crawl(cfg, storage, client, src, hashtag, day, limit=limit, now=now, flush_every=flush_every,
                      progress=progress, started=started, lease=lease)
    except BaseException:
        client.close()
        lease.release()
        raise
    try:
        return crawl.run()
    finally:
        lease.release()


def walk_start(source: Source, day: str) -> str | None:
    """The ``max_id`` a run for ``day`` starts below: the end of that day for a past day, else
    None (the newest post). A past day (a backfill run) reads the posts created up to its end,
    not today's: its partition holds what existed that day."""
    day_end = datetime.fromisoformat(day).replace(tzinfo=UTC) + timedelta(days=1)
    return source.max_id_before(day_end) if day_end < datetime.now(UTC) else None


def backfill_horizon(day: str, backfill_days: int) -> datetime | None:
    """How far below the lowest covered interval the walk goes: ``backfill_days`` before
    ``day`` (midnight UTC); None when backfill is off (forward only)."""
    if not backfill_days:
        return None
    return datetime.fromisoformat(day).replace(tzinfo=UTC) - timedelta(days=backfill_days)


def engagement_row(post: Post) -> dict[str, Any]:
    """The ``engagement`` snapshot of a post, taken when it was read (``scraped_at``)."""
    return {
        "source": post.source, "instance": post.instance, "post_id": post.post_id,
        "observed_at": post.scraped_at, "likes": post.likes, "reposts": post.reposts,
        "replies": post.replies, "views": post.views, "author_followers": post.author_followers,
        # The post's age at the snapshot, in days.
        "age_days": (post.scraped_at - post.created_at).total_seconds() / 86400.0,
    }


class Crawl:
    """One run over one timeline (platform, instance, hashtag) for one day.

    Owns what the run has read but not yet made durable (:attr:`buffer` and :attr:`refs`),
    the timeline's :class:`Coverage`, and the flushes that write the one and save the other,
    data first (see the module's "Durability and reruns"). :meth:`run` is the whole stage:
    ``for page in pages(): take(page)``, a last :meth:`flush`, then the :meth:`summary`.

    ``client`` is the run's HTTP client (the source's and the downloads'); the crawl closes it.
    ``limit``: statuses to read at most (0 = no limit). ``flush_every``: statuses between
    flushes. ``started``: :func:`time.monotonic` when the run began (for ``elapsed_s``).
    """

    def __init__(self, cfg: Config, storage: Storage, client: HttpClient, source: Source, hashtag: str,
                 day: str, *, limit: int, now: Callable[[], datetime], flush_every: int, progress: bool,
                 started: float, lease: crawl_lease.CrawlLease | None = None):
        self.cfg, self.storage, self.client, self.source = cfg, storage, client, source
        self.lease = lease  # this timeline's crawl lease (its heartbeat renews it)
        self.hashtag, self.day, self.flush_every, self.started = hashtag, day, flush_every, started
        self.platform = source.kind
        self.instance = source.instance
        self.host = urlsplit(self.instance).netloc
        self.state_key = state_key(self.instance, hashtag, self.platform)
        self.start = walk_start(source, day)
        horizon = backfill_horizon(day, cfg.scrape.backfill_days)
        self.coverage = Coverage(load_state(storage, self.instance, hashtag, self.platform),
                                 backfill=cfg.scrape.backfill_days > 0, horizon=horizon, limit=limit)
        self.buffer = DayBuffer(storage, day)
        self.salt = salt_for(cfg, [self.instance])
        self.tombstones = load_tombstones(storage, self.salt)
        self.forgotten_ids: set[str] = set()  # read but forgotten: no state interval may end on one
        self.now = now
        self.downloader = Downloader(cfg.scrape, storage, client, source=source.kind, now=now)

        # What was read, kept or skipped, for the summary.
        self.page_count = 0
        self.kept = 0
        self.skipped: Counter[str] = Counter()  # statuses not kept, by reason (SKIP_REASONS)
        self.download_statuses: Counter[str] = Counter()  # attempted image URLs, by download status
        self.opt_out_reasons: Counter[str] = Counter()  # refused images, by why (noai, robots, tdm)
        self.image_hashes: set[str] = set()  # sha256 of the images stored this run
        self.retried = 0  # image URLs of earlier runs tried again

        # What the next flush makes durable.
        self.refs: list[dict[str, str]] = []  # what a re-read needs (Bluesky: the at:// URI), kept as crawl state
        self.buffered_state = self.coverage.state()  # coverage whose rows are all buffered (or written)
        self.unflushed = 0  # statuses read (kept or skipped) since the last flush
        self.action = ""  # what the last page told the walk to do: Coverage.take's next, jump or stop

        from tqdm import tqdm
        self.bar = tqdm(total=limit or None, unit="post", desc=f"#{hashtag}", disable=not progress, leave=False)

    # ---------------------------------------------------------------- the run

    def run(self) -> dict[str, Any]:
        """Walk the timeline, flushing as it goes and at the end; record and return the summary.

        Whatever stops the walk, what was read is flushed (and covered) first: a rate limit, or
        an API response refused for its size, its time or its next link
        (:class:`~pipeline.scrape.sources.base.ResponseRefused`), ends the run early but normally,
        its summary's ``stopped`` saying why; any other error is raised after the flush."""
        try:
            self.retry_due()
            for page in self.pages():
                self.take(page)
            self.flush()
        except SourceRateLimited as exc:
            # Not a failure: keep what was read, save the state, say when to come back.
            self.flush()
            self.coverage.stop = f"rate limited: {exc}"
            log.warning("scrape %s #%s: stopped early, state saved: %s", self.instance, self.hashtag, exc)
        except ResponseRefused as exc:
            # The service answered outside what a scrape accepts: what it sent before is kept and
            # covered; the same page is asked for again by the next run.
            self.flush()
            self.coverage.stop = f"{type(exc).__name__}: {exc}"
            log.warning("scrape %s %s #%s: stopped early, state saved: %s: %s", self.platform, self.instance,
                        self.hashtag, type(exc).__name__, exc)
        except BaseException:
            # Keep what was read: flush it (and cover it) before failing, unless the flush itself fails.
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                log.exception("could not flush the rows read before the failure; they will be read again")
            raise
        finally:
            self.close()
        summary = self.summary()
        self.record(summary)
        return summary

    def retry_due(self) -> None:
        """Start the downloads of this timeline's due retries (module doc, "Tries again")."""
        due = due_retries(self.storage, self.platform, self.day, self.now())
        if not due.num_rows:
            return
        posts = read_table(self.storage, "posts", columns=["source", "instance", "hashtag", "post_id", "author_key"])
        posts = posts.filter(pc.and_(pc.and_(pc.equal(posts["source"], self.platform),
                                             pc.equal(posts["instance"], self.instance)),
                                     pc.and_(pc.equal(posts["hashtag"], self.hashtag),
                                             pc.is_in(posts["post_id"], value_set=due["post_id"]))))
        authors = dict(zip(posts["post_id"].to_pylist(), posts["author_key"].to_pylist(), strict=True))
        refs = load_refs(self.storage, self.platform, self.host, authors) if authors else {}
        for post_id, stored_url, attempt in zip(due["post_id"].to_pylist(), due["url"].to_pylist(),
                                                due["attempt"].to_pylist(), strict=True):
            author_key = authors.get(post_id)
            if author_key is None:  # another timeline's post (or one forgotten since)
                continue
            if self.tombstones and self.tombstones.covers(author_key, self.instance, post_id):
                continue
            url = self.source.retry_url(post_id, stored_url, refs.get(post_id))
            self.retried += 1
            if url is None:
                self.collect([self.unrecoverable(post_id, stored_url, attempt + 1)])
                continue
            self.collect(self.downloader.submit(post_id, url, stored_url, attempt + 1))
        log.info("scrape %s %s #%s: trying %d image(s) of earlier runs again", self.platform, self.instance,
                 self.hashtag, self.retried)

    def unrecoverable(self, post_id: str, stored_url: str, attempt: int) -> Downloaded:
        """The final row of a URL a retry cannot fetch: the stored form had the author blanked
        out of it, and the platform could not give the real one back."""
        return Downloaded({
            "source": self.platform, "post_id": post_id, "url": stored_url, "status": "bad_url", "http_status": None,
            "error": f"not tried again: the author was blanked out of {stored_url} and the post's image URL "
                     "could not be read back (post deleted, or its reference gone)",
            "bytes": 0, "elapsed_ms": 0.0, "attempts": 0, "sha256": None, "attempted_at": self.now(),
            "attempt": attempt, "next_attempt_at": None, "opt_out_reason": None}, None)

    def pages(self) -> Iterator[Page]:
        """The timeline's pages in walk order, from :attr:`start` down.

        After each page, :meth:`take` has set :attr:`action`: ``next`` reads on, ``jump``
        restarts the walk just below the covered interval it reached, ``stop`` ends it."""
        cursor = self.start
        walking = True
        while walking:
            walking = False
            for page in self.source.pages(self.hashtag, max_id=cursor):
                yield page
                if self.action == "jump":
                    assert self.coverage.seg is not None  # a jump is taken from a reached interval
                    cursor, walking = self.coverage.seg[0], True
                    break
                if self.action == "stop":
                    break

    def take(self, page: Page) -> None:
        """Read one page: buffer its unread statuses, collect finished downloads, move the
        coverage to save on, and flush every :attr:`flush_every` statuses."""
        self.page_count += 1
        for reason, n in page.unplaced.items():
            self.skipped[reason] += n
        new, self.action = self.coverage.take(page)
        for item in new:
            self.keep(item)
        self.collect(self.downloader.finished())
        self.buffered_state = self.coverage.state()
        self.unflushed += len(new)
        self.bar.update(len(new))
        self.bar.set_postfix(kept=self.kept, images=len(self.image_hashes), refresh=False)
        if self.unflushed >= self.flush_every:
            self.flush()
        if page.stop_error is not None:  # the page's own statuses are taken; the walk goes no further
            raise page.stop_error

    def keep(self, item: Item) -> None:
        """Buffer a status's post and engagement rows and start its downloads, or count why not."""
        if item.post is None:
            self.skipped[item.skip or "missing_field"] += 1
            return
        post = item.post
        if self.tombstones and self.tombstones.covers(post.author_key, post.instance, post.post_id):
            self.skipped["forgotten"] += 1
            self.forgotten_ids.add(post.post_id)
            return
        self.kept += 1
        self.buffer.rows["posts"].append(post.row())
        if post.ref:
            self.refs.append({"post_id": post.post_id, "author_key": post.author_key, "ref": post.ref})
        self.buffer.rows["engagement"].append(engagement_row(post))
        self.download(post)

    def download(self, post: Post) -> None:
        """Queue the post's first ``scrape.max_images_per_post`` images (fetched from
        ``fetch_urls`` where set, recorded under ``image_urls``)."""
        fetch_urls = post.fetch_urls or post.image_urls
        pairs = list(zip(fetch_urls, post.image_urls, strict=True))[:self.cfg.scrape.max_images_per_post]
        for url, stored_url in pairs:
            self.collect(self.downloader.submit(post.post_id, url, stored_url))

    def collect(self, results: list[Downloaded]) -> None:
        """Buffer finished downloads: a ``downloads`` row each, an ``images`` row for each stored image."""
        for result in results:
            self.download_statuses[result.status] += 1
            if result.download.get("opt_out_reason"):
                self.opt_out_reasons[result.download["opt_out_reason"]] += 1
            self.buffer.rows["downloads"].append(result.download)
            if result.image is not None:
                self.image_hashes.add(result.image["sha256"])
                self.buffer.rows["images"].append(result.image)

    def flush(self) -> None:
        """Make what was read durable, then cover it; each step before the one that relies on it."""
        self.collect(self.downloader.drain())
        self.storage.sync()  # the images first: no row may point at bytes that are not on disk
        save_refs(self.storage, self.platform, self.host, self.refs)  # before the posts that need them
        self.refs.clear()
        committed = self.buffer.flush()
        # A forget that ran while these rows were being committed tombstoned them first: its
        # lookup may have missed them, so they are removed here (see pipeline.core.forget).
        if committed:
            removed = remove_tombstoned(self.storage, self.salt, pa.Table.from_pylist(committed).select(
                ["author_key", "instance", "post_id"]))
            self.forgotten_ids |= {post_id for _, post_id in removed}
        # After the data: state never covers unwritten rows; and no interval ends on a forgotten id.
        state = {**self.buffered_state, "intervals": without_ids(self.buffered_state["intervals"], self.forgotten_ids)}
        put_json(self.storage, self.state_key, state)
        self.unflushed = 0

    def close(self) -> None:
        self.bar.close()
        self.downloader.close()
        self.client.close()

    # ---------------------------------------------------------------- the outcome

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.platform, "instance": self.instance, "hashtag": self.hashtag, "date": self.day,
            "pages": self.page_count, "seen": self.kept + sum(self.skipped.values()), "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "downloads": dict(sorted(self.download_statuses.items())),
            "opt_out_reasons": dict(sorted(self.opt_out_reasons.items())),
            "retried": self.retried, "images": len(self.image_hashes), "stopped": self.coverage.stop,
            "state": self.state_key,
            "rows_written": dict(sorted(self.buffer.written.items())), "elapsed_s": round(time.monotonic() - self.started, 2),
        }

    def record(self, summary: dict[str, Any]) -> None:
        """Save the run log and log the summary's line.

        Skip reasons exist nowhere else (skipped statuses are not stored), and the funnel
        (`make run`, the report) adds them up. One file per run, never overwritten."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        put_json(self.storage, keys.scrape_run(self.day, self.host, self.hashtag, stamp, self.platform), summary)
        log.info("scrape %s %s #%s %s: %d seen, %d kept, skipped %s, downloads %s (%s)", self.platform,
                 self.instance, self.hashtag, self.day, summary["seen"], self.kept, summary["skipped"],
                 summary["downloads"], self.coverage.stop)


def format_summary(s: dict[str, Any]) -> str:
    """One screen for the CLI."""
    lines = [
        f"scrape {s.get('source', 'mastodon')} {s['instance']} #{s['hashtag']}  date {s['date']}  ({s['elapsed_s']} s, {s['pages']} pages; stopped: {s['stopped']})",
        f"  statuses seen   {s['seen']:>8}",
        f"  posts kept      {s['kept']:>8}",
    ]
    for reason, n in s["skipped"].items():
        lines.append(f"  skipped {reason:<15} {n:>8}")
    lines.append(f"  tried again     {s.get('retried', 0):>8}  (images of earlier runs that were due)")
    lines.append(f"  images stored   {s['images']:>8}")
    for status, n in s["downloads"].items():
        lines.append(f"  download {status:<14} {n:>8}")
    for reason, n in s.get("opt_out_reasons", {}).items():
        lines.append(f"  refused: {reason:<14} {n:>8}  (opt_out_reason)")
    for table, n in s["rows_written"].items():
        lines.append(f"  {table:<9} dt={s['date']}: {n} rows written")
    lines.append(f"  state: {s['state']}")
    return "\n".join(lines)


def scrape_pairs(cfg: Config, instances: list[str] | None = None, hashtags: list[str] | None = None,
                 max_posts: int | None = None, *, bluesky_services: list[str] | None = None,
                 platforms: list[str] | None = None) -> list[dict[str, Any]]:
    """The (platform, instance, hashtag) triples one scheduled run scrapes, one mapped task each:
    for every platform of ``platforms`` (default ``source.platforms``), its services (Mastodon:
    ``instances``, else ``source.instance_url``; Bluesky: ``bluesky_services``, else
    ``source.bluesky_url``) times the hashtags (default ``source.hashtags``).

    Raises ValueError (naming the setting) when a platform has no URL, which is the case for
    ``source.kind = "simulator"`` until the orchestration passes the URL of the simulator it started.
    """
    given = {"mastodon": instances, "bluesky": bluesky_services}
    configured = {"mastodon": cfg.source.instance_url, "bluesky": cfg.source.bluesky_url}
    setting = {"mastodon": "'instances' param or source.instance_url", "bluesky": "'bluesky_services' param or source.bluesky_url"}
    chosen = [p.strip().lower() for p in (platforms or cfg.source.platforms) if p and p.strip()]
    unknown = [p for p in chosen if p not in PLATFORMS]
    if unknown:
        raise ValueError(f"platform(s) {', '.join(map(repr, unknown))}: known are {', '.join(PLATFORMS)}")
    tags = [t.strip().lstrip("#").lower() for t in (hashtags or cfg.source.hashtags) if t and t.strip()]
    out = []
    for platform in chosen:
        urls = [u.strip() for u in (given[platform] or []) if u and u.strip()] or (
            [configured[platform]] if configured[platform] else [])
        if not urls:
            raise ValueError(f"no {platform} URL: source.kind = {cfg.source.kind!r} needs one, given as the "
                             f"{setting[platform]} (for the simulator: the URL of the server the orchestration started)")
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"{platform} URL {u!r}: expected an http(s) base URL")
        out += [{"source": platform, "instance": u.rstrip("/"), "hashtag": t, "max_posts": max_posts}
                for u in urls for t in tags]
    return out


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up per-pair scrape summaries (for a DAG run's log and XCom)."""
    out: dict[str, Any] = {"pairs": len(summaries), "seen": 0, "kept": 0, "images": 0, "retried": 0,
                           "skipped": Counter(), "downloads": Counter(), "opt_out_reasons": Counter(), "sources": {},
                           "stopped": {}}
    for s in summaries:
        for k in ("seen", "kept", "images", "retried"):
            out[k] += s.get(k, 0)
        per = out["sources"].setdefault(s.get("source", "mastodon"), {"seen": 0, "kept": 0})
        per["seen"] += s.get("seen", 0)
        per["kept"] += s.get("kept", 0)
        out["skipped"].update(s.get("skipped", {}))
        out["downloads"].update(s.get("downloads", {}))
        out["opt_out_reasons"].update(s.get("opt_out_reasons", {}))
        # Why each task's walk ended: a rate limit or a refused response (too large, too slow, a
        # next link off the instance) is named here, not only in that task's log.
        out["stopped"][f"{s.get('source', 'mastodon')} {s.get('instance', '')} #{s.get('hashtag', '')}"] = \
            s.get("stopped", "")
    out["skipped"], out["downloads"] = dict(out["skipped"]), dict(out["downloads"])
    out["opt_out_reasons"] = dict(out["opt_out_reasons"])
    return out

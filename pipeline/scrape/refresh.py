"""Engagement refresh: re-read the posts that have grown old enough for their likes to count.

Likes are still climbing for weeks after a post appears, so the labeling rule only uses counts
observed at ``labeling.min_age_days`` or later. A post scraped young has no such snapshot;
``refresh_engagement(cfg, logical_date)`` finds every post (all ``posts`` partitions) whose
newest ``engagement`` snapshot is younger than ``min_age_days`` while the post itself is now
at least that old, re-reads it through its platform's source (Mastodon: ``GET
/api/v1/statuses/:id``; Bluesky: ``getPosts`` by the at:// URIs the scrape kept in the crawl
state, :mod:`pipeline.core.post_refs`), with the same rate-limited, retrying client as the
scrape, and writes one snapshot per re-read post.

Where the snapshots go: partition ``engagement/dt=<date>-refresh/`` — a partition of its own,
so the refresh and the same day's scrape never rewrite one file at the same time. Like the
scrape, it is merged (key ``instance, post_id``, newest wins) in batches of :data:`BATCH`,
so a rerun of the same date, or one resumed after a crash, re-reads only posts still lacking
an old-enough snapshot and duplicates nothing.

"Now" is each service's clock, the ``Date`` header of one request (:meth:`Source.server_now`:
the simulator's world clock; a real service's wall clock). A deleted status (404/410) is
forgotten (:func:`pipeline.core.forget.forget`: every row, its images, a tombstone), and so
is every post of an author found opted out since (``discoverable``/``indexable`` false,
``noindex``); other failures are counted with their first error; the run fails only when an
instance had posts to refresh and not one of them could be read.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.config import Config
from pipeline.core.forget import forget, remove_tombstoned, salt_for
from pipeline.core.post_refs import load_refs
from pipeline.core.storage import open_storage
from pipeline.core.tables import list_partitions, read_table
from pipeline.scrape.http import HttpClient
from pipeline.scrape.scrape import logical_day, make_source, merge_partition
from pipeline.scrape.sources.base import OptedOut, Source, SourceError

log = logging.getLogger(__name__)

BATCH = 500


class RefreshError(RuntimeError):
    """No post of an instance could be re-read (the instance is down or refuses us)."""


def refresh_partition(day: str) -> str:
    return f"{day}-refresh"


Service = tuple[str, str]  # (platform, instance)


def service_name(platform: str, instance: str) -> str:
    """How the summary names a service: the instance for Mastodon (as before), else the
    platform too (the simulator serves both platforms from one host)."""
    return instance if platform == "mastodon" else f"{platform} {instance}"


def due_posts(posts: pa.Table, engagement: pa.Table, service_now: dict[Service, datetime],
              min_age_days: float) -> dict[Service, list[tuple[str, datetime]]]:
    """Per (platform, instance), the ``(post_id, created_at)`` of posts now >= ``min_age_days``
    old whose newest snapshot is younger than that."""
    best: dict[tuple[str, str], float] = {}
    if engagement.num_rows:
        grouped = engagement.group_by(["instance", "post_id"]).aggregate([("age_days", "max")])
        for inst, pid, age in zip(grouped["instance"].to_pylist(), grouped["post_id"].to_pylist(),
                                  grouped["age_days_max"].to_pylist(), strict=True):
            best[(inst, pid)] = age
    due: dict[Service, list[tuple[str, datetime]]] = {}
    seen: set[tuple[str, str]] = set()
    for platform, inst, pid, created in zip(posts["source"].to_pylist(), posts["instance"].to_pylist(),
                                            posts["post_id"].to_pylist(), posts["created_at"].to_pylist(), strict=True):
        service = (platform, inst)
        if (inst, pid) in seen or service not in service_now:
            continue
        seen.add((inst, pid))
        age_now = (service_now[service] - created).total_seconds() / 86400.0
        if age_now >= min_age_days and best.get((inst, pid), -1.0) < min_age_days:
            due.setdefault(service, []).append((pid, created))
    return due


def refresh_engagement(cfg: Config, logical_date: str | date | datetime, *, instance: str | None = None,
                       token: str | None = None, login: tuple[str, str] | None = None,
                       now: Callable[[], datetime] | None = None, progress: bool = False) -> dict[str, Any]:
    """Re-observe the posts due (see module doc); return a small summary."""
    t0 = time.monotonic()
    day = logical_day(logical_date)
    now = now or (lambda: datetime.now(UTC))
    storage = open_storage(cfg.storage)
    summary: dict[str, Any] = {"date": day, "partition": refresh_partition(day), "due": 0, "refreshed": 0,
                               "deleted": 0, "opted_out": 0, "failed": 0, "errors": [], "instances": {},
                               "forgotten": {}}
    deleted: set[tuple[str, str]] = set()
    opted_out: set[str] = set()
    if not list_partitions(storage, "posts"):
        summary["elapsed_s"] = round(time.monotonic() - t0, 2)
        return summary
    posts = read_table(storage, "posts", columns=["source", "instance", "post_id", "created_at"])
    if instance:
        posts = posts.filter(pc.equal(posts["instance"], instance.rstrip("/").lower()))
    engagement = (read_table(storage, "engagement", columns=["instance", "post_id", "age_days"])
                  if list_partitions(storage, "engagement") else pa.table({"instance": [], "post_id": [], "age_days": []}))

    salt = salt_for(cfg, sorted(set(posts["instance"].to_pylist())))
    client = HttpClient(cfg.scrape)
    sources: dict[Service, Source] = {}
    service_now: dict[Service, datetime] = {}
    try:
        for platform, inst in sorted(set(zip(posts["source"].to_pylist(), posts["instance"].to_pylist(), strict=True))):
            name = service_name(platform, inst)
            try:
                src = make_source(cfg, platform, inst, client, now=now, token=token, login=login)
                service_now[(platform, inst)] = src.server_now()
            except SourceError as exc:
                summary["errors"].append(f"{name}: unreachable ({exc})")
                summary["instances"][name] = "unreachable"
                continue
            sources[(platform, inst)] = src
        due = due_posts(posts, engagement, service_now, cfg.labeling.min_age_days)
        summary["due"] = sum(len(v) for v in due.values())

        from tqdm import tqdm
        bar = tqdm(total=summary["due"], unit="post", desc="refresh", disable=not progress, leave=False)
        for (platform, inst), items in due.items():
            name = service_name(platform, inst)
            src = sources[(platform, inst)]
            if platform != "mastodon":  # re-read by the references the scrape kept (Bluesky: at:// URIs)
                src.refs = load_refs(storage, platform, urlsplit(src.instance).netloc, [p for p, _ in items])
            created = dict(items)
            counts: Counter[str] = Counter()
            for i in range(0, len(items), BATCH):
                rows = []
                for pid, result in src.reobserve([p for p, _ in items[i:i + BATCH]]):
                    if isinstance(result, OptedOut):
                        counts["opted_out"] += 1
                        opted_out.add(result.author_key)
                        continue
                    if isinstance(result, str):
                        if result == "deleted":
                            counts["deleted"] += 1
                            deleted.add((src.instance, pid))
                        else:
                            counts["failed"] += 1
                            if len(summary["errors"]) < 5:
                                summary["errors"].append(result)
                        continue
                    counts["refreshed"] += 1
                    row = vars(result).copy()
                    row["age_days"] = (result.observed_at - created[pid]).total_seconds() / 86400.0
                    rows.append(row)
                if rows:
                    merge_partition(storage, "engagement", refresh_partition(day), rows)
                    written = pa.Table.from_pylist(rows).select(["instance", "post_id"])
                    remove_tombstoned(storage, salt, written.append_column(
                        "author_key", pa.nulls(written.num_rows, pa.string())))  # a forget meanwhile
                bar.update(min(BATCH, len(items) - i))
            for k in ("refreshed", "deleted", "opted_out", "failed"):
                summary[k] += counts[k]
            summary["instances"][name] = dict(counts)
            if counts["failed"] and not counts["refreshed"] and not counts["deleted"] and not counts["opted_out"]:
                raise RefreshError(f"{name}: none of {len(items)} due posts could be re-read; first error: "
                                   f"{summary['errors'][0] if summary['errors'] else '?'}")
        bar.close()
    finally:
        client.close()
    if deleted or opted_out:  # deletions and opt-outs at the source are applied here, everywhere
        summary["forgotten"] = forget(storage, salt, authors=opted_out, posts=deleted,
                                      reason="deleted or opted out at source")
    summary["elapsed_s"] = round(time.monotonic() - t0, 2)
    log.info("refresh %s: %d due, %d refreshed, %d deleted and %d opted out (forgotten), %d failed", day,
             summary["due"], summary["refreshed"], summary["deleted"], summary["opted_out"], summary["failed"])
    return summary

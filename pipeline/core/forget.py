"""Forgetting an author or a post: every row, every image nobody else posted, and a tombstone.

    report = forget(storage, authors={"3f9c..."}, posts={("https://mastodon.social", "1099")})

What goes, in this order (the ``posts`` rows last, so a run killed half-way and run again
still finds everything it has to remove):

1. a **tombstone** (:data:`pipeline.core.keys.TOMBSTONES`) recording the authors, posts and
   the image digests they reference, so a later scrape skips them and a later labels run
   excludes them, and a rerun after a crash can still clean those images;
2. their rows in every ``labels`` run; a run that had some loses its validation result and
   Data Docs (which quote sample values) and its report, and is unpublished if it was
   published: it must be labeled again before training (models already trained cannot
   unlearn, see README);
3. their rows in every model run's ``predictions`` file;
4. their ``downloads`` rows; then every image those referenced that no remaining download
   references: its bytes, its ``images`` index row and its ``faces`` rows;
5. their post references in the crawl state (:mod:`pipeline.core.post_refs`: a Bluesky
   post's ``at://`` URI, which names its author's DID);
6. their ``engagement`` snapshots;
7. their ``posts`` rows.

A post is named by ``(instance, post_id)``. ``downloads`` and ``labels`` have no instance
column; there a row goes when its ``post_id`` and its image URL or digest match a removed post.
Works on local storage and S3 alike (it only reads and rewrites whole partitions).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import keys, published
from pipeline.core.config import Config
from pipeline.core.post_refs import forget_refs
from pipeline.core.schemas import TABLES
from pipeline.core.storage import Storage
from pipeline.core.tables import get_json, list_partitions, put_json, read_table, write_partition

log = logging.getLogger(__name__)

PostRef = tuple[str, str]  # (instance, post_id)


@dataclass
class Tombstones:
    """Who and what was forgotten: a scrape skips them, a labels run excludes them."""

    authors: set[str] = field(default_factory=set)
    posts: set[PostRef] = field(default_factory=set)
    images: set[str] = field(default_factory=set)

    def covers(self, author_key: str, instance: str, post_id: str) -> bool:
        return author_key in self.authors or (instance, post_id) in self.posts

    def __bool__(self) -> bool:
        return bool(self.authors or self.posts)


def load_tombstones(storage: Storage) -> Tombstones:
    records = get_json(storage, keys.TOMBSTONES, default=None) or []
    out = Tombstones()
    for r in records:
        out.authors.update(r.get("authors", []))
        out.posts.update((i, p) for i, p in r.get("posts", []))
        out.images.update(r.get("images", []))
    return out


def _add_tombstone(storage: Storage, authors: set[str], posts: set[PostRef], images: set[str],
                   reason: str) -> set[str]:
    """Append a tombstone record; return the images of every record (earlier ones included, so
    a run killed before its images were cleaned gets them cleaned now)."""
    records = get_json(storage, keys.TOMBSTONES, default=None) or []
    records.append({"at": datetime.now(UTC).isoformat(timespec="seconds"), "reason": reason,
                    "authors": sorted(authors), "posts": sorted(list(p) for p in posts), "images": sorted(images)})
    put_json(storage, keys.TOMBSTONES, records)
    return {sha for r in records for sha in r.get("images", [])}


def forget(storage: Storage, *, authors: Iterable[str] = (), posts: Iterable[PostRef] = (),
           reason: str = "request") -> dict[str, Any]:
    """Remove ``authors`` (author keys) and ``posts`` everywhere; return what was removed."""
    authors = {a for a in authors if a}
    posts = {(i.rstrip("/").lower(), str(p)) for i, p in posts}
    if not authors and not posts:
        raise ValueError("forget: name an author key or a post")
    removed: dict[str, Any] = {"authors": len(authors), "posts": 0, "engagement": 0, "downloads": 0,
                               "images": 0, "image_bytes": 0, "faces": 0, "labels": 0, "predictions": 0,
                               "post_refs": 0, "labels_runs": [], "unpublished": None}

    # What the posts reference, read before anything is deleted.
    doomed = _matching_posts(storage, authors, posts)
    post_ids = {p for _, p in doomed["refs"]}
    urls = doomed["urls"]
    shas = _download_shas(storage, post_ids, urls)
    tombstoned_images = _add_tombstone(storage, authors, posts | doomed["refs"], shas, reason)

    removed.update(_forget_labels(storage, authors, post_ids, shas))
    removed["predictions"] = _forget_predictions(storage, removed.pop("label_post_ids"))
    removed["downloads"] = _rewrite(storage, "downloads", lambda t: pc.and_(rows_with_value(t, "post_id", post_ids), rows_with_value(t, "url", urls)))
    orphans = _unreferenced(storage, tombstoned_images)
    removed["faces"] = _rewrite(storage, "faces", lambda t: rows_with_value(t, "sha256", orphans))
    removed["images"] = _rewrite(storage, "images", lambda t: rows_with_value(t, "sha256", orphans))
    for sha in sorted(orphans):
        if storage.exists(keys.image_bytes(sha)):
            storage.delete(keys.image_bytes(sha))
            removed["image_bytes"] += 1
    refs = posts | doomed["refs"]
    # The crawl state's post references (Bluesky at:// URIs name the author's DID).
    removed["post_refs"] = forget_refs(storage, authors, post_ids | {p for _, p in posts})
    removed["engagement"] = _rewrite(storage, "engagement", lambda t: rows_with_post_ref(t, refs))
    removed["posts"] = _rewrite(storage, "posts", lambda t: pc.or_(rows_with_value(t, "author_key", authors), rows_with_post_ref(t, refs)))
    log.info("forgot %s", removed)
    return removed


def forget_request(cfg: Config, *, account: str = "", author_key: str = "", instance: str = "",
                   post_id: str = "", reason: str = "request") -> dict[str, Any]:
    """``likerank forget`` and the ``forget`` DAG: an account URL/URI (hashed with the configured
    pseudonym key), an author key, or a post (instance + id)."""
    from pipeline.core.pseudonym import author_keyer
    from pipeline.core.storage import open_storage

    if bool(instance) != bool(post_id):
        raise ValueError("forget: a post is named by both its instance URL and its post id")
    authors = {author_key} if author_key else set()
    if account:
        authors.add(author_keyer(cfg.source.author_key_secret_env, required=cfg.source.kind != "simulator")(account))
    return forget(open_storage(cfg.storage), authors=authors, posts={(instance, post_id)} if post_id else set(),
                  reason=reason)


# --------------------------------------------------------------------------- steps


def _matching_posts(storage: Storage, authors: set[str], posts: set[PostRef]) -> dict[str, Any]:
    refs: set[PostRef] = set()
    urls: set[str] = set()
    if list_partitions(storage, "posts"):
        t = read_table(storage, "posts", columns=["instance", "post_id", "author_key", "image_urls"])
        hit = t.filter(pc.or_(rows_with_value(t, "author_key", authors), rows_with_post_ref(t, posts)))
        refs = set(zip(hit["instance"].to_pylist(), hit["post_id"].to_pylist(), strict=True))
        urls = {u for us in hit["image_urls"].to_pylist() for u in us or []}
    return {"refs": refs, "urls": urls}


def _download_shas(storage: Storage, post_ids: set[str], urls: set[str]) -> set[str]:
    if not post_ids or not list_partitions(storage, "downloads"):
        return set()
    t = read_table(storage, "downloads", columns=["post_id", "url", "sha256"])
    hit = t.filter(pc.and_(rows_with_value(t, "post_id", post_ids), rows_with_value(t, "url", urls)))
    return {s for s in hit["sha256"].to_pylist() if s}


def _unreferenced(storage: Storage, shas: set[str]) -> set[str]:
    """Those of ``shas`` no remaining ``downloads`` row points at (other posts keep theirs)."""
    if not shas:
        return set()
    if not list_partitions(storage, "downloads"):
        return set(shas)
    t = read_table(storage, "downloads", columns=["sha256"])
    return shas - set(t.filter(rows_with_value(t, "sha256", shas))["sha256"].to_pylist())


def _forget_labels(storage: Storage, authors: set[str], post_ids: set[str], shas: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"labels": 0, "labels_runs": [], "unpublished": None, "label_post_ids": set()}
    for run in list_partitions(storage, "labels"):
        t = read_table(storage, "labels", [run]).drop_columns([TABLES["labels"].partition])
        drop = pc.or_(rows_with_value(t, "author_key", authors), pc.and_(rows_with_value(t, "post_id", post_ids), rows_with_value(t, "image_sha256", shas)))
        n = pc.sum(drop).as_py() or 0
        if not n:
            continue
        out["label_post_ids"] |= set(t.filter(drop)["post_id"].to_pylist())
        if published.unpublish(storage, run):  # first: training must never read a run nobody validated
            out["unpublished"] = run
        write_partition(storage, "labels", run, t.filter(pc.invert(drop)))
        storage.delete_prefix(keys.validation_run(run) + "/")  # its result and Data Docs quote rows
        storage.delete_prefix(keys.report_run(run) + "/")  # thumbnails of the photos (local reports)
        out["labels"] += n
        out["labels_runs"].append(run)
    return out


def _forget_predictions(storage: Storage, post_ids: set[str]) -> int:
    import io

    import pyarrow.parquet as pq

    if not post_ids:
        return 0
    n = 0
    for key in storage.list("models/"):
        if not key.endswith("/predictions.parquet"):
            continue
        t = pq.read_table(io.BytesIO(storage.get_bytes(key)))
        drop = rows_with_value(t, "post_id", post_ids)
        k = pc.sum(drop).as_py() or 0
        if k:
            buf = io.BytesIO()
            pq.write_table(t.filter(pc.invert(drop)), buf)
            storage.put_bytes(key, buf.getvalue())
            n += k
    return n


def _rewrite(storage: Storage, table: str, drop_mask) -> int:
    """Rewrite every partition of ``table`` without the rows ``drop_mask(t)`` marks; count them."""
    n = 0
    part = TABLES[table].partition
    for value in list_partitions(storage, table):
        t = read_table(storage, table, [value]).drop_columns([part])
        drop = drop_mask(t)
        k = pc.sum(drop).as_py() or 0
        if k:
            write_partition(storage, table, value, t.filter(pc.invert(drop)))
            n += k
    return n


def tombstoned(t: pa.Table, tomb: Tombstones) -> pa.ChunkedArray:
    """True for the rows of ``t`` (columns author_key, instance, post_id) a tombstone covers."""
    return pc.or_(rows_with_value(t, "author_key", tomb.authors), rows_with_post_ref(t, tomb.posts))


def rows_with_value(t: pa.Table, column: str, values: set[str]) -> pa.ChunkedArray:
    """True for the rows of ``t`` whose ``column`` is one of ``values`` (null: False)."""
    if not values:
        return pa.chunked_array([pa.array([False] * t.num_rows)])
    return pc.fill_null(pc.is_in(t[column], value_set=pa.array(sorted(values), pa.string())), False)


def rows_with_post_ref(t: pa.Table, refs: set[PostRef]) -> pa.ChunkedArray:
    """True for the rows of ``t`` whose (instance, post_id) is one of ``refs``."""
    joined = pc.binary_join_element_wise(t["instance"], t["post_id"], "\n")
    return rows_with_value(pa.table({"k": joined}), "k", {f"{i}\n{p}" for i, p in refs})

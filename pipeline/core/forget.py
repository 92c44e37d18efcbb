"""Forgetting authors or posts: every row, every image nobody else posted, and a tombstone.

    report = forget(storage, salt, authors={"3f9c..."}, posts={("https://mastodon.social", "1099")})

What goes, in this order:

1. a **tombstone** first (the ``tombstones`` table, :data:`pipeline.core.schemas.TOMBSTONES`):
   salted hashes of the authors and posts, never the identifiers, and the image digests they
   referenced. A scrape skips what it covers, a labels run excludes it, and a writer that
   commits while this forget runs removes what it covers right after its commit (see below);
2. their rows in every ``labels`` run; a run that had some loses its validation result and
   Data Docs (which quote sample values) and every recorded copy of its report
   (:mod:`pipeline.core.report_files`), and is unpublished if it was
   published: it must be labeled again before training (models already trained cannot
   unlearn, see README);
3. their rows in every model run's ``predictions`` file;
4. their ``downloads`` rows; then every image those referenced that no remaining download
   references: its bytes, its ``images`` index row and its ``faces`` rows;
5. their post references (``post_refs``: a Bluesky post's ``at://`` URI names its author's DID);
6. their ``engagement`` snapshots and their ``posts`` rows;
7. the old files: every table it changed is vacuumed at once (zero retention) and
   checkpointed, so no byte of the removed rows stays on disk or in S3. Earlier versions of
   those tables can no longer be read (time travel ends at the forget). In a versioned S3
   bucket the old versions and delete markers of everything removed or rewritten are deleted
   too (:mod:`pipeline.core.bucket_versions`, checked before step 1: it may refuse to start).

:func:`forget_plan` counts the same without writing anything (``--dry-run``). ``matched`` in
either result says whether anything stored was theirs. Accounts are resolved to the
identifiers the sources hash before they get here (:mod:`pipeline.scrape.resolve_account`);
the ``forget`` DAG runs a request queued under an opaque id (:func:`queue_forget_request`).

Each table loses its rows in **one MERGE-delete** for the whole request, however many authors
and posts it names (never ``DELETE WHERE author_key = '...'``, which would write the key into
the transaction log). A post is named by ``(instance, post_id)``; ``downloads`` and ``labels``
have no instance column, so there a row goes when its ``post_id`` and its image URL or digest
match a removed post.

**Concurrent writers.** The tombstone is committed before the rows are looked for. A writer
whose commit lands before that lookup has its rows found and removed here; one whose commit
lands after it reads the tombstone after its commit (:func:`remove_tombstoned`) and removes
them itself. Either way a forgotten person cannot come back.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import keys, published
from pipeline.core.bucket_versions import BucketVersions
from pipeline.core.config import Config
from pipeline.core.crawl_state import without_ids
from pipeline.core.data_docs import refresh_index
from pipeline.core.pseudonym import tombstone_hash
from pipeline.core.report_files import forget_reports, forget_stale_reports_here
from pipeline.core.schemas import INTERNAL_TABLES, TABLES
from pipeline.core.storage import Storage
from pipeline.core.tables import (
    delete_rows,
    get_json,
    list_partitions,
    merge_rows,
    put_json,
    read_table,
    vacuum_now,
)

log = logging.getLogger(__name__)

PostRef = tuple[str, str]  # (instance, post_id)


@dataclass
class Tombstones:
    """Who and what was forgotten, as salted hashes: a scrape skips them, a labels run excludes them."""

    salt: str
    author_hashes: set[str] = field(default_factory=set)
    post_hashes: set[str] = field(default_factory=set)
    images: set[str] = field(default_factory=set)

    def covers_author(self, author_key: str) -> bool:
        return tombstone_hash(self.salt, author_key) in self.author_hashes

    def covers_post(self, instance: str, post_id: str) -> bool:
        return tombstone_hash(self.salt, instance, post_id) in self.post_hashes

    def covers(self, author_key: str, instance: str, post_id: str) -> bool:
        return self.covers_author(author_key) or self.covers_post(instance, post_id)

    def mask(self, t: pa.Table) -> pa.ChunkedArray:
        """True for the rows of ``t`` (columns author_key, instance, post_id) a tombstone covers;
        hashed in DuckDB, so a large table costs one vectorized pass."""
        import duckdb

        if not self or not t.num_rows:
            return pa.chunked_array([pa.array([False] * t.num_rows, pa.bool_())])
        con = duckdb.connect()
        try:
            con.register("t", t.select(["author_key", "instance", "post_id"]))
            con.register("authors", pa.table({"h": sorted(self.author_hashes)}, schema=pa.schema([("h", pa.string())])))
            con.register("posts", pa.table({"h": sorted(self.post_hashes)}, schema=pa.schema([("h", pa.string())])))
            out = con.sql("""select coalesce(sha256($salt || chr(10) || author_key) in (select h from authors)
                                    or sha256($salt || chr(10) || instance || chr(10) || post_id)
                                       in (select h from posts), false) as hit
                             from t""", params={"salt": self.salt}).to_arrow_table()
        finally:
            con.close()
        return out.column("hit")

    def __bool__(self) -> bool:
        return bool(self.author_hashes or self.post_hashes)


def salt_for(cfg: Config, targets: Iterable[str] | None = None) -> str:
    """The tombstone salt of this deployment.

    A run against servers (``targets``: scrape, refresh) refuses without the real key unless
    every one is a simulator this process tree started (:func:`~pipeline.core.pseudonym.key_required`).
    Steps that talk to no server (labeling, migration) only look tombstones up, so the
    configured ``source.kind`` decides for them.
    """
    from pipeline.core.pseudonym import key_required, tombstone_salt

    if targets is None:
        return tombstone_salt(cfg.source.author_key_secret_env, required=cfg.source.kind != "simulator")
    targets = list(targets)
    return tombstone_salt(cfg.source.author_key_secret_env, required=key_required(targets),
                          target=f"the accounts of {', '.join(targets) or 'no server'}")


def load_tombstones(storage: Storage, salt: str) -> Tombstones:
    out = Tombstones(salt)
    t = read_table(storage, "tombstones", columns=["kind", "key_hash", "images"])
    for kind, key_hash, images in zip(t["kind"].to_pylist(), t["key_hash"].to_pylist(), t["images"].to_pylist(),
                                      strict=True):
        (out.author_hashes if kind == "author" else out.post_hashes).add(key_hash)
        out.images.update(images or [])
    return out


def _add_tombstones(storage: Storage, salt: str, authors: set[str], posts: set[PostRef],
                    images: dict[str, set[str]], reason: str) -> None:
    """Commit one tombstone row per author and post, with the image digests of each post
    (``images``: post_id -> digests); a rerun merges, never duplicates."""
    now = datetime.now(UTC)
    rows = [{"kind": "author", "key_hash": tombstone_hash(salt, a), "images": [], "reason": reason,
             "forgotten_at": now} for a in sorted(authors)]
    rows += [{"kind": "post", "key_hash": tombstone_hash(salt, i, p), "images": sorted(images.get(p, ())), "reason": reason,
              "forgotten_at": now} for i, p in sorted(posts)]
    if rows:
        merge_rows(storage, "tombstones", pa.Table.from_pylist(rows), operation=f"tombstone ({reason})")


#: The tables a forget removes rows from, and vacuums.
CHANGED_TABLES = ("labels", "downloads", "faces", "images", "post_refs", "engagement", "posts")
#: The counts that say whether a request matched anything stored.
ROW_COUNTS = ("posts", "engagement", "downloads", "images", "image_bytes", "faces", "labels", "predictions",
              "post_refs")


@dataclass
class _Found:
    """What a request names, found in the tables: its posts and their images."""

    refs: set[PostRef]  # (instance, post_id) of every post removed, the named ones included
    urls: set[str]  # their image URLs
    shas_by_post: dict[str, set[str]]  # post_id -> digests of its downloaded images

    @property
    def post_ids(self) -> set[str]:
        return {p for _, p in self.refs}

    @property
    def shas(self) -> set[str]:
        return {sha for found in self.shas_by_post.values() for sha in found}


def _find(storage: Storage, authors: set[str], posts: set[PostRef]) -> _Found:
    doomed = _matching_posts(storage, authors, posts)
    refs = posts | doomed["refs"]
    return _Found(refs, doomed["urls"], _download_shas(storage, {p for _, p in refs}, doomed["urls"]))


def _normalized(authors: Iterable[str], posts: Iterable[PostRef]) -> tuple[set[str], set[PostRef]]:
    authors = {a for a in authors if a}
    posts = {(i.rstrip("/").lower(), str(p)) for i, p in posts}
    if not authors and not posts:
        raise ValueError("forget: name an author key or a post")
    return authors, posts


def _already_tombstoned(storage: Storage, salt: str, authors: set[str], posts: set[PostRef]) -> bool:
    """Whether an earlier forget covered every author and post named."""
    tomb = load_tombstones(storage, salt)
    return all(tomb.covers_author(a) for a in authors) and all(tomb.covers_post(i, p) for i, p in posts)


def forget(storage: Storage, salt: str, *, authors: Iterable[str] = (), posts: Iterable[PostRef] = (),
           reason: str = "request", vacuum: bool = True) -> dict[str, Any]:
    """Remove ``authors`` (author keys) and ``posts`` everywhere; return what was removed.

    ``matched`` in the result says whether any stored row or file was theirs. The tombstone is
    written either way: a person named correctly but not (yet) collected is kept out of later
    scrapes too."""
    authors, posts = _normalized(authors, posts)
    versions = BucketVersions.detect(storage) if vacuum else None  # before anything changes: it may refuse
    removed: dict[str, Any] = {"authors": len(authors), "posts": 0, "engagement": 0, "downloads": 0,
                               "images": 0, "image_bytes": 0, "faces": 0, "labels": 0, "predictions": 0,
                               "post_refs": 0, "labels_runs": [], "unpublished": None, "vacuumed_files": 0,
                               "reports": _no_reports(), "old_versions": 0,
                               "already_tombstoned": _already_tombstoned(storage, salt, authors, posts)}
    _add_tombstones(storage, salt, authors, posts, {}, reason)  # first: see "Concurrent writers"

    found = _find(storage, authors, posts)
    _add_tombstones(storage, salt, set(), found.refs, found.shas_by_post, reason)  # the author's posts and images too
    tombstoned_images = load_tombstones(storage, salt).images  # earlier requests' too: a killed run's get cleaned

    removed.update(_forget_labels(storage, authors, found.post_ids, found.shas))
    label_post_ids = removed.pop("label_post_ids")
    removed["predictions"], rewritten = _forget_predictions(storage, label_post_ids)
    removed["downloads"] = _delete_where(storage, "downloads", _downloads_of(storage, found.post_ids, found.urls))
    orphans = _unreferenced(storage, tombstoned_images)
    sha_rows = pa.table({"sha256": pa.array(sorted(orphans), pa.string())})
    removed["faces"] = delete_rows(storage, "faces", sha_rows)
    removed["images"] = delete_rows(storage, "images", sha_rows)
    deleted_bytes = []
    for sha in sorted(orphans):
        if storage.exists(keys.image_bytes(sha)):
            storage.delete(keys.image_bytes(sha))
            deleted_bytes.append(keys.image_bytes(sha))
    removed["image_bytes"] = len(deleted_bytes)
    removed["post_refs"] = (delete_rows(storage, "post_refs", _column("author_key", authors))
                            + delete_rows(storage, "post_refs", _column("post_id", found.post_ids)))
    ref_rows = _ref_rows(found.refs)
    removed["engagement"] = delete_rows(storage, "engagement", ref_rows)
    removed["posts"] = delete_rows(storage, "posts", ref_rows)
    removed["crawl_states"], changed_states = _forget_crawl_ids(storage, found.post_ids)
    if vacuum:
        for table in CHANGED_TABLES:
            removed["vacuumed_files"] += vacuum_now(storage, table)
    if versions is not None:
        runs = removed["labels_runs"]
        removed["old_versions"] = versions.purge(
            [{**TABLES, **INTERNAL_TABLES}[t].path + "/" for t in CHANGED_TABLES] + deleted_bytes + rewritten + changed_states
            + [keys.validation_run(r) + "/" for r in runs] + [keys.report_run(r) + "/" for r in runs])
    removed["matched"] = any(removed[k] for k in ROW_COUNTS)
    log.info("forgot %s", removed)
    return removed


def forget_plan(storage: Storage, salt: str, *, authors: Iterable[str] = (),
                posts: Iterable[PostRef] = ()) -> dict[str, Any]:
    """What :func:`forget` would remove, counted the same way; nothing is written (``--dry-run``)."""
    authors, posts = _normalized(authors, posts)
    found = _find(storage, authors, posts)
    post_ids, ref_rows = found.post_ids, _ref_rows(found.refs)
    plan: dict[str, Any] = {"authors": len(authors), "labels_runs": [], "unpublished": None,
                            "already_tombstoned": _already_tombstoned(storage, salt, authors, posts)}
    posts_t = read_table(storage, "posts", columns=["instance", "post_id"])
    plan["posts"] = _count(rows_with_post_ref(posts_t, found.refs))
    eng = read_table(storage, "engagement", columns=["instance", "post_id"])
    plan["engagement"] = _count(rows_with_post_ref(eng, found.refs)) if ref_rows.num_rows else 0
    downloads = read_table(storage, "downloads", columns=["post_id", "url", "sha256"])
    doomed = pc.and_(rows_with_value(downloads, "post_id", post_ids), rows_with_value(downloads, "url", found.urls))
    plan["downloads"] = _count(doomed)
    kept_shas = set(downloads.filter(pc.invert(doomed))["sha256"].to_pylist())
    orphans = {sha for sha in found.shas if sha not in kept_shas}
    plan["faces"] = _count_in(storage, "faces", "sha256", orphans)
    plan["images"] = _count_in(storage, "images", "sha256", orphans)
    plan["image_bytes"] = sum(storage.exists(keys.image_bytes(sha)) for sha in orphans)
    refs_t = read_table(storage, "post_refs", columns=["author_key", "post_id"])
    plan["post_refs"] = _count(pc.or_(rows_with_value(refs_t, "author_key", authors),
                                      rows_with_value(refs_t, "post_id", post_ids)))
    labels = _label_hits(storage, authors, post_ids, found.shas)
    plan["labels"] = labels.num_rows
    plan["labels_runs"] = runs = sorted(set(labels["run"].to_pylist()))
    published_run = published.published_run_id(storage)
    plan["unpublished"] = published_run if published_run in runs else None
    plan["predictions"] = _forget_predictions(storage, set(labels["post_id"].to_pylist()), dry_run=True)[0]
    plan["crawl_states"] = _forget_crawl_ids(storage, post_ids, dry_run=True)[0]
    plan["reports"] = _no_reports()
    for run in runs:
        _add_reports(plan["reports"], forget_reports(storage, run, dry_run=True))
    plan["matched"] = any(plan[k] for k in ROW_COUNTS)
    return plan


def remove_tombstoned(storage: Storage, salt: str, rows: pa.Table) -> set[PostRef]:
    """After a writer's commit: forget those of the just-written ``rows`` (columns author_key,
    instance, post_id) that a tombstone covers, i.e. a forget that ran while the writer was
    committing; return them (usually none: one small table read)."""
    tomb = load_tombstones(storage, salt)
    if not tomb or not rows.num_rows:
        return set()
    hit = rows.filter(tomb.mask(rows))
    if not hit.num_rows:
        return set()
    refs = set(zip(hit["instance"].to_pylist(), hit["post_id"].to_pylist(), strict=True))
    log.warning("%d just-written post(s) were forgotten meanwhile: removing them again", len(refs))
    forget(storage, salt, posts=refs, reason="forgotten while being written")
    return refs


def author_keys(cfg: Config, storage: Storage, account_ids: Iterable[str]) -> set[str]:
    """The author keys of resolved account identifiers (Mastodon account URIs, Bluesky DIDs),
    as the sources compute them (see :mod:`pipeline.scrape.resolve_account` for resolving)."""
    from pipeline.core.pseudonym import author_keyer

    required, target = _forget_key_required(storage)
    keyer = author_keyer(cfg.source.author_key_secret_env, required=required, target=target)
    return {keyer(i) for i in account_ids if i}


def forget_salt(cfg: Config, storage: Storage) -> str:
    """The tombstone salt for a forget: the real key's unless every stored post came from a
    simulator on loopback (:func:`~pipeline.core.pseudonym.stored_key_required`)."""
    from pipeline.core.pseudonym import tombstone_salt

    required, target = _forget_key_required(storage)
    return tombstone_salt(cfg.source.author_key_secret_env, required=required, target=target)


def _forget_key_required(storage: Storage) -> tuple[bool, str]:
    """Decided by where the stored posts came from, never by ``source.kind``."""
    from pipeline.core.pseudonym import stored_key_required

    instances = (sorted(set(read_table(storage, "posts", columns=["instance"])["instance"].to_pylist()))
                 if list_partitions(storage, "posts") else [])
    shown = ", ".join(instances[:3]) + (", ..." if len(instances) > 3 else "")
    return stored_key_required(instances), f"the accounts stored from {shown or 'no instance yet'}"


def forget_request(cfg: Config, *, account_ids: Iterable[str] = (), author_key: str = "", instance: str = "",
                   post_id: str = "", reason: str = "request", dry_run: bool = False) -> dict[str, Any]:
    """``likerank forget``: resolved account identifiers (hashed with the configured pseudonym
    key), an author key, or a post (instance + id). ``dry_run``: count, change nothing."""
    from pipeline.core.storage import open_storage

    storage = open_storage(cfg.storage)
    authors, posts = _request_targets(cfg, storage, account_ids, author_key, instance, post_id)
    if dry_run:
        return forget_plan(storage, forget_salt(cfg, storage), authors=authors, posts=posts)
    return forget(storage, forget_salt(cfg, storage), authors=authors, posts=posts, reason=reason)


def _request_targets(cfg: Config, storage: Storage, account_ids: Iterable[str], author_key: str, instance: str,
                     post_id: str) -> tuple[set[str], set[PostRef]]:
    if bool(instance) != bool(post_id):
        raise ValueError("forget: a post is named by both its instance URL and its post id")
    authors = author_keys(cfg, storage, account_ids) | ({author_key} if author_key else set())
    return authors, ({(instance, post_id)} if post_id else set())


# --------------------------------------------------------------------------- queued requests (the DAG)


def queue_forget_request(cfg: Config, *, account_ids: Iterable[str] = (), author_key: str = "",
                         instance: str = "", post_id: str = "") -> str:
    """Store a forget request for the ``forget`` DAG under a random id and return the id.

    The request holds author keys and post references, never the account as typed; the DAG's
    conf carries only the id, so nothing naming the person reaches Airflow's database or
    logs. :func:`run_forget_request` deletes the request once it has run."""
    import secrets

    from pipeline.core.storage import open_storage

    storage = open_storage(cfg.storage)
    authors, posts = _request_targets(cfg, storage, account_ids, author_key, instance, post_id)
    _normalized(authors, posts)  # refuse an empty request now, not in the DAG
    request_id = secrets.token_hex(16)
    put_json(storage, keys.forget_request(request_id),
             {"authors": sorted(authors), "posts": sorted(posts), "queued_at": datetime.now(UTC).isoformat()})
    return request_id


def run_forget_request(cfg: Config, request_id: str, *, reason: str = "forget DAG") -> dict[str, Any]:
    """Run a queued request (the ``forget`` DAG's task), then delete it; return the counts only.

    Raises ValueError for an unknown id, and RuntimeError after forgetting when a copy of a
    report could not be reached from here (the counts say which), so the run is not green."""
    from pipeline.core.storage import open_storage

    if not request_id or not all(c in "0123456789abcdef" for c in request_id):
        raise ValueError(f"forget request id {request_id!r}: expected the hex id `likerank forget --queue` printed")
    storage = open_storage(cfg.storage)
    key = keys.forget_request(request_id)
    request = get_json(storage, key)
    if request is None:
        raise ValueError(f"no forget request {request_id} at {storage.uri(key)} (already run, or never queued)")
    removed = forget(storage, forget_salt(cfg, storage), authors=request.get("authors", []),
                     posts=[tuple(p) for p in request.get("posts", [])], reason=reason)
    storage.delete(key)
    versions = BucketVersions.detect(storage)
    if versions is not None:
        versions.purge([key])  # the request named author keys: no old version of it either
    if removed["reports"]["unreachable"]:
        raise RuntimeError("forgot, but these report copies are on other hosts and still show the person: "
                           + ", ".join(removed["reports"]["unreachable"])
                           + "; any `likerank forget` run on those hosts deletes them, or delete those folders")
    return removed


# --------------------------------------------------------------------------- steps


def _column(name: str, values: set[str]) -> pa.Table:
    return pa.table({name: pa.array(sorted(values), pa.string())})


def _delete_where(storage: Storage, table: str, rows: pa.Table) -> int:
    return delete_rows(storage, table, rows) if rows.num_rows else 0


def _matching_posts(storage: Storage, authors: set[str], posts: set[PostRef]) -> dict[str, Any]:
    t = read_table(storage, "posts", columns=["instance", "post_id", "author_key", "image_urls"])
    hit = t.filter(pc.or_(rows_with_value(t, "author_key", authors), rows_with_post_ref(t, posts)))
    refs = set(zip(hit["instance"].to_pylist(), hit["post_id"].to_pylist(), strict=True))
    urls = {u for us in hit["image_urls"].to_pylist() for u in us or []}
    return {"refs": refs, "urls": urls}


def _downloads_of(storage: Storage, post_ids: set[str], urls: set[str]) -> pa.Table:
    """The ``downloads`` keys (post_id, url) of the removed posts' images."""
    t = read_table(storage, "downloads", columns=["post_id", "url"])
    return t.filter(pc.and_(rows_with_value(t, "post_id", post_ids), rows_with_value(t, "url", urls)))


def _download_shas(storage: Storage, post_ids: set[str], urls: set[str]) -> dict[str, set[str]]:
    """post_id -> the digests of its downloaded images."""
    out: dict[str, set[str]] = {}
    if not post_ids:
        return out
    t = read_table(storage, "downloads", columns=["post_id", "url", "sha256"])
    hit = t.filter(pc.and_(rows_with_value(t, "post_id", post_ids), rows_with_value(t, "url", urls)))
    for post_id, sha in zip(hit["post_id"].to_pylist(), hit["sha256"].to_pylist(), strict=True):
        if sha:
            out.setdefault(post_id, set()).add(sha)
    return out


def _unreferenced(storage: Storage, shas: set[str]) -> set[str]:
    """Those of ``shas`` no remaining ``downloads`` row points at (other posts keep theirs)."""
    if not shas:
        return set()
    t = read_table(storage, "downloads", columns=["sha256"])
    return shas - set(t.filter(rows_with_value(t, "sha256", shas))["sha256"].to_pylist())


def _label_hits(storage: Storage, authors: set[str], post_ids: set[str], shas: set[str]) -> pa.Table:
    """The ``labels`` rows (run, post_id) of the authors, or of the posts with those images."""
    t = read_table(storage, "labels", columns=["run", "post_id", "author_key", "image_sha256"])
    drop = pc.or_(rows_with_value(t, "author_key", authors),
                  pc.and_(rows_with_value(t, "post_id", post_ids), rows_with_value(t, "image_sha256", shas)))
    return t.filter(drop).select(["run", "post_id"])


def _forget_labels(storage: Storage, authors: set[str], post_ids: set[str], shas: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"labels": 0, "labels_runs": [], "unpublished": None, "label_post_ids": set(),
                           "reports": _no_reports()}
    hit = _label_hits(storage, authors, post_ids, shas)
    if hit.num_rows:
        runs = sorted(set(hit["run"].to_pylist()))
        for run in runs:
            if published.unpublish(storage, run):  # first: training must never read a run nobody validated
                out["unpublished"] = run
        out["labels"] = delete_rows(storage, "labels", hit)
        for run in runs:
            storage.delete_prefix(keys.validation_run(run) + "/")  # its result and Data Docs quote rows
            _add_reports(out["reports"], forget_reports(storage, run))  # thumbnails: every recorded copy
        if storage.exists(keys.validation_index()):
            refresh_index(storage)  # the Data Docs index lists only runs that still have a result
        out["label_post_ids"] = set(hit["post_id"].to_pylist())
        out["labels_runs"] = runs
    _add_reports(out["reports"], forget_stale_reports_here(storage))  # an earlier forget could not reach these
    return out


def _no_reports() -> dict[str, Any]:
    return {"deleted": [], "files": 0, "thumbnails": 0, "unreachable": []}


def _add_reports(total: dict[str, Any], more: dict[str, Any]) -> None:
    for k in ("deleted", "unreachable"):
        total[k] += more[k]
    for k in ("files", "thumbnails"):
        total[k] += more[k]


def _forget_crawl_ids(storage: Storage, post_ids: set[str], *, dry_run: bool = False) -> tuple[int, list[str]]:
    """Move crawl-state interval ends off the forgotten post ids; return the states changed and their keys."""
    changed = []
    for key in storage.list(keys.crawl_states()):
        if not key.endswith(".json") or not post_ids:
            continue
        state = get_json(storage, key) or {}
        intervals = state.get("intervals", [])
        scrubbed = without_ids(intervals, post_ids)
        if scrubbed != intervals:
            if not dry_run:
                put_json(storage, key, {**state, "intervals": scrubbed})
            changed.append(key)
    return len(changed), changed


def _forget_predictions(storage: Storage, post_ids: set[str], *, dry_run: bool = False) -> tuple[int, list[str]]:
    """Drop the posts' rows from every model's predictions; return the rows and the files rewritten."""
    import pyarrow.parquet as pq

    if not post_ids:
        return 0, []
    n, rewritten = 0, []
    for key in storage.list("models/"):
        if not key.endswith("/predictions.parquet"):
            continue
        t = pq.read_table(io.BytesIO(storage.get_bytes(key)))
        drop = rows_with_value(t, "post_id", post_ids)
        k = pc.sum(drop).as_py() or 0
        if k:
            if not dry_run:
                buf = io.BytesIO()
                pq.write_table(t.filter(pc.invert(drop)), buf)
                storage.put_bytes(key, buf.getvalue())
            n += k
            rewritten.append(key)
    return n, rewritten


def _ref_rows(refs: set[PostRef]) -> pa.Table:
    return pa.table({"instance": pa.array([i for i, _ in sorted(refs)], pa.string()),
                     "post_id": pa.array([p for _, p in sorted(refs)], pa.string())})


def _count(mask: pa.ChunkedArray) -> int:
    return int(pc.sum(mask).as_py() or 0)


def _count_in(storage: Storage, table: str, column: str, values: set[str]) -> int:
    if not values:
        return 0
    return _count(rows_with_value(read_table(storage, table, columns=[column]), column, values))


def rows_with_value(t: pa.Table, column: str, values: set[str]) -> pa.ChunkedArray:
    """True for the rows of ``t`` whose ``column`` is one of ``values`` (null: False)."""
    if not values:
        return pa.chunked_array([pa.array([False] * t.num_rows, pa.bool_())])
    return pc.fill_null(pc.is_in(t[column], value_set=pa.array(sorted(values), pa.string())), False)


def rows_with_post_ref(t: pa.Table, refs: set[PostRef]) -> pa.ChunkedArray:
    """True for the rows of ``t`` whose (instance, post_id) is one of ``refs``."""
    joined = pc.binary_join_element_wise(t["instance"], t["post_id"], "\n")
    return rows_with_value(pa.table({"k": joined}), "k", {f"{i}\n{p}" for i, p in refs})

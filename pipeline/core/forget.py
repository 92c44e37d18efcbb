"""Forgetting authors or posts: every row, every image nobody else posted, and a tombstone.

    report = forget(storage, salt, authors={"3f9c..."}, posts={("https://mastodon.social", "1099")})

What goes, in this order:

1. a **tombstone** first (the ``tombstones`` table, :data:`pipeline.core.schemas.TOMBSTONES`):
   salted hashes of the authors and posts, never the identifiers, and the image digests they
   referenced. A scrape skips what it covers, a labels run excludes it, and a writer that
   commits while this forget runs removes what it covers right after its commit (see below);
2. their rows in every ``labels`` run; a run that had some loses its validation result and
   Data Docs (which quote sample values) and its report, and is unpublished if it was
   published: it must be labeled again before training (models already trained cannot
   unlearn, see README);
3. their rows in every model run's ``predictions`` file;
4. their ``downloads`` rows; then every image those referenced that no remaining download
   references: its bytes, its ``images`` index row and its ``faces`` rows;
5. their post references (``post_refs``: a Bluesky post's ``at://`` URI names its author's DID);
6. their ``engagement`` snapshots and their ``posts`` rows;
7. the old files: every table it changed is vacuumed at once (zero retention) and
   checkpointed, so no byte of the removed rows stays on disk or in S3. Earlier versions of
   those tables can no longer be read (time travel ends at the forget).

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
from pipeline.core.config import Config
from pipeline.core.crawl_state import without_ids
from pipeline.core.pseudonym import tombstone_hash
from pipeline.core.storage import Storage
from pipeline.core.tables import delete_rows, get_json, merge_rows, put_json, read_table, vacuum_now

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


def forget(storage: Storage, salt: str, *, authors: Iterable[str] = (), posts: Iterable[PostRef] = (),
           reason: str = "request", vacuum: bool = True) -> dict[str, Any]:
    """Remove ``authors`` (author keys) and ``posts`` everywhere; return what was removed."""
    authors = {a for a in authors if a}
    posts = {(i.rstrip("/").lower(), str(p)) for i, p in posts}
    if not authors and not posts:
        raise ValueError("forget: name an author key or a post")
    removed: dict[str, Any] = {"authors": len(authors), "posts": 0, "engagement": 0, "downloads": 0,
                               "images": 0, "image_bytes": 0, "faces": 0, "labels": 0, "predictions": 0,
                               "post_refs": 0, "labels_runs": [], "unpublished": None, "vacuumed_files": 0}
    _add_tombstones(storage, salt, authors, posts, {}, reason)  # first: see "Concurrent writers"

    doomed = _matching_posts(storage, authors, posts)
    refs = posts | doomed["refs"]
    post_ids = {p for _, p in refs}
    urls = doomed["urls"]
    shas_by_post = _download_shas(storage, post_ids, urls)
    shas = {sha for found in shas_by_post.values() for sha in found}
    _add_tombstones(storage, salt, set(), refs, shas_by_post, reason)  # the author's posts and their images too
    tombstoned_images = load_tombstones(storage, salt).images  # earlier requests' too: a killed run's get cleaned

    removed.update(_forget_labels(storage, authors, post_ids, shas))
    removed["predictions"] = _forget_predictions(storage, removed.pop("label_post_ids"))
    removed["downloads"] = _delete_where(storage, "downloads", _downloads_of(storage, post_ids, urls))
    orphans = _unreferenced(storage, tombstoned_images)
    sha_rows = pa.table({"sha256": pa.array(sorted(orphans), pa.string())})
    removed["faces"] = delete_rows(storage, "faces", sha_rows)
    removed["images"] = delete_rows(storage, "images", sha_rows)
    for sha in sorted(orphans):
        if storage.exists(keys.image_bytes(sha)):
            storage.delete(keys.image_bytes(sha))
            removed["image_bytes"] += 1
    removed["post_refs"] = (delete_rows(storage, "post_refs", _column("author_key", authors))
                            + delete_rows(storage, "post_refs", _column("post_id", post_ids)))
    ref_rows = pa.table({"instance": pa.array([i for i, _ in sorted(refs)], pa.string()),
                         "post_id": pa.array([p for _, p in sorted(refs)], pa.string())})
    removed["engagement"] = delete_rows(storage, "engagement", ref_rows)
    removed["posts"] = delete_rows(storage, "posts", ref_rows)
    removed["crawl_states"] = _forget_crawl_ids(storage, post_ids)
    if vacuum:
        for table in ("labels", "downloads", "faces", "images", "post_refs", "engagement", "posts"):
            removed["vacuumed_files"] += vacuum_now(storage, table)
    log.info("forgot %s", removed)
    return removed


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
    return forget(open_storage(cfg.storage), salt_for(cfg), authors=authors,
                  posts={(instance, post_id)} if post_id else set(), reason=reason)


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


def _forget_labels(storage: Storage, authors: set[str], post_ids: set[str], shas: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"labels": 0, "labels_runs": [], "unpublished": None, "label_post_ids": set()}
    t = read_table(storage, "labels", columns=["run", "post_id", "author_key", "image_sha256"])
    drop = pc.or_(rows_with_value(t, "author_key", authors),
                  pc.and_(rows_with_value(t, "post_id", post_ids), rows_with_value(t, "image_sha256", shas)))
    hit = t.filter(drop)
    if not hit.num_rows:
        return out
    runs = sorted(set(hit["run"].to_pylist()))
    for run in runs:
        if published.unpublish(storage, run):  # first: training must never read a run nobody validated
            out["unpublished"] = run
    out["labels"] = delete_rows(storage, "labels", hit.select(["run", "post_id"]))
    for run in runs:
        storage.delete_prefix(keys.validation_run(run) + "/")  # its result and Data Docs quote rows
        storage.delete_prefix(keys.report_run(run) + "/")  # thumbnails of the photos (local reports)
    out["label_post_ids"] = set(hit["post_id"].to_pylist())
    out["labels_runs"] = runs
    return out


def _forget_crawl_ids(storage: Storage, post_ids: set[str]) -> int:
    """Move crawl-state interval ends off the forgotten post ids; return the states changed."""
    changed = 0
    for key in storage.list(keys.crawl_states()):
        if not key.endswith(".json") or not post_ids:
            continue
        state = get_json(storage, key) or {}
        intervals = state.get("intervals", [])
        scrubbed = without_ids(intervals, post_ids)
        if scrubbed != intervals:
            put_json(storage, key, {**state, "intervals": scrubbed})
            changed += 1
    return changed


def _forget_predictions(storage: Storage, post_ids: set[str]) -> int:
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


def rows_with_value(t: pa.Table, column: str, values: set[str]) -> pa.ChunkedArray:
    """True for the rows of ``t`` whose ``column`` is one of ``values`` (null: False)."""
    if not values:
        return pa.chunked_array([pa.array([False] * t.num_rows, pa.bool_())])
    return pc.fill_null(pc.is_in(t[column], value_set=pa.array(sorted(values), pa.string())), False)


def rows_with_post_ref(t: pa.Table, refs: set[PostRef]) -> pa.ChunkedArray:
    """True for the rows of ``t`` whose (instance, post_id) is one of ``refs``."""
    joined = pc.binary_join_element_wise(t["instance"], t["post_id"], "\n")
    return rows_with_value(pa.table({"k": joined}), "k", {f"{i}\n{p}" for i, p in refs})

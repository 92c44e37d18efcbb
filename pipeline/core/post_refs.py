"""Post references: what a re-read needs to find a post again, kept as crawl state.

A Bluesky post is re-read by its ``at://<did>/app.bsky.feed.post/<rkey>`` URI, which names
the author's DID. No analyst-facing table may hold that, so the URI lives here, beside the
crawl state (:data:`pipeline.core.keys.POST_REFS`): one Parquet file per platform, host and
scrape day, with ``post_id``, ``author_key`` and ``ref``. The refresh reads it back;
``likerank forget`` (:func:`forget_refs`) removes the rows of forgotten authors and posts.
Mastodon posts need none: their id is enough.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import keys
from pipeline.core.storage import Storage

SCHEMA = pa.schema([("post_id", pa.string()), ("author_key", pa.string()), ("ref", pa.string())])


def _read(storage: Storage, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.get_bytes(key))).cast(SCHEMA)


def _write(storage: Storage, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.put_bytes(key, buf.getvalue())


def save_refs(storage: Storage, platform: str, host: str, day: str, rows: list[dict[str, str]]) -> None:
    """Merge ``rows`` (post_id, author_key, ref) into the day's file; the newest row per post wins."""
    if not rows:
        return
    key = keys.post_refs(platform, host, day)
    new = pa.Table.from_pylist(rows, schema=SCHEMA)
    if storage.exists(key):
        old = _read(storage, key)
        old = old.filter(pc.invert(pc.is_in(old.column("post_id"), value_set=new.column("post_id"))))
        new = pa.concat_tables([old, new])
    _write(storage, key, new)


def load_refs(storage: Storage, platform: str, host: str, post_ids: Iterable[str]) -> dict[str, str]:
    """``post_id -> ref`` for the given posts of one platform and host (every day's file)."""
    wanted = pa.array(sorted(set(post_ids)), pa.string())
    out: dict[str, str] = {}
    for key in storage.list(keys.post_refs_folder(platform, host)):
        if not key.endswith(".parquet"):
            continue
        table = _read(storage, key)
        table = table.filter(pc.is_in(table.column("post_id"), value_set=wanted))
        out.update(zip(table.column("post_id").to_pylist(), table.column("ref").to_pylist(), strict=True))
    return out


def forget_refs(storage: Storage, authors: set[str], post_ids: set[str]) -> int:
    """Remove the references of these authors and posts from every file; return the rows removed."""
    if not authors and not post_ids:
        return 0
    removed = 0
    for key in storage.list(keys.POST_REFS):
        if not key.endswith(".parquet"):
            continue
        table = _read(storage, key)
        gone = pc.or_(pc.is_in(table.column("author_key"), value_set=pa.array(sorted(authors), pa.string())),
                      pc.is_in(table.column("post_id"), value_set=pa.array(sorted(post_ids), pa.string())))
        n = pc.sum(gone).as_py() or 0
        if n:
            removed += n
            _write(storage, key, table.filter(pc.invert(gone)))
    return removed

"""Post references: what a re-read needs to find a post again, kept as crawl state.

A Bluesky post is re-read by its ``at://<did>/app.bsky.feed.post/<rkey>`` URI, which names
the author's DID. No analyst-facing table may hold that, so the URI lives in the ``post_refs``
table of likerank's own state (``state/refs/``, :data:`pipeline.core.schemas.POST_REFS`):
``platform``, ``host``, ``post_id``, ``author_key`` and ``ref``. The refresh reads it back;
``likerank forget`` removes the rows of forgotten authors and posts. Mastodon posts need none:
their id is enough.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.storage import Storage
from pipeline.core.tables import merge_rows, read_table


def save_refs(storage: Storage, platform: str, host: str, rows: list[dict[str, str]]) -> None:
    """Merge ``rows`` (post_id, author_key, ref) of one platform and host; the newest per post wins."""
    if not rows:
        return
    table = pa.Table.from_pylist([{"platform": platform, "host": host.lower(), **r} for r in rows])
    merge_rows(storage, "post_refs", table, operation=f"post refs {platform} {host}")


def load_refs(storage: Storage, platform: str, host: str, post_ids: Iterable[str]) -> dict[str, str]:
    """``post_id -> ref`` for the given posts of one platform and host."""
    wanted = pa.array(sorted(set(post_ids)), pa.string())
    table = read_table(storage, "post_refs", columns=["platform", "host", "post_id", "ref"])
    table = table.filter(pc.and_(pc.and_(pc.equal(table["platform"], platform), pc.equal(table["host"], host.lower())),
                                 pc.is_in(table["post_id"], value_set=wanted)))
    return dict(zip(table["post_id"].to_pylist(), table["ref"].to_pylist(), strict=True))

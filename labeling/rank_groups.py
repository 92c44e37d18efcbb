"""The labeling rule: follower-normalized like rank in consecutive exposure groups (DESIGN.md).

Given eligible posts (see :mod:`labeling.eligibility`):

1. ``exposure = followers * (1 + tag_bonus * max(n_tags - 1, 0))``, or ``views`` where present;
2. per source (``mastodon``, ``bluesky``: exposure means something else on each platform, so
   groups never mix them), sort by exposure descending, ties by ``post_id`` ascending; cut the
   sorted list into consecutive groups of ``group_size``; drop each source's trailing partial
   group. Group ids are unique across sources: sources in name order, group 0 = the first
   source's highest exposure;
3. within a group sort by likes ascending, ties by ``post_id`` ascending: ``rank_in_group`` 1..G;
4. ``label = rank_in_group > G / 2``; ``score = (rank_in_group - 0.5) / G``.

Everything is vectorized. ``post_id`` order is string order; it is turned into one int64 key
(:func:`post_id_key`) so the two sorts are numeric: the exposure sort runs in DuckDB (a
parallel radix sort, ~3x numpy's lexsort at 10M rows), the within-group sort is one
``np.lexsort`` over a (groups x G) matrix, i.e. many tiny sorts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Largest decimal id length whose int64 value keeps string order (10**18 < 2**63).
_MAX_DIGITS = 18


@dataclass(frozen=True)
class Ranking:
    """A labeler's output, aligned with its input rows.

    ``group_id`` is -1 and ``rank_in_group`` 0 for rows dropped with the trailing partial group.
    ``group_size`` is the rows per group: the config's for the rule, the whole run for the
    single-group comparison labelers (:mod:`labeling.baselines`).
    """

    group_id: np.ndarray  # int32
    rank_in_group: np.ndarray  # int32
    group_size: int

    @property
    def kept(self) -> np.ndarray:
        return self.group_id >= 0

    def label(self) -> np.ndarray:
        # rank > G/2 <=> 2 * rank > G, exact in integers.
        return (2 * self.rank_in_group > self.group_size).astype(np.int8)

    def score(self) -> np.ndarray:
        return (self.rank_in_group - 0.5) / self.group_size

    def select(self, rows: np.ndarray) -> Ranking:
        """The ranking of the given rows only (a boolean mask or indices)."""
        return Ranking(self.group_id[rows], self.rank_in_group[rows], self.group_size)


def exposure(followers: np.ndarray, n_tags: np.ndarray, tag_bonus: float,
             views: np.ndarray | None = None) -> np.ndarray:
    """Expected audience of each post: followers with a bonus per extra tag; views where known.

    ``views`` is float with NaN where the source reports none.
    """
    extra_tags = np.maximum(n_tags.astype(np.int64) - 1, 0)
    exp = followers.astype(np.float64) * (1.0 + tag_bonus * extra_tags)
    if views is not None:
        exp = np.where(np.isnan(views), exp, views)
    return exp


def post_id_key(post_id: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An int64 per post whose numeric order is ``post_id``'s string order (equal ids, equal keys).

    Fast path: equal-length ASCII decimal ids of up to 18 digits (Mastodon's snowflake ids, the
    simulator's) are their own integer value. Anything else gets its dense rank from a string sort
    (pyarrow compares bytes; UTF-8 byte order is code-point order, the same as Python's ``<``).
    """
    if len(post_id) == 0:
        return np.empty(0, dtype=np.int64)
    lengths = pc.min_max(pc.binary_length(post_id))
    lo, hi = lengths["min"].as_py(), lengths["max"].as_py()
    if lo == hi and 1 <= lo <= _MAX_DIGITS and pc.all(pc.ascii_is_decimal(post_id)).as_py():
        return np.asarray(pc.cast(post_id, pa.int64()), dtype=np.int64)
    rank = pc.rank(post_id, sort_keys="ascending", tiebreaker="dense")
    return np.asarray(rank, dtype=np.int64)


def source_codes(source: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """An int32 code per row whose order is the source names' order, and the names by code
    (a null is the source "").

    Groups never mix sources (exposure means something else on each platform), so the rule
    sorts by this code before exposure. Dictionary-encoded input costs no string work per row.
    """
    if len(source) == 0:
        return np.empty(0, dtype=np.int32), []
    encoded = source
    if pa.types.is_dictionary(encoded.type) and encoded.null_count:
        encoded = encoded.cast(pa.string())
    if not pa.types.is_dictionary(encoded.type):
        encoded = pc.dictionary_encode(encoded.fill_null(""))
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.unify_dictionaries()
        names = encoded.chunk(0).dictionary if encoded.num_chunks else pa.array([], pa.string())
        indices = np.concatenate([np.asarray(c.indices, dtype=np.int32) for c in encoded.chunks])
    else:
        names, indices = encoded.dictionary, np.asarray(encoded.indices, dtype=np.int32)
    listed = names.to_pylist()
    by_name = sorted(range(len(listed)), key=listed.__getitem__)
    rank_of_code = np.empty(len(listed), dtype=np.int32)
    rank_of_code[by_name] = np.arange(len(listed), dtype=np.int32)
    return rank_of_code[indices], [listed[i] for i in by_name]


def exposure_order(exposure_: np.ndarray, key: np.ndarray, source: np.ndarray | None = None) -> np.ndarray:
    """Row indices sorted by source code, exposure descending, then ``key`` (post id order) ascending."""
    from labeling.duck import connect

    n = len(exposure_)
    columns = {"i": np.arange(n, dtype=np.int64), "e": exposure_, "k": key}
    if source is not None:
        columns["s"] = source
    with connect() as con:
        con.register("t", pa.table(columns))
        by = "s ASC, e DESC, k ASC" if source is not None else "e DESC, k ASC"
        order = con.sql(f"SELECT i FROM t ORDER BY {by}").to_arrow_table().column(0)
    return np.asarray(order, dtype=np.int64)


def rank_groups(exposure_: np.ndarray, likes: np.ndarray, key: np.ndarray, group_size: int,
                source: np.ndarray | None = None) -> Ranking:
    """Steps 2-4 of the rule on aligned arrays (``key`` from :func:`post_id_key`, ``source``
    from :func:`source_codes`): each source is cut into its own groups, its trailing partial
    group dropped; group ids run on across sources, in source-name order."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be even and >= 2, got {group_size}")
    n = len(exposure_)
    order = exposure_order(exposure_, key, source)
    if source is None or n == 0:
        grouped = order[:n // group_size * group_size]
    else:
        sorted_source = source[order]
        bounds = np.r_[0, np.flatnonzero(sorted_source[1:] != sorted_source[:-1]) + 1, n]
        # Each source's full groups; its trailing partial group (lowest exposure) is dropped.
        grouped = np.concatenate([order[a:a + (b - a) // group_size * group_size]
                                  for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        del sorted_source
    del order
    grouped = grouped.reshape(-1, group_size)
    # np.lexsort: the last key is primary -> likes ascending, then post id ascending, per row.
    within = np.lexsort((key[grouped], likes[grouped]), axis=1)
    by_rank = np.take_along_axis(grouped, within, axis=1)

    group_id = np.full(n, -1, dtype=np.int32)
    group_id[grouped] = np.arange(len(grouped), dtype=np.int32)[:, None]
    rank = np.zeros(n, dtype=np.int32)
    rank[by_rank] = np.arange(1, group_size + 1, dtype=np.int32)[None, :]
    return Ranking(group_id=group_id, rank_in_group=rank, group_size=group_size)

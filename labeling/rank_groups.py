"""The labeling rule: follower-normalized like rank in consecutive exposure groups
(docs/architecture.md, "The labeling rule").

Given eligible posts (see :mod:`labeling.eligibility`):

1. ``exposure = followers * (1 + tag_bonus * max(n_tags - 1, 0))``, or ``views`` where present;
2. per source (``mastodon``, ``bluesky``: exposure means something else on each platform, so
   groups never mix them), sort by exposure descending, ties by ``post_id`` ascending; cut the
   sorted list into consecutive groups of ``group_size``; drop each source's trailing partial
   group. Group ids are unique across sources and run on from one to the next (sources in
   name order): group 0 is the first source's highest exposure, and the second source's
   highest-exposure group comes right after the first source's lowest;
3. within a group sort by likes ascending, ties by ``post_id`` ascending: ``rank_in_group`` 1..G;
4. ``label = rank_in_group > G / 2``; ``score = (rank_in_group - 0.5) / G``.

Everything is vectorized, and both sorts are numeric. ``post_id`` order is string order; it is
turned into one int64 key (:func:`post_id_key`), and rows not already in that order are put in
it once, so a row's index *is* its post id rank. Then the exposure sort runs in DuckDB (a
parallel sort, ~3x numpy's lexsort at 10M rows) with the row index as tiebreak, and the
within-group sort packs ``likes`` and the row index into one int64 and sorts each group's row
of a (groups x G) matrix with ``np.sort`` (SIMD sorting networks for rows this short: ~10x a
lexsort).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
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


#: A group whose exposure spans more than this (max / min) is named in every run's summary as
#: a warning, whatever ``labeling.max_group_exposure_ratio`` says: there positives have far
#: bigger audiences than negatives, and the label mostly tracks follower count.
WIDE_GROUP_WARNING = 10.0


@dataclass(frozen=True)
class GroupSpans:
    """Each group's exposure span, aligned with group ids 0..n-1."""

    source: np.ndarray  # int code of each group's source
    low: np.ndarray  # float64, lowest exposure in the group
    high: np.ndarray  # float64, highest

    @property
    def ratio(self) -> np.ndarray:
        """max / min exposure per group (inf where the lowest is 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.low > 0, self.high / np.maximum(self.low, 1e-300), np.inf)


def group_spans(group_id: np.ndarray, exposures: np.ndarray, source: np.ndarray) -> GroupSpans:
    """The exposure span of every group 0..max(group_id) (rows aligned: each row's group id, -1
    for a dropped row, its exposure and its source code); a ranking's or a labels table's."""
    group_id = np.asarray(group_id)
    kept = group_id >= 0
    groups = int(group_id.max()) + 1 if kept.any() else 0
    gid, exp = group_id[kept], np.asarray(exposures, dtype=np.float64)[kept]
    low, high = np.full(groups, np.inf), np.full(groups, -np.inf)
    np.minimum.at(low, gid, exp)
    np.maximum.at(high, gid, exp)
    codes = np.zeros(groups, dtype=np.int64)
    codes[gid] = np.asarray(source)[kept]
    return GroupSpans(codes, low, high)


def drop_groups(ranking: Ranking, groups: np.ndarray) -> Ranking:
    """``ranking`` without the rows of ``groups`` (their group id -1, as a dropped row's)."""
    out = np.isin(ranking.group_id, groups)
    return Ranking(np.where(out, -1, ranking.group_id).astype(np.int32),
                   np.where(out, 0, ranking.rank_in_group).astype(np.int32), ranking.group_size)


def exposure(followers: np.ndarray, n_tags: np.ndarray, tag_bonus: float,
             views: np.ndarray | None = None) -> np.ndarray:
    """Expected audience of each post: followers with a bonus per extra tag; views where known.

    ``views`` is float with NaN where the source reports none.
    """
    # followers * (1 + tag_bonus * max(n_tags - 1, 0)), the same float operations in place:
    # at 10M rows each temporary is 80 MB of freshly faulted memory.
    exp = n_tags.astype(np.float64)  # exact: tag counts are small integers
    np.maximum(exp, 1.0, out=exp)
    exp -= 1.0
    exp *= tag_bonus
    exp += 1.0
    exp *= followers
    if views is not None:
        exp = np.where(np.isnan(views), exp, views)
    return exp


def _decimal_width(chunk: pa.Array) -> int | None:
    """The length of the chunk's ids if all are ASCII decimal of one length up to 18 digits
    (Mastodon's snowflake ids, the simulator's): then their integer value keeps string order."""
    lengths = pc.min_max(pc.binary_length(chunk))
    lo, hi = lengths["min"].as_py(), lengths["max"].as_py()
    if lo == hi and 1 <= lo <= _MAX_DIGITS and pc.all(pc.ascii_is_decimal(chunk)).as_py():
        return lo
    return None


def post_id_key(post_id: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An int64 per post whose numeric order is ``post_id``'s string order (equal ids, equal keys).

    Fast path: ids of one :func:`_decimal_width` are their own integer value, parsed chunk by
    chunk into one array. Anything else gets its dense rank from a string sort (pyarrow compares
    bytes; UTF-8 byte order is code-point order, the same as Python's ``<``).
    """
    key = np.empty(len(post_id), dtype=np.int64)
    at, width = 0, None
    for chunk in post_id.chunks if isinstance(post_id, pa.ChunkedArray) else [post_id]:
        if len(chunk) == 0:
            continue
        here = _decimal_width(chunk)
        if here is None or width not in (None, here):
            rank = pc.rank(post_id, sort_keys="ascending", tiebreaker="dense")
            return np.asarray(rank, dtype=np.int64)
        width = here
        key[at:at + len(chunk)] = pc.cast(chunk, pa.int64()).to_numpy()
        at += len(chunk)
    return key


def post_id_key_unless_ordered(post_id: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """None when the ids strictly increase in string order (the project's candidates do: their
    row indices are then a post_id key), else :func:`post_id_key`. Decimal ids are checked
    chunk by chunk, without an array as long as the column."""
    last, width = None, None
    for chunk in post_id.chunks if isinstance(post_id, pa.ChunkedArray) else [post_id]:
        if len(chunk) == 0:
            continue
        here = _decimal_width(chunk)
        if here is None or width not in (None, here):
            key = post_id_key(post_id)
            return None if np.all(key[1:] > key[:-1]) else key
        width = here
        values = pc.cast(chunk, pa.int64()).to_numpy()
        if (last is not None and values[0] <= last) or not np.all(values[1:] > values[:-1]):
            return post_id_key(post_id)
        last = values[-1]
    return None


def source_codes(source: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """A code per row whose order is the source names' order, and the names by code (a null is
    the source "").

    Groups never mix sources (exposure means something else on each platform), so the rule
    sorts by this code before exposure. Dictionary-encoded input costs no string work per row.
    Codes are the narrowest unsigned integers that hold them (uint8 up to 256 sources): DuckDB's
    exposure sort compares fixed-width keys, and a one-byte source sorted 10M rows in ~2/3 of
    the time an int32 source took.
    """
    if len(source) == 0:
        return np.empty(0, dtype=np.uint8), []
    encoded = source
    if pa.types.is_dictionary(encoded.type) and encoded.null_count:
        encoded = encoded.cast(pa.string())
    if not pa.types.is_dictionary(encoded.type):
        encoded = pc.dictionary_encode(encoded.fill_null(""))
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.unify_dictionaries()
        chunks = [c for c in encoded.chunks if len(c)]
    else:
        chunks = [encoded]
    listed = chunks[0].dictionary.to_pylist()
    by_name = sorted(range(len(listed)), key=listed.__getitem__)
    code_type = np.min_scalar_type(max(len(listed) - 1, 0))
    rank_of_code = np.empty(len(listed), dtype=code_type)
    rank_of_code[by_name] = np.arange(len(listed), dtype=code_type)
    codes = np.empty(len(source), dtype=code_type)
    at = 0
    for chunk in chunks:  # one code array written chunk by chunk
        codes[at:at + len(chunk)] = rank_of_code[chunk.indices.to_numpy()]
        at += len(chunk)
    return codes, [listed[i] for i in by_name]


def code_counts(codes: np.ndarray, n: int, where: np.ndarray | None = None) -> np.ndarray:
    """``np.bincount(codes[where], minlength=n)`` for codes below ``n``: for the handful of
    sources or splits, one vectorized comparison per code, where ``np.bincount`` would first
    copy narrow codes to int64 (72 MB at 9M rows, 0.1 s here) and ``codes[where]`` copy them."""
    if n > 8:  # past a handful of codes, one pass per code costs more than bincount's copy
        return np.bincount(codes if where is None else codes[where], minlength=n)
    out = np.zeros(n, dtype=np.int64)
    for code in range(n):
        hit = codes == code
        if where is not None:
            hit &= where
        out[code] = np.count_nonzero(hit)
    return out


def exposure_order(exposures: np.ndarray, source: np.ndarray | None = None) -> np.ndarray:
    """Row indices sorted by source code, exposure descending, then row index ascending (rows
    must be in post_id order, so the last is post_id order)."""
    from labeling.duck import connect

    n = len(exposures)
    # int32 row ids while they fit: half the memory to sort, fetch and index with.
    columns = {"i": np.arange(n, dtype=np.int32 if n < 2**31 else np.int64), "e": exposures}
    if source is not None:
        columns["s"] = source
    with connect() as con:
        con.register("t", pa.table(columns))
        by = "s ASC, e DESC, i ASC" if source is not None else "e DESC, i ASC"
        order = con.sql(f"SELECT i FROM t ORDER BY {by}").to_arrow_table().column(0)
    return np.asarray(order)


def in_rank_order(grouped: np.ndarray, likes: np.ndarray) -> np.ndarray:
    """Each row of ``grouped`` (row indices, rows in post_id order) sorted by likes ascending,
    then row index, i.e. post_id, ascending.

    Both go into one int64, ``likes << bits | row``, whenever the likes fit beside the row
    index (below 2**39 at 10M rows); otherwise a lexsort gives the same order.
    """
    bits = max(int(len(likes) - 1).bit_length(), 1)
    if len(likes) == 0 or (int(likes.min()) >= 0 and int(likes.max()) < 1 << (63 - bits)):
        packed = likes[grouped] << np.int64(bits)
        packed |= grouped
        packed.sort(axis=1)
        packed &= np.int64((1 << bits) - 1)
        return packed
    # np.lexsort: the last key is primary -> likes ascending, then the row index ascending.
    return np.take_along_axis(grouped, np.lexsort((grouped, likes[grouped]), axis=1), axis=1)


def rank_groups(exposures: np.ndarray, likes: np.ndarray, key: np.ndarray, group_size: int,
                source: np.ndarray | None = None) -> Ranking:
    """Steps 2-4 of the rule on aligned arrays (``key`` from :func:`post_id_key`, ``source``
    from :func:`source_codes`): each source is cut into its own groups, its trailing partial
    group dropped; group ids run on across sources, in source-name order."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be even and >= 2, got {group_size}")
    n = len(exposures)
    if n > 1 and not np.all(key[1:] > key[:-1]):
        # Not in post_id order (a file, a test): rank the rows in that order and map back.
        # The project's candidates arrive in it, so this sort is skipped for them.
        by_post = np.argsort(key, kind="stable")
        ranked = rank_groups(exposures[by_post], likes[by_post], np.arange(n), group_size,
                             None if source is None else source[by_post])
        group_id, rank = np.empty_like(ranked.group_id), np.empty_like(ranked.rank_in_group)
        group_id[by_post], rank[by_post] = ranked.group_id, ranked.rank_in_group
        return Ranking(group_id=group_id, rank_in_group=rank, group_size=group_size)

    order = exposure_order(exposures, source)
    # Sorted by source first, so each source is one block of ``order``; its full groups are
    # a (groups x G) view of the block, its trailing partial group (lowest exposure) dropped.
    per_source = [n] if source is None or n == 0 else code_counts(source, int(source.max()) + 1)
    group_id = np.full(n, -1, dtype=np.int32)
    rank = np.zeros(n, dtype=np.int32)
    likes = np.asarray(likes, dtype=np.int64)
    blocks = []  # (first group id, groups x G row indices) per source
    start = first_group = 0
    for rows in per_source:
        groups = int(rows) // group_size
        blocks.append((first_group, order[start:start + groups * group_size].reshape(groups, group_size)))
        start += int(rows)
        first_group += groups

    def write_group_ids() -> None:
        for first, grouped in blocks:
            group_id[grouped] = np.arange(first, first + len(grouped), dtype=np.int32)[:, None]

    # The group ids are scattered on a second core while this one sorts within groups (numpy
    # releases the GIL for both).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="label-groups") as pool:
        written = pool.submit(write_group_ids)
        for _, grouped in blocks:
            rank[in_rank_order(grouped, likes)] = np.arange(1, group_size + 1, dtype=np.int32)[None, :]
        written.result()
    return Ranking(group_id=group_id, rank_in_group=rank, group_size=group_size)

"""Comparison labelers: what the group rule is measured against (``labeling.labeler``).

Each ranks *all* eligible posts of a run (after the same filters as the rule) by one metric:

- ``median_likes``: raw likes, the naive baseline that ignores audience size;
- ``ratio``: likes / exposure (exposure floored at 1 so authors with 0 followers stay finite);
- ``residual``: residual of ``log1p(likes)`` after a least-squares fit on
  ``[1, log(followers), n_tags]`` (followers floored at 1): likes beyond what the audience explains.

They fill the LABELS columns like this: one group, ``group_id = 0``; ``rank_in_group`` = the
global rank 1..n by the metric ascending, ties by ``post_id`` ascending; ``label = rank > n/2``
(the median split) and ``score = (rank - 0.5) / n``. To keep "exactly half positive per group"
true, an odd count drops one post, the same one the rule drops first: the lowest exposure
(ties: the largest ``post_id``), counted as ``partial_group``.
"""

from __future__ import annotations

import numpy as np

from labeling.rank_groups import Ranking


def rank_single_group(metric: np.ndarray, exposures: np.ndarray, key: np.ndarray) -> Ranking:
    """Rank every row by ``metric`` ascending (ties by post id key) in one group of even size."""
    n = len(metric)
    keep = np.ones(n, dtype=bool)
    if n % 2:
        lowest = np.flatnonzero(exposures == exposures.min())
        keep[lowest[np.argmax(key[lowest])]] = False
    rows = np.flatnonzero(keep)
    by_rank = rows[np.lexsort((key[rows], metric[rows]))]
    group_id = np.where(keep, 0, -1).astype(np.int32)
    rank = np.zeros(n, dtype=np.int32)
    rank[by_rank] = np.arange(1, len(rows) + 1, dtype=np.int32)
    return Ranking(group_id=group_id, rank_in_group=rank, group_size=max(len(rows), 2))


def median_likes(likes: np.ndarray, exposures: np.ndarray, key: np.ndarray) -> Ranking:
    return rank_single_group(likes.astype(np.float64), exposures, key)


def ratio(likes: np.ndarray, exposures: np.ndarray, key: np.ndarray) -> Ranking:
    return rank_single_group(likes / np.maximum(exposures, 1.0), exposures, key)


def like_residual(likes: np.ndarray, followers: np.ndarray, n_tags: np.ndarray) -> np.ndarray:
    """log1p(likes) minus its least-squares fit on [1, log(followers), n_tags]."""
    y = np.log1p(likes.astype(np.float64))
    x = np.column_stack([np.ones(len(y)), np.log(np.maximum(followers, 1).astype(np.float64)),
                         n_tags.astype(np.float64)])
    if len(y) == 0:
        return y
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    return y - x @ beta


def residual(likes: np.ndarray, followers: np.ndarray, n_tags: np.ndarray,
             exposures: np.ndarray, key: np.ndarray) -> Ranking:
    return rank_single_group(like_residual(likes, followers, n_tags), exposures, key)

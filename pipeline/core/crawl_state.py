"""The crawl state's id ranges: which statuses of one timeline were read.

A scrape records, per (platform, instance, hashtag), the id ranges it has read completely as
inclusive ``[low, high]`` intervals (``state/scrape/...``, written by :mod:`pipeline.scrape.scrape`).
An interval's ends are real post ids, so a forgotten post may be one of them: :func:`without_ids`
moves such an end just past the id. Coverage only shrinks, so the worst that follows is a
status read again, which the tombstone then skips.
"""

from __future__ import annotations

from collections.abc import Iterable


def id_key(post_id: str) -> tuple[int, str]:
    """Sort key for ids: numeric ids by value (Mastodon ids are decimal strings), then text."""
    return (len(post_id), post_id) if post_id.isdigit() else (1 << 30, post_id)


def _after(post_id: str) -> str:
    """An id just above ``post_id`` that is not it (decimal ids stay decimal)."""
    return str(int(post_id) + 1) if post_id.isdigit() else post_id + "\x00"


def _before(post_id: str) -> str:
    """An id just below ``post_id`` that is not it."""
    if post_id.isdigit():
        return str(max(int(post_id) - 1, 0))
    return post_id[:-1]


def without_ids(intervals: Iterable[list[str]], ids: set[str]) -> list[list[str]]:
    """``intervals`` with no end equal to one of ``ids``; an interval left empty is dropped."""
    out = []
    for low, high in intervals:
        if low in ids:
            low = _after(low)
        if high in ids:
            high = _before(high)
        if high and id_key(low) <= id_key(high):
            out.append([low, high])
    return out

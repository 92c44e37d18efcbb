"""Ground truth files (the simulator's hidden quality) and how their rows meet likerank's posts.

A truth file is Parquet or CSV with ``post_id`` and ``quality`` (``likerank sim truth`` and
``make run`` write the simulator's). Its rows are matched to likerank's posts by
:func:`match_id`: a Mastodon post id is the status id itself, while a Bluesky post id is
``<rkey>-<author_key[:8]>`` and the truth, which has no pseudonyms, knows only the rkey (its
``source_id`` column; a file without one matches on ``post_id``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def match_id(post_id: str) -> str:
    """The part of a likerank post id a truth file knows: the rkey of a Bluesky id (the
    pseudonym after its last ``-`` is hex), else the id as it is (Mastodon ids have no ``-``)."""
    head, sep, tail = post_id.rpartition("-")
    return head if sep and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail) else post_id


def load_truth(path: str | Path, columns: tuple[str, ...] = ("quality", "has_face")) -> pd.DataFrame:
    """``match_id`` and the wanted ``columns`` that the file has (``quality`` is required)."""
    path = Path(path)
    truth = pd.read_csv(path, dtype={"post_id": str, "source_id": str}) if path.suffix.lower() == ".csv" \
        else pd.read_parquet(path)
    missing = [c for c in ("post_id", "quality") if c not in truth.columns]
    if missing:
        raise ValueError(f"truth {path}: missing column(s) {', '.join(missing)} (has {', '.join(truth.columns)})")
    ids = truth["source_id"] if "source_id" in truth.columns else truth["post_id"]
    keep = [c for c in columns if c in truth.columns]
    return truth[keep].assign(match_id=ids.astype(str).to_numpy())


def coverage_line(matched: int, rows: int, what: str = "labeled posts") -> str:
    """How many of ``rows`` the truth covered, said the same way everywhere."""
    return f"truth matched {matched:,} of {rows:,} {what}" + ("" if matched == rows else
                                                            f" ({rows - matched:,} unmatched)")

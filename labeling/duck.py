"""One way to open DuckDB for labeling: in memory, no progress bar (logs stay clean)."""

from __future__ import annotations


def connect():
    import duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    return con

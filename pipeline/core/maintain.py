"""Table maintenance: many small commits (every scrape flush is one) make reads slower, and
replaced files stay on disk until they are vacuumed.

:func:`compact_all` compacts each table's small files into larger ones (optimize), vacuums the
files that no version within ``storage.retention_hours`` still references, writes a checkpoint
and drops the log entries it covers. It is safe beside running writers: the vacuum only
removes files the log says were replaced, never a writer's files that are not committed yet.
``likerank compact`` and the ``maintain_tables`` DAG run it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.core.config import Config
from pipeline.core.schemas import INTERNAL_TABLES, TABLES
from pipeline.core.storage import Storage, open_storage
from pipeline.core.tables import maintain

log = logging.getLogger(__name__)


def compact_all(cfg: Config, storage: Storage | None = None, tables: list[str] | None = None) -> dict[str, Any]:
    """Maintain every table (or ``tables``); return what was done per table."""
    storage = storage or open_storage(cfg.storage)
    names = tables or [*TABLES, *INTERNAL_TABLES]
    unknown = sorted(set(names) - set(TABLES) - set(INTERNAL_TABLES))
    if unknown:
        raise ValueError(f"compact: unknown table(s) {', '.join(unknown)}; known: {', '.join([*TABLES, *INTERNAL_TABLES])}")
    out: dict[str, Any] = {}
    for name in names:
        t0 = time.monotonic()
        out[name] = maintain(storage, name, retention_hours=cfg.storage.retention_hours)
        out[name]["seconds"] = round(time.monotonic() - t0, 2)
        log.info("compact %s: %s", name, out[name])
    return out

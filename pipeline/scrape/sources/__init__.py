"""Sources: one class per platform behind :class:`pipeline.scrape.sources.base.Source`."""

from pipeline.scrape.sources.base import (
    SKIP_REASONS,
    Item,
    Observation,
    Page,
    Post,
    Source,
    SourceError,
    SourceRateLimited,
)

__all__ = ["SKIP_REASONS", "Item", "Observation", "Page", "Post", "Source", "SourceError", "SourceRateLimited"]

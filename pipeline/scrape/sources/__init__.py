"""Sources: one class per platform behind :class:`pipeline.sources.base.Source`."""

from pipeline.sources.base import SKIP_REASONS, Item, Observation, Page, Post, Source, SourceError

__all__ = ["SKIP_REASONS", "Item", "Observation", "Page", "Post", "Source", "SourceError"]

"""Sources: one class per platform behind :class:`pipeline.scrape.sources.base.Source`.

- :class:`pipeline.scrape.sources.mastodon.MastodonSource`: any Mastodon-compatible instance.
- :class:`pipeline.scrape.sources.bluesky.BlueskySource`: Bluesky (AT Protocol), with an app
  password (:func:`pipeline.scrape.sources.bluesky.credentials_from_env`).

The platform modules are imported where they are used, not here, so that importing the
interface does not import every platform's dependencies.
"""

from pipeline.scrape.sources.base import (
    SKIP_REASONS,
    CrossOriginLink,
    Item,
    Observation,
    OptedOut,
    Page,
    Post,
    ResponseRefused,
    ResponseTooLarge,
    ResponseTooSlow,
    Source,
    SourceError,
    SourceRateLimited,
)

__all__ = ["SKIP_REASONS", "CrossOriginLink", "Item", "Observation", "OptedOut", "Page", "Post", "ResponseRefused",
           "ResponseTooLarge", "ResponseTooSlow", "Source", "SourceError", "SourceRateLimited"]

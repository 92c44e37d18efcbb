"""A local Mastodon- and Bluesky-compatible server over a generated social world with hidden ground truth.

Modules, one verb each: ``world`` generates, ``images`` composes pictures, ``likes`` is the
engagement model (its docstring holds every number), ``entities`` renders Mastodon JSON,
``bluesky`` renders AT Protocol views and searches them, ``timeline`` paginates,
``ratelimit`` throttles, ``faults`` breaks things on purpose, ``politeness`` says what
may be crawled and mined (robots.txt, TDM), ``server`` serves, ``truth``
tells what the server never does. ``bluesky_share`` (default 0) puts that share of the
accounts, and their posts, on Bluesky's XRPC API instead of Mastodon's.

Typical use::

    from simulator import start_server, world_truth
    with start_server(seed=7, posts=300) as sim:
        ...  # scrape sim.url; sim.advance(days=30); sim.set_fault("bomb", fraction=0.1)
    truth = world_truth(seed=7, posts=300)  # pyarrow Table, one row per status
"""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa

from simulator.ratelimit import MASTODON_RATE_LIMIT, RateLimit
from simulator.server import SimServer, rate_limit_from_config, start_server
from simulator.truth import TRUTH_SCHEMA, truth_table, write_truth
from simulator.world import DEFAULT_NOW, World, build_world

__all__ = [
    "DEFAULT_NOW", "MASTODON_RATE_LIMIT", "TRUTH_SCHEMA", "RateLimit", "SimServer", "World",
    "build_world", "rate_limit_from_config", "start_server", "truth_table", "world_truth", "write_truth",
]


def world_truth(seed: int = 7, posts: int = 5000, hashtags: tuple[str, ...] | list[str] = ("selfie",),
                now: datetime = DEFAULT_NOW, bluesky_share: float = 0.0) -> pa.Table:
    """Ground truth of the world with these parameters (the same world the server serves)."""
    return truth_table(build_world(seed, posts, tuple(hashtags), now, bluesky_share))

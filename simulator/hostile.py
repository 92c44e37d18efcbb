"""The hostile-server corpus: what a scraper meets on the open web, as simulator fault modes,
each with the outcome a safe scraper must end with. Used by the reliability tests and
``bench/reliability.py``, which run every case against a fresh server and then a clean rerun.

An outcome is the ``downloads.status`` the hit images must end with, or, for the cases that
hit the API, how the run itself ends. In every case no good row may be lost: after a clean
rerun, the stored posts are exactly the world's eligible ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    mode: str  # a simulator fault mode (simulator.faults.MODES)
    expect: str  # a downloads status, or "run ok" / "run stops" for API-level cases
    fault: dict[str, Any] = field(default_factory=dict)  # fraction, count, scope, parameters
    scrape: dict[str, Any] = field(default_factory=dict)  # scrape.* settings for this case


CASES: tuple[Case, ...] = (
    Case("malformed_json", "a timeline page whose JSON is cut in the middle (twice)", "malformed_json",
         "run ok", {"count": 2}),
    Case("truncated_jpeg", "an image whose body stops half-way", "truncated", "connection_error", {"fraction": 0.2}),
    Case("decompression_bomb", "a 110 kB PNG that decodes to 900 megapixels", "bomb", "bomb", {"fraction": 0.2}),
    Case("huge_body", "an image body past scrape.max_bytes", "oversized", "too_large",
         {"fraction": 0.2, "size_bytes": 3_000_000}, {"max_bytes": 2_000_000}),
    Case("slow_body", "an image that arrives slower than the time budget", "slow", "timeout",
         {"fraction": 0.2, "scope": "media", "delay_s": 2.5}, {"read_timeout_s": 0.5, "total_timeout_s": 1.5}),
    Case("redirect_loop", "an image URL that redirects to itself forever", "redirect_loop", "redirect_loop",
         {"fraction": 0.2}),
    Case("redirect_private", "an image URL that redirects to the cloud metadata address", "redirect_private",
         "blocked", {"fraction": 0.2}),
    Case("malformed_url", "attachment URLs that do not parse (http://[::1/x.jpg)", "bad_media_url", "bad_url",
         {"fraction": 0.2}),
    Case("redirect_other_origin", "the timeline redirects to another origin: the token must not follow",
         "redirect_origin", "run ok", {"count": 1}),
    Case("huge_retry_after", "429 with Retry-After: ten years on the second page", "retry_after", "run stops",
         {"count": 1, "scope": "api", "fraction": 0.5}),
)

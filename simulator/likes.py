"""The simulator's hidden quality and engagement model: every number in one place.

Quality (a latent on the log-likes scale; one unit multiplies expected likes by e = 2.72)
---------------------------------------------------------------------------------------------
The factors follow A. Karpathy's 2015 #selfie findings. For a post's first image::

    visual_quality = FACE_SIZE_COEF  * ln(face_share / FACE_SHARE_BEST)**2   (face images only)
                   + DARK_COEF       * ln(min(brightness, 1))                 (dark is bad)
                   + FILTER_COEF     * (1 - min(saturation, 1))               (washed-out / b&w is good)
                   + BORDER_EFFECT   * border                                 (white border is good)
                   + GROUP_EFFECT    * group_photo                            (groups are bad)
    quality        = visual_quality + N(0, NOISE_SD)     (what pixels cannot show: the person,
                                                          the caption, the moment)

=================  ========  ==================================================================
constant           value     effect
=================  ========  ==================================================================
FACE_SHARE_BEST    1/3       face-box height / frame height that is best ("about a third")
FACE_SIZE_COEF     -1.2      share 0.12 -> -1.25, 0.2 -> -0.31, 0.5 -> -0.20, 0.8 -> -0.92
DARK_COEF          0.9       brightness 0.5 -> -0.62, 0.7 -> -0.32, >= 1 -> 0
FILTER_COEF        0.6       black-and-white +0.60, washed-out (sat 0.25..0.65) +0.21..+0.45
BORDER_EFFECT      +0.35     white border
GROUP_EFFECT       -0.5      the group photo
NOISE_SD           0.35      unexplained per-post quality
=================  ========  ==================================================================

Text-only and video posts have visual_quality 0; boosts have no quality (they are not posts
of their own and get no likes).

Likes
-----
Once saturated, a post's likes are Poisson with mean::

    mu = LIKES_SCALE * followers**FOLLOWER_EXPONENT * (1 + TAG_BONUS * extra_tags) * exp(quality)

with LIKES_SCALE = 0.25, FOLLOWER_EXPONENT = 0.75 (sub-linear: 100x the followers gives 31.6x
the likes) and TAG_BONUS = 0.05 per tag beyond the queried one (the labeling default). A
300-follower author's average post gets ~18 likes, a 100,000-follower author's ~1,400.
Follower count is thus the strongest driver of raw likes (followers span four orders of
magnitude, log-sd 1.5, while quality has sd ~0.6), which is why a raw-likes median split
mostly measures audience size and the follower-normalized groups rule recovers quality.

Each of the post's ``L ~ Poisson(mu)`` likes arrives after an exponential delay with the
post's own time constant ``tau ~ LogUniform(TAU_DAYS)`` = 2..8 days, so a post reaches 95% of
its likes after 3*tau = 6..24 days (one to four weeks), and at 30 days at least 97.6%. The
count at age ``t`` is the number of arrivals before ``t``: monotone, so an engagement
refresh sees the numbers grow and never shrink.

Reposts and replies follow likes loosely: each like is also a boost with the post's
probability ``r ~ Beta(2, 18)`` (mean 0.10), and brings a reply with ``p ~ Beta(1.2, 30)``
(mean 0.04).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.images import ImageFactors

FACE_SHARE_BEST = 1 / 3
FACE_SIZE_COEF = -1.2
DARK_COEF = 0.9
FILTER_COEF = 0.6
BORDER_EFFECT = 0.35
GROUP_EFFECT = -0.5
NOISE_SD = 0.35

LIKES_SCALE = 0.25
FOLLOWER_EXPONENT = 0.75
TAG_BONUS = 0.05
TAU_DAYS = (2.0, 8.0)
REBLOG_BETA = (2.0, 18.0)
REPLY_BETA = (1.2, 30.0)


def visual_quality(f: ImageFactors | None) -> float:
    """The part of quality the first image's factors explain (0 without an image)."""
    if f is None:
        return 0.0
    q = 0.0
    if f.kind == "face":
        q += FACE_SIZE_COEF * float(np.log(f.face_share / FACE_SHARE_BEST)) ** 2
    q += DARK_COEF * float(np.log(min(f.brightness, 1.0)))
    q += FILTER_COEF * (1.0 - min(f.saturation, 1.0))
    q += BORDER_EFFECT * f.border
    q += GROUP_EFFECT * (f.kind == "group")
    return q


def expected_likes(followers: np.ndarray, extra_tags: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Saturated mean likes, vectorised."""
    return (LIKES_SCALE * np.power(followers.astype(np.float64), FOLLOWER_EXPONENT)
            * (1.0 + TAG_BONUS * extra_tags) * np.exp(quality))


@dataclass
class Engagement:
    """Every post's like arrivals, sorted per post (CSR layout: post i owns ``start[i]:start[i+1]``).

    ``delay_days`` are the arrival delays after the post's creation; ``reblog_cum`` and
    ``reply_cum`` are running totals of the boost/reply flags of those arrivals, per post.
    """

    start: np.ndarray  # int64, len posts + 1
    delay_days: np.ndarray  # float64, sorted within each post
    reblog_cum: np.ndarray  # int32
    reply_cum: np.ndarray  # int32
    tau_days: np.ndarray  # per post
    mu: np.ndarray  # per post, saturated expected likes

    def counts(self, post: int, age_days: float) -> tuple[int, int, int]:
        """(likes, reposts, replies) of one post at the given age in days."""
        s, e = int(self.start[post]), int(self.start[post + 1])
        if age_days <= 0 or e == s:
            return 0, 0, 0
        k = int(np.searchsorted(self.delay_days[s:e], age_days, side="right"))
        if k == 0:
            return 0, 0, 0
        return k, int(self.reblog_cum[s + k - 1]), int(self.reply_cum[s + k - 1])


def draw_engagement(rng: np.random.Generator, mu: np.ndarray) -> Engagement:
    """Draw every post's like arrivals (posts with ``mu == 0`` get none)."""
    n = len(mu)
    tau = np.exp(rng.uniform(np.log(TAU_DAYS[0]), np.log(TAU_DAYS[1]), size=n))
    reblog_p = rng.beta(*REBLOG_BETA, size=n)
    reply_p = rng.beta(*REPLY_BETA, size=n)
    total = rng.poisson(mu)
    start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(total, out=start[1:])
    owner = np.repeat(np.arange(n), total)
    delay = rng.exponential(1.0, size=int(start[-1])) * tau[owner]
    order = np.lexsort((delay, owner))  # by post, then delay
    delay = delay[order]
    reblog = (rng.random(delay.size) < reblog_p[owner]).astype(np.int32)
    reply = (rng.random(delay.size) < reply_p[owner]).astype(np.int32)

    def per_post_cumsum(flags: np.ndarray) -> np.ndarray:
        c = np.cumsum(flags, dtype=np.int64)
        before = np.concatenate([[0], c])[start[:-1]]  # running total before each post's first arrival
        return (c - np.repeat(before, total)).astype(np.int32)

    return Engagement(start, delay, per_post_cumsum(reblog), per_post_cumsum(reply), tau, mu)

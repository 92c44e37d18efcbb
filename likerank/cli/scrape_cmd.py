"""``likerank scrape`` and ``likerank refresh``: the scrape and engagement-refresh stages by hand."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.core.config import PLATFORMS, Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scrape", help="read a hashtag from a platform: posts, images, engagement, downloads",
                       description="Runs the scrape stage for one (platform, instance, hashtag) and logical date, "
                                   "with a progress bar, then prints a one-screen summary. Incremental: it reads "
                                   "only posts not read before (state/scrape/<host>/[bluesky/]<tag>.json). Bluesky "
                                   "logs in with $LIKERANK_BLUESKY_IDENTIFIER and $LIKERANK_BLUESKY_APP_PASSWORD "
                                   "(the variables source.bluesky_*_env name).")
    p.add_argument("--source", default="mastodon", choices=PLATFORMS, help="the platform (default: mastodon)")
    p.add_argument("--instance", default="", metavar="URL",
                   help="Mastodon instance or Bluesky XRPC service the session is created on (default: "
                        "source.instance_url, or source.bluesky_url for bluesky; needed when source.kind = simulator)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG",
                   help="hashtag without '#' (repeatable; default: source.hashtags)")
    p.add_argument("--max-posts", type=int, default=None, metavar="N", help="read at most N statuses (default: scrape.max_posts)")
    p.add_argument("--date", default="", metavar="YYYY-MM-DD", help="logical date of the partitions (default: today, UTC)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead")
    p.set_defaults(handler=run_scrape)

    r = sub.add_parser("refresh", help="re-read posts now old enough for their likes to count (new engagement snapshots)")
    r.add_argument("--instance", default="", metavar="URL", help="only posts from this instance")
    r.add_argument("--date", default="", metavar="YYYY-MM-DD", help="logical date (default: today, UTC)")
    r.set_defaults(handler=run_refresh)


def _today(value: str) -> str:
    from datetime import UTC, date, datetime

    return date.fromisoformat(value).isoformat() if value else datetime.now(UTC).date().isoformat()


def run_scrape(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.scrape.scrape import format_summary, scrape
    from pipeline.scrape.sources.base import SourceError

    setting = "source.instance_url" if args.source == "mastodon" else "source.bluesky_url"
    instance = args.instance or (cfg.source.instance_url if args.source == "mastodon" else cfg.source.bluesky_url)
    if not instance:
        print(f"likerank scrape: no instance: give --instance URL or set {setting} "
              "(for the simulator: the URL `likerank sim serve` prints)", file=sys.stderr)
        return 2
    try:
        day = _today(args.date)
    except ValueError:
        print(f"likerank scrape: --date {args.date!r}: expected YYYY-MM-DD", file=sys.stderr)
        return 2
    rc = 0
    for tag in args.tag or cfg.source.hashtags:
        try:
            summary = scrape(cfg, instance, tag, day, max_posts=args.max_posts, progress=not args.json,
                             platform=args.source)
        except (SourceError, ValueError) as exc:
            print(f"likerank scrape: #{tag}: {exc} (what was read before this is kept)", file=sys.stderr)
            rc = 1
            continue
        print(json.dumps(summary) if args.json else format_summary(summary))
    return rc


def run_refresh(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.scrape.refresh import RefreshError, refresh_engagement

    try:
        summary = refresh_engagement(cfg, _today(args.date), instance=args.instance or None, progress=True)
    except (RefreshError, ValueError) as exc:
        print(f"likerank refresh: {exc}", file=sys.stderr)
        return 1
    print(f"refresh {summary['date']}: {summary['due']} due, {summary['refreshed']} refreshed, "
          f"{summary['deleted']} deleted, {summary['failed']} failed -> engagement/dt={summary['partition']}/")
    for err in summary["errors"]:
        print(f"  {err}")
    return 0

"""``likerank forget``: remove an author or a post from every table, image store and state,
and tombstone it so it is never collected again (see :mod:`pipeline.core.forget`)."""

from __future__ import annotations

import argparse
import sys

from pipeline.core.config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forget", help="remove an author or a post everywhere, and never collect it again")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--account", metavar="URL_OR_URI",
                     help="the account's URI (e.g. https://mastodon.social/users/alice); hashed with the configured key")
    who.add_argument("--author-key", metavar="KEY", help="the pseudonym as stored in the tables")
    who.add_argument("--post", nargs=2, metavar=("INSTANCE", "POST_ID"), help="one post")
    p.set_defaults(handler=forget_command)


def forget_command(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.core.forget import forget_request

    instance, post_id = args.post or ("", "")
    try:
        removed = forget_request(cfg, account=args.account or "", author_key=args.author_key or "",
                                 instance=instance, post_id=post_id)
    except ValueError as exc:
        print(f"likerank forget: {exc}", file=sys.stderr)
        return 2
    print(format_removed(removed))
    return 0


def format_removed(removed: dict) -> str:
    lines = ["forgot: " + ", ".join(f"{k} {removed[k]}" for k in ("posts", "engagement", "downloads", "images",
                                                                   "image_bytes", "faces", "labels", "predictions"))]
    if removed["labels_runs"]:
        lines.append(f"labels runs changed: {', '.join(removed['labels_runs'])} (their validation results and "
                     "reports were removed; label again before training)")
    if removed["unpublished"]:
        lines.append(f"unpublished labels run {removed['unpublished']}: `likerank label` publishes a new one")
    lines.append("tombstoned: a later scrape skips them and a later labels run excludes them; models already "
                 "trained cannot unlearn them (retrain to be rid of their influence)")
    return "\n".join(lines)

"""``likerank forget``: remove an author or a post from every table, image store, state and
report, and tombstone it so it is never collected again (see :mod:`pipeline.core.forget`).

``--account`` takes any way of naming the person and resolves it through the source's own API
first (:mod:`pipeline.scrape.resolve_account`), since the tables key authors by a hash of their
canonical account URI or DID. Exit status: 0 when something of theirs was removed (or, with
``--dry-run``, would be); 1 when nothing stored matched (the tombstone is still written, so a
later scrape skips them); 2 when the input names nobody, or forget refused to start; 3 when a
copy of a report showing them is on another host and could not be deleted from here.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.core.config import Config

NOTHING_MATCHED, REFUSED, INCOMPLETE = 1, 2, 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forget", help="remove an author or a post everywhere, and never collect it again")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--account", metavar="ACCOUNT",
                     help="the person, as a profile URL (https://host/@alice), alice@host or @alice@host, an account "
                          "URI (https://host/users/alice), a Bluesky handle (alice.bsky.social) or a DID; resolved "
                          "through the source's API (user@host at source.instance_url when that is its host, handles "
                          "at source.bluesky_url), then hashed with the configured key")
    who.add_argument("--author-key", metavar="KEY", help="the pseudonym as stored in the tables")
    who.add_argument("--post", nargs=2, metavar=("INSTANCE", "POST_ID"), help="one post")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print what would be removed (rows per table, images, reports and their thumbnails); "
                           "change nothing")
    mode.add_argument("--queue", action="store_true",
                      help="store the request for the `forget` DAG and print the command that triggers it: the "
                           "DAG run carries an opaque id only, never the account")
    p.set_defaults(handler=forget_command)


def forget_command(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.core.forget import forget_request, queue_forget_request
    from pipeline.core.storage import StorageError
    from pipeline.scrape.resolve_account import AccountNotResolved

    instance, post_id = args.post or ("", "")
    try:
        account_ids = _resolve(args.account, cfg) if args.account else ()
        if args.queue:
            request_id = queue_forget_request(cfg, account_ids=account_ids, author_key=args.author_key or "",
                                              instance=instance, post_id=post_id)
            print(f"queued forget request {request_id}; run it with:\n"
                  f"  airflow dags trigger forget --conf '{{\"request\": \"{request_id}\"}}'")
            return 0
        removed = forget_request(cfg, account_ids=account_ids, author_key=args.author_key or "",
                                 instance=instance, post_id=post_id, dry_run=args.dry_run)
    except (AccountNotResolved, StorageError, ValueError) as exc:
        print(f"likerank forget: {exc}", file=sys.stderr)
        return REFUSED
    print(format_plan(removed) if args.dry_run else format_removed(removed))
    if not removed["matched"]:
        print("likerank forget: nothing stored matched " + _named(args)
              + (" (an earlier forget already removed them)" if removed["already_tombstoned"] else "")
              + ("" if args.dry_run else "; the tombstone is kept, so a later scrape skips them"), file=sys.stderr)
        return NOTHING_MATCHED
    if removed["reports"]["unreachable"] and not args.dry_run:
        print("likerank forget: these copies of a report showing them are on other hosts and were not deleted: "
              + ", ".join(removed["reports"]["unreachable"])
              + " (any `likerank forget` run on those hosts deletes them)", file=sys.stderr)
        return INCOMPLETE
    return 0


def _resolve(account: str, cfg: Config) -> tuple[str, ...]:
    from pipeline.scrape.http import HttpClient
    from pipeline.scrape.resolve_account import resolve_account

    with HttpClient(cfg.scrape) as client:
        found = resolve_account(account, client, mastodon_url=cfg.source.instance_url,
                                bluesky_url=cfg.source.bluesky_url)
    print(f"account: {found.platform} {', '.join(found.ids)} (found by {found.via})")
    return found.ids


def _named(args: argparse.Namespace) -> str:
    if args.account:
        return "the account"
    return "the author key" if args.author_key else "the post"


COUNTS = ("posts", "engagement", "downloads", "images", "image_bytes", "faces", "labels", "predictions", "post_refs")


def format_removed(removed: dict[str, Any]) -> str:
    lines = ["forgot: " + ", ".join(f"{k} {removed[k]}" for k in COUNTS)]
    if removed["labels_runs"]:
        lines.append(f"labels runs changed: {', '.join(removed['labels_runs'])} (their validation results and "
                     "reports were removed; label again before training)")
    if removed["unpublished"]:
        lines.append(f"unpublished labels run {removed['unpublished']}: `likerank label` publishes a new one")
    lines += _report_lines(removed["reports"], "deleted")
    if removed.get("old_versions"):
        lines.append(f"old object versions deleted from the versioned bucket: {removed['old_versions']}")
    lines.append("tombstoned: a later scrape skips them and a later labels run excludes them; models already "
                 "trained cannot unlearn them (retrain to be rid of their influence)")
    return "\n".join(lines)


def format_plan(plan: dict[str, Any]) -> str:
    lines = ["dry run, nothing changed; would forget: " + ", ".join(f"{k} {plan[k]}" for k in COUNTS)]
    if plan["labels_runs"]:
        lines.append(f"labels runs that would change: {', '.join(plan['labels_runs'])} (validation results and "
                     "reports removed" + (f"; {plan['unpublished']} unpublished" if plan["unpublished"] else "") + ")")
    lines += _report_lines(plan["reports"], "would delete")
    return "\n".join(lines)


def _report_lines(reports: dict[str, Any], verb: str) -> list[str]:
    lines = []
    if reports["deleted"]:
        lines.append(f"reports {verb}: {', '.join(reports['deleted'])} ({reports['files']} files, "
                     f"{reports['thumbnails']} thumbnails)")
    if reports["unreachable"]:
        lines.append(f"reports on other hosts, not reachable from here: {', '.join(reports['unreachable'])}")
    return lines

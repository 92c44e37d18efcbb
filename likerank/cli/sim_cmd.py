"""``likerank sim serve|truth|advance``: run the simulator, write its ground truth, move its clock."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from datetime import UTC, datetime

from pipeline.core.config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="the simulated Mastodon and Bluesky services (serve, ground truth, clock)")
    ssub = p.add_subparsers(dest="sim_command", metavar="ACTION")
    ssub.required = True

    def world_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--seed", type=int, help="world seed (default: [simulator] seed)")
        q.add_argument("--posts", type=int, help="statuses in the world (default: [simulator] posts)")
        q.add_argument("--hashtag", dest="hashtags", action="append",
                       help="hashtag of the world, repeatable (default: [simulator] hashtags)")
        q.add_argument("--now", help="the world's 'now' as ISO 8601 UTC (default: 2025-06-02T00:00:00Z)")
        q.add_argument("--bluesky-share", type=float,
                       help="share of accounts on Bluesky, 0..1 (default: [simulator] bluesky_share)")

    serve = ssub.add_parser("serve", help="serve the Mastodon API and Bluesky's XRPC on loopback until SIGINT/SIGTERM")
    world_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    serve.add_argument("--rate-limit", type=int, help="API requests per 5 minutes, 0 = off (default: [simulator] rate_limit)")
    serve.add_argument("--image-cache-mb", type=int, default=256, help="rendered-image cache size, MiB")
    serve.add_argument("--robots-share", type=float, default=0.0,
                       help="share of media files /robots.txt disallows, 0..1 in tenths (default 0: no robots.txt)")
    serve.add_argument("--tdm-header-share", type=float, default=0.0,
                       help="share of media files served with tdm-reservation: 1, 0..1 in tenths (default 0)")
    serve.add_argument("--tdm-file-share", type=float, default=0.0,
                       help="share of media files a /.well-known/tdmrep.json rule reserves, 0..1 in tenths (default 0)")
    serve.set_defaults(handler=serve_sim)

    truth = ssub.add_parser("truth", help="write the world's ground truth (one row per status) as Parquet")
    world_args(truth)
    truth.add_argument("--out", required=True, help="Parquet file to write")
    truth.set_defaults(handler=write_sim_truth)

    adv = ssub.add_parser("advance", help="move a running simulator's clock forward")
    adv.add_argument("--url", required=True, help="the simulator's base URL (printed by `sim serve`)")
    adv.add_argument("--days", type=float, required=True, help="days to advance (>= 0)")
    adv.set_defaults(handler=advance_sim)


def _world_params(args: argparse.Namespace, cfg: Config) -> dict:
    now = datetime.fromisoformat(args.now.replace("Z", "+00:00")) if args.now else None
    if now is not None and now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    out = {
        "seed": cfg.simulator.seed if args.seed is None else args.seed,
        "posts": cfg.simulator.posts if args.posts is None else args.posts,
        "hashtags": tuple(args.hashtags or cfg.simulator.hashtags),
        "bluesky_share": cfg.simulator.bluesky_share if args.bluesky_share is None else args.bluesky_share,
    }
    if now is not None:
        out["now"] = now
    return out


def serve_sim(args: argparse.Namespace, cfg: Config) -> int:
    from simulator import build_world, rate_limit_from_config, start_server
    from simulator.politeness import Politeness

    try:
        politeness = Politeness(args.robots_share, args.tdm_header_share, args.tdm_file_share)
    except ValueError as exc:
        print(f"likerank sim serve: {exc}", file=sys.stderr)
        return 2
    world = build_world(**_world_params(args, cfg))
    per_5_min = cfg.simulator.rate_limit if args.rate_limit is None else args.rate_limit
    sim = start_server(world, host=args.host, port=args.port, rate_limit=rate_limit_from_config(per_5_min),
                       image_cache_mb=args.image_cache_mb, politeness=politeness)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(sim.url, flush=True)  # the one line callers read to find the server
    print(f"likerank sim: seed={world.params.seed} posts={world.params.posts} "
          f"hashtags={','.join(world.params.hashtags)} bluesky_share={world.params.bluesky_share} "
          f"now={sim.now.isoformat()}", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    sim.stop()
    return 0


def write_sim_truth(args: argparse.Namespace, cfg: Config) -> int:
    from simulator import build_world, write_truth

    world = build_world(**_world_params(args, cfg))
    path = write_truth(world, args.out)
    print(f"wrote {len(world.posts)} rows of ground truth to {path}")
    return 0


def advance_sim(args: argparse.Namespace, cfg: Config) -> int:
    import requests

    r = requests.post(f"{args.url.rstrip('/')}/_sim/advance", params={"days": args.days}, timeout=10)
    if r.status_code != 200:
        print(f"likerank sim advance: {args.url} answered {r.status_code}: {r.text.strip()}", file=sys.stderr)
        return 1
    print(json.loads(r.text)["now"])
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m likerank.cli.sim_cmd serve ...``: the sim commands without the full CLI."""
    import logging

    from pipeline.core.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="likerank")
    parser.add_argument("--config", metavar="FILE")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    args = parser.parse_args(["sim", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, overrides=args.overrides)
    except ConfigError as exc:
        print(f"likerank: {exc}", file=sys.stderr)
        return 2
    return int(args.handler(args, cfg) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""``likerank faces``: detect faces in the stored images; ``likerank faces detect PATH...``: in files."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline.core.config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("faces", help="detect faces in stored images not yet detected with the current model",
                       description="Without an action: detect faces in every image of the `images` table that "
                                   "has no finished row for the configured detector, writing `faces` partitions.")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="detect at most N images (0 = all)")
    p.add_argument("--date", default="", metavar="YYYY-MM-DD", help="logical date of the partitions (default: today, UTC)")
    p.set_defaults(handler=detect_stored)
    actions = p.add_subparsers(dest="faces_command", metavar="ACTION")
    d = actions.add_parser("detect", help="run the configured detector on local image files; one JSON line each")
    d.add_argument("paths", nargs="+", metavar="PATH", help="image files")
    d.set_defaults(handler=detect_files)


def detect_stored(args: argparse.Namespace, cfg: Config) -> int:
    from datetime import UTC, datetime

    from tqdm import tqdm

    from pipeline.core.storage import open_storage
    from pipeline.faces.detect_faces import detect_shard, merge_summaries, plan_shards
    from pipeline.faces.detector import DetectorError, FaceDetector

    try:
        detector = FaceDetector(cfg.faces)
    except DetectorError as exc:
        print(f"likerank faces: {exc}", file=sys.stderr)
        return 2
    storage = open_storage(cfg.storage)
    shards = plan_shards(cfg, storage, detector_id=detector.detector_id)
    if args.limit > 0:
        shas = [s for shard in shards for s in shard][: args.limit]
        size = cfg.faces.shard_size
        shards = [shas[i:i + size] for i in range(0, len(shas), size)]
    total = sum(len(s) for s in shards)
    day = args.date or datetime.now(UTC).date().isoformat()
    summaries = []
    started = time.perf_counter()
    with tqdm(total=total, unit="img", desc="faces", disable=None) as bar:
        for i, shas in enumerate(shards):
            summaries.append(detect_shard(cfg, i, shas, day, storage=storage, detector=detector,
                                          on_result=lambda _sha, _det: bar.update(1)))
    seconds = time.perf_counter() - started
    s = merge_summaries(summaries)
    rate = s["images"] / seconds if seconds > 0 else 0.0
    print(f"faces: {s['images']} image(s) in {s['shards']} shard(s), {seconds:.1f} s, {rate:.1f} images/s "
          f"on {detector.provider}")
    print(f"  no face {s['no_face']}, one face {s['one_face']}, several {s['many_faces']}; "
          f"errors: decode {s['decode_error']}, missing {s['missing']}, other {s['error']}")
    print(f"  detector {detector.model_path.name} sha256 {detector.detector_id[:16]}..., "
          f"second passes at {detector.fallback_det_size or '-'} px: {detector.stats.second_passes}")
    if total == 0:
        print("  nothing to do: every stored image already has a row for this detector")
    return 0


def detect_files(args: argparse.Namespace, cfg: Config) -> int:
    from pathlib import Path

    from pipeline.faces.detect_faces import detect_stream
    from pipeline.faces.detector import DetectorError, FaceDetector

    try:
        detector = FaceDetector(cfg.faces)
    except DetectorError as exc:
        print(f"likerank faces detect: {exc}", file=sys.stderr)
        return 2
    items = ((path, Path(path).read_bytes) for path in args.paths)
    failed = 0
    for path, det in detect_stream(detector, items, decode_workers=cfg.faces.decode_workers,
                                   max_pixels=cfg.scrape.max_pixels):
        failed += det.status != "ok"
        print(json.dumps({"path": path, **det.as_dict()}), flush=True)
    return 1 if failed else 0

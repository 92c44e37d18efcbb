"""``likerank score`` and ``likerank model export``: put a trained model to work."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.core.config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score face photos (files or URLs) with a trained model: one JSON line each",
                       description="Finds each photo's largest face, crops it as training did and prints one JSON "
                                   "line per input: prob (of label 1, the upper half of its group), the face box, "
                                   "the model run id and the detector id. A file that cannot be read or a photo "
                                   "without a face is a line with a status and an error; the exit code is 1 if "
                                   "any input failed, else 0.")
    p.add_argument("inputs", nargs="+", metavar="PATH_OR_URL", help="image files or http(s) URLs")
    p.add_argument("--model", metavar="RUN_ID", help="a registered model run (default: the latest, models/latest.json)")
    p.add_argument("--onnx", metavar="FILE", help="an exported model (likerank model export) on onnxruntime, no torch")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="faces scored per batch (default 32)")
    p.add_argument("--output", metavar="FILE.parquet", help="also write the rows as a Parquet table")
    p.add_argument("--best-crop", action="store_true",
                   help="also search square and 4:5 crops around the face and report the best one beside the original")
    p.add_argument("--save-crop", metavar="DIR",
                   help="write each photo's best crop into DIR as <name>.best.jpg (implies --best-crop), at the "
                        "resolution the face was found in (at most faces.det_size pixels a side)")
    p.set_defaults(handler=run_score)

    s = sub.add_parser("serve", help="serve the model over HTTP: POST /score, GET /healthz, and a page at /",
                       description="Serves the latest registered model (or --model / --onnx) until Ctrl-C. "
                                   "Binds 127.0.0.1 unless --host says otherwise; any other address needs a "
                                   "bearer token in $LIKERANK_SERVE_TOKEN (serve.token_env), which every "
                                   "request then sends as 'Authorization: Bearer <token>'. Uploads (JPEG, PNG, "
                                   "WebP) are limited to scrape.max_bytes and decoded under the face stage's "
                                   "guards; the [serve] settings bound connections, time and concurrent work.")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; another needs $LIKERANK_SERVE_TOKEN)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--model", metavar="RUN_ID", help="a registered model run (default: the latest)")
    s.add_argument("--onnx", metavar="FILE", help="an exported model on onnxruntime")
    s.set_defaults(handler=run_serve)

    m = sub.add_parser("model", help="manage trained models (export)")
    msub = m.add_subparsers(dest="model_command", metavar="ACTION")
    msub.required = True
    e = msub.add_parser("export", help="write a registered model as ONNX, with its input size and normalisation")
    e.add_argument("--format", choices=["onnx"], default="onnx", help="the format (onnx)")
    e.add_argument("--model", metavar="RUN_ID", help="the model run (default: the latest)")
    e.add_argument("--output", metavar="FILE.onnx", help="where (default: ./models/<run>.onnx)")
    e.set_defaults(handler=run_export)


def _load_model(args: argparse.Namespace, cfg: Config, command: str):
    """``--onnx FILE``, else the registered ``--model RUN_ID`` (default: the latest); None
    (after saying why on stderr) when there is none to load."""
    from pipeline.core.storage import open_storage
    from scoring.model import ModelUnavailable, OnnxModel

    try:
        if getattr(args, "onnx", None):
            return OnnxModel(args.onnx)  # the ONNX path: no torch is imported
        from scoring.torch_model import load_registry_model

        return load_registry_model(open_storage(cfg.storage), args.model)
    except ModelUnavailable as exc:
        print(f"likerank {command}: {exc}", file=sys.stderr)
        return None


def run_score(args: argparse.Namespace, cfg: Config) -> int:
    from scoring.score import score_inputs

    if args.batch_size < 1:
        print("likerank score: --batch-size must be >= 1", file=sys.stderr)
        return 2
    save_to = None
    if args.save_crop:
        save_to = Path(args.save_crop)
        try:
            save_to.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"likerank score: --save-crop {args.save_crop}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    model = _load_model(args, cfg, "score")
    if model is None:
        return 2
    rows = []
    failed = 0
    for row in score_inputs(cfg, args.inputs, model, batch_size=args.batch_size,
                            best_crop=args.best_crop or save_to is not None, save_crops_to=save_to):
        record = row.record()
        rows.append(record)
        failed += row.status != "ok"
        print(json.dumps(record), flush=True)
    if args.output:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), args.output)
        print(f"likerank score: {len(rows)} rows -> {args.output}", file=sys.stderr)
    return 1 if failed else 0


def run_export(args: argparse.Namespace, cfg: Config) -> int:
    from pathlib import Path

    from scoring.model import spec_path
    from scoring.torch_model import export_onnx

    model = _load_model(args, cfg, "model export")
    if model is None:
        return 2
    out = Path(args.output or f"models/{model.spec.run_id}.onnx")
    export_onnx(model, out)
    print(f"likerank model export: {model.spec.run_id} -> {out} (input {model.spec.image_size} px, "
          f"normalisation in {spec_path(out)})")
    return 0


def run_serve(args: argparse.Namespace, cfg: Config) -> int:
    import os
    import signal
    import threading

    from scoring.serve import ScoringService, ServeRefused, check_exposure, serve

    token = os.environ.get(cfg.serve.token_env) or None
    try:
        check_exposure(args.host, token, cfg.serve.token_env)  # before loading a model: refuse at once
    except ServeRefused as exc:
        print(f"likerank serve: {exc}", file=sys.stderr)
        return 2
    model = _load_model(args, cfg, "serve")
    if model is None:
        return 2
    try:
        server = serve(ScoringService(cfg, model, token=token), args.host, args.port)
    except OSError as exc:
        print(f"likerank serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    limits = cfg.serve
    print(f"likerank serve: model {model.spec.run_id} on {server.url}/ (POST /score, GET /healthz); "
          f"{'bearer token from $' + limits.token_env + ' required' if token else 'no token: this machine only'}; "
          f"{limits.max_concurrent} requests at once, uploads up to {cfg.scrape.max_bytes} bytes; Ctrl-C stops it",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0

"""Face-detection throughput: likerank's stage against insightface's own FaceAnalysis loop.

    .venv/bin/python bench/faces.py [--n 500] [--repeats 3]   # faces.model: the shipped det_500m by default

Both sides run the same SCRFD file (the one ``faces.model`` resolves to) on the same CPU, in the same
process, over the same encoded images, decode included:

* baseline: ``cv2.imdecode`` + ``FaceAnalysis(allowed_modules=['detection']).get(img)``, loaded
  offline from a temporary ``<root>/models/<name>/`` folder; once with insightface 2.1's default
  ``prepare()`` (passes at 128 and 640 px, which also catches tight close-ups, like our
  fallback) and once with ``det_size=(640, 640)`` (a single pass, which misses them);
* likerank: :func:`pipeline.faces.detect_faces.detect_stream` with the config's settings
  (and ``faces.threads=1``: one intra-op thread per inference worker, one worker per core).

Two corpora of >= 500 images each: the simulator's images (256-640 px, what ``make run``
scrapes) when ``simulator`` is importable, else compositions of the package photos;
and the same images re-encoded at phone/social sizes (1080-2048 px long side, JPEG), where
decoding costs more. Also prints a decoder table (Pillow with and without ``draft()``, cv2 with
and without ``IMREAD_REDUCED_*``, and simplejpeg if it is importable) and how often the face
counts of the two sides agree. Runs are interleaved to even out a shared machine's noise, and
each side's figure is the median of ``--repeats`` runs; the headline ratio is the median of the
per-run ratios (run r of one side against run r of the other, measured back to back).

Beside each side stands its physical bound: ``session.run`` alone over the very canvases that
side feeds the model (same model, same threads, same callers, inputs made beforehand), so
the gap to it is decode + pre/post-processing + scheduling overhead.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import load_config  # noqa: E402
from pipeline.faces.decode import decode_fitted, fit_size, resize_rgb  # noqa: E402
from pipeline.faces.detect_faces import detect_stream  # noqa: E402
from pipeline.faces.detector import FaceDetector, resolve_model_path  # noqa: E402

# --------------------------------------------------------------------------- corpora


def simulator_images(n: int, seed: int) -> list[bytes] | None:
    try:
        from simulator import images as sim
    except ImportError:
        return None
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        kind = str(rng.choice(["face", "group", "noface"], p=[0.55, 0.15, 0.30]))
        out.append(sim.render_image(sim.plan_image(rng, sim.draw_factors(rng, kind))))
    return out


def composed_images(n: int, seed: int) -> list[bytes]:
    """Fallback corpus: random crops/scales of the package photos, JPEG (90%) or PNG."""
    from simulator.images import source_path

    rng = random.Random(seed)
    faces = ["t1", "astronaut", "tom_hanks"]
    others = ["chelsea", "coffee", "mask_blue", "mask_white"]
    src = {k: Image.open(source_path(k)).convert("RGB") for k in faces + others}
    out = []
    for _ in range(n):
        im = src[rng.choice(faces) if rng.random() < 0.7 else rng.choice(others)]
        w, h = im.size
        f = rng.uniform(0.75, 1.0)
        cw, ch = int(w * f), int(h * f * rng.uniform(0.8, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((x, y, x + cw, y + ch))
        crop = crop.resize(fit_size(*crop.size, rng.choice([320, 480, 640])), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        crop.save(buf, "PNG") if rng.random() < 0.1 else crop.save(buf, "JPEG", quality=rng.randint(75, 92))
        out.append(buf.getvalue())
    return out


def photo_sized(images: list[bytes], seed: int) -> list[bytes]:
    """The same pictures as phone/social-media JPEGs: 1080-2048 px long side, quality 85-92."""
    rng = random.Random(seed)
    out = []
    for data in images:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        im = im.resize(fit_size(*im.size, rng.choice([1080, 1080, 1350, 1600, 2048])), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=rng.randint(85, 92))
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------- the two sides

# FaceAnalysis tries name as a folder relative to the working directory first: keep it unique.
PACK = "likerank_bench_scrfd"


def face_analysis(model: Path, root: Path, det_size):
    from insightface.app import FaceAnalysis

    pack = root / "models" / PACK
    pack.mkdir(parents=True, exist_ok=True)
    if not (pack / model.name).exists():
        shutil.copy(model, pack / model.name)
    app = FaceAnalysis(name=PACK, root=str(root), allowed_modules=["detection"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=det_size) if det_size else app.prepare(ctx_id=-1)
    return app


def run_baseline(app, images: list[bytes]) -> tuple[float, list[int]]:
    counts = []
    t = time.perf_counter()
    for data in images:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        counts.append(len(app.get(img)) if img is not None else -1)
    return time.perf_counter() - t, counts


def run_likerank(detector: FaceDetector, images: list[bytes], decode_workers: int) -> tuple[float, list[int]]:
    t = time.perf_counter()
    out = [d for _, d in detect_stream(detector, ((i, (lambda b=b: b)) for i, b in enumerate(images)),
                                       decode_workers=decode_workers)]
    return time.perf_counter() - t, [len(d.faces) if d.status == "ok" else -1 for d in out]


# --------------------------------------------------------------------------- decoders


def decoder_table(images: list[bytes], det: int) -> dict[str, float]:
    """ms per JPEG to decode and fit to ``det`` px, single thread, best of 2."""
    jpegs = [d for d in images if d[:2] == b"\xff\xd8"]

    def pil_full(d):
        im = Image.open(io.BytesIO(d)).convert("RGB")
        return resize_rgb(np.asarray(im), fit_size(*im.size, det))

    def pil_draft(d):
        return decode_fitted(d, det).rgb

    def cv2_full(d):
        a = cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)
        return resize_rgb(a, fit_size(a.shape[1], a.shape[0], det))

    def cv2_reduced(d):
        w, h = Image.open(io.BytesIO(d)).size  # header only
        r = max(w, h) / det
        flag = next((fl for f, fl in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                      (2, cv2.IMREAD_REDUCED_COLOR_2)) if r >= f), cv2.IMREAD_COLOR)
        return resize_rgb(cv2.imdecode(np.frombuffer(d, np.uint8), flag), fit_size(w, h, det))

    fns = {"Pillow full": pil_full, "Pillow draft() [used]": pil_draft, "cv2.imdecode": cv2_full,
           "cv2 IMREAD_REDUCED": cv2_reduced}
    try:
        import simplejpeg

        def sj_full(d):
            a = simplejpeg.decode_jpeg(d, "RGB")
            return resize_rgb(a, fit_size(a.shape[1], a.shape[0], det))

        def sj_scaled(d):
            w, h, _, _ = simplejpeg.decode_jpeg_header(d)
            tw, th = fit_size(w, h, det)
            return resize_rgb(simplejpeg.decode_jpeg(d, "RGB", min_width=tw, min_height=th), (tw, th))

        fns |= {"simplejpeg": sj_full, "simplejpeg scaled": sj_scaled}
    except ImportError:
        pass
    cv2.setNumThreads(1)
    best = {}
    for _ in range(2):
        for name, fn in fns.items():
            t = time.perf_counter()
            for d in jpegs:
                fn(d)
            ms = (time.perf_counter() - t) / max(1, len(jpegs)) * 1000
            best[name] = min(ms, best.get(name, ms))
    cv2.setNumThreads(-1)
    return best


# --------------------------------------------------------------------------- session.run bound


def likerank_canvases(detector: FaceDetector, images: list[bytes]) -> list[np.ndarray]:
    """One blob per model run likerank makes on ``images``: the ``det_size`` canvas of each
    decodable image, and the fallback canvas where the first pass found no face."""
    runs = []
    for data in images:
        img = decode_fitted(data, detector.det_size)
        blob = detector.blob(img.rgb, detector.det_size)
        runs.append(blob)
        fitted = (img.rgb.shape[1], img.rgb.shape[0])
        if detector.fallback_det_size and not detector.faces_from_outputs(detector.run(blob), 0, blob.shape[2:],
                                                                         img, fitted):
            small = fit_size(img.width, img.height, detector.fallback_det_size)
            runs.append(detector.blob(resize_rgb(img.rgb, small), detector.fallback_det_size))
    return runs


def session_run_seconds(session, blobs: list[np.ndarray], callers: int) -> float:
    """Wall seconds for ``callers`` threads to ``session.run`` their share of ``blobs``.

    Blobs of one shape share one array (the run time of a convolutional net does not
    depend on pixel values), so the inputs of 500 images fit in memory.
    """
    by_shape: dict[tuple[int, ...], np.ndarray] = {}
    work = [by_shape.setdefault(b.shape, b) for b in blobs]
    input_name, output_names = session.get_inputs()[0].name, [o.name for o in session.get_outputs()]

    def loop(share: list[np.ndarray]) -> None:
        for blob in share:
            session.run(output_names, {input_name: blob})

    for blob in by_shape.values():  # per-shape first-run setup is not part of the bound
        session.run(output_names, {input_name: blob})
    threads = [threading.Thread(target=loop, args=(work[i::callers],)) for i in range(callers)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def baseline_seconds(app, images: list[bytes]) -> float:
    """``session.run`` alone over the canvases FaceAnalysis feeds SCRFD: one per det size per image,
    each det size on insightface's own Session for it, one caller (as ``get()`` is called)."""
    det = app.det_model
    t = 0.0
    for w, h in det.input_sizes:
        canvas = np.zeros((h, w, 3), np.uint8)
        blob = det._prepare_input_blob(canvas, (w, h))
        t += session_run_seconds(det._session_for_input_size((w, h)), [blob] * len(images), 1)
    return t


# --------------------------------------------------------------------------- main


def bench_corpus(label: str, images: list[bytes], model: Path, root: Path, decode_workers: int,
                 repeats: int) -> dict[str, float]:
    """Print the corpus' table; return likerank's ratio to each FaceAnalysis loop."""
    cfg_default = load_config(overrides=[f"faces.model={model}", "faces.providers=CPUExecutionProvider",
                                         "faces.threads=0"])
    cfg_t1 = load_config(overrides=[f"faces.model={model}", "faces.providers=CPUExecutionProvider",
                                    "faces.threads=1"])
    sides = {
        "insightface FaceAnalysis, default det sizes (128+640)": ("base", face_analysis(model, root, None)),
        "insightface FaceAnalysis, det_size 640": ("base", face_analysis(model, root, (640, 640))),
        "likerank, faces.threads=0 (ORT default) x 1 worker": ("ours", FaceDetector(cfg_default.faces)),
        "likerank, faces.threads=1 x cores workers": ("ours", FaceDetector(cfg_t1.faces)),
    }
    warm = images[:10]
    for kind, obj in sides.values():
        run_baseline(obj, warm) if kind == "base" else run_likerank(obj, warm, decode_workers)
    runs: dict[str, list[float]] = {name: [] for name in sides}
    bounds: dict[str, list[float]] = {name: [] for name in sides}
    counts: dict[str, list[int]] = {}
    canvases = likerank_canvases(sides["likerank, faces.threads=1 x cores workers"][1], images)
    for r in range(repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            kind, obj = sides[name]
            sec, c = run_baseline(obj, images) if kind == "base" else run_likerank(obj, images, decode_workers)
            runs[name].append(sec)
            counts[name] = c
            bounds[name].append(baseline_seconds(obj, images) if kind == "base"
                                else session_run_seconds(obj.session, canvases, obj.infer_workers))
    times = {name: statistics.median(v) for name, v in runs.items()}
    bound = {name: statistics.median(v) for name, v in bounds.items()}
    n = len(images)
    mb = sum(map(len, images)) / n / 1e3
    print(f"\n== {label}: {n} images, {mb:.0f} kB average, CPU x{os.cpu_count()}, median of {repeats} "
          f"(load average {os.getloadavg()[0]:.2f} at the end)")
    print(f"  {'side':<55s} {'images/s':>8s} {'ratio':>6s} {'session.run bound':>18s} {'reached':>8s}")
    base_default = n / times[next(iter(sides))]
    for name in sides:
        rate, ceiling = n / times[name], n / bound[name]
        print(f"  {name:<55s} {rate:8.1f} {rate / base_default:5.2f}x {ceiling:11.1f} img/s {rate / ceiling:7.0%}")
    ours = "likerank, faces.threads=1 x cores workers"  # the shipped defaults are the headline
    det = sides[ours][1].det_size
    first = [b.shape[2] * b.shape[3] for b in canvases if max(b.shape[2:]) == det]
    print(f"  (bound: session.run alone over the same canvases, same threads and callers. likerank made "
          f"{len(canvases)} runs on {n} images, {len(canvases) - len(first)} of them fallback passes; its "
          f"{det}-px canvases have {np.mean(first) / det ** 2:.0%} of {det}x{det}'s pixels on average)")
    ratios = {}
    for b in (k for k in sides if sides[k][0] == "base"):
        agree = np.mean(np.array(counts[b]) == np.array(counts[ours]))
        paired = [tb / to for tb, to in zip(runs[b], runs[ours], strict=True)]  # run r of each side, interleaved
        ratios[b] = statistics.median(paired)
        print(f"  likerank (defaults: threads=1) / {b.removeprefix('insightface ')}: x{ratios[b]:.2f}, median of "
              f"{len(paired)} paired runs ({', '.join(f'x{r:.2f}' for r in paired)}); face counts agree on {agree:.1%}")
    found = np.array(counts[ours])
    print(f"  likerank found: no face {np.sum(found == 0)}, one {np.sum(found == 1)}, several {np.sum(found > 1)}, "
          f"errors {np.sum(found < 0)}")
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="images per corpus (>= 500 for the record)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per side; the median counts")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--small-only", action="store_true", help="skip the photo-sized corpus")
    args = ap.parse_args()
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    cfg = load_config()
    model = resolve_model_path(cfg.faces)
    t = time.perf_counter()
    small = simulator_images(args.n, args.seed)
    source = "simulator images"
    if small is None:
        small, source = composed_images(args.n, args.seed), "package-photo compositions"
    large = [] if args.small_only else photo_sized(small, args.seed)
    print(f"load average {os.getloadavg()[0]:.2f} at the start")
    print(f"model {model.name}, det_size {cfg.faces.det_size}, fallback {cfg.faces.fallback_det_size}, "
          f"decode_workers {cfg.faces.decode_workers}; corpora built in {time.perf_counter() - t:.1f} s ({source})")

    print(f"\n== decode + fit to {cfg.faces.det_size} px, ms per JPEG (one thread)")
    tables = {"simulator-sized": decoder_table(small, cfg.faces.det_size)}
    if large:
        tables["photo-sized"] = decoder_table(large, cfg.faces.det_size)
    print(f"  {'decoder':<24s}" + "".join(f"{k:>18s}" for k in tables))
    for name in next(iter(tables.values())):
        print(f"  {name:<24s}" + "".join(f"{tables[k][name]:18.2f}" for k in tables))

    headline = {}
    with tempfile.TemporaryDirectory(prefix="likerank-bench-") as tmp:
        for label, images in (("simulator-sized", small), ("photo-sized", large)):
            if images:
                name = f"{label} ({source})" if label == "simulator-sized" else f"{label} (1080-2048 px JPEG)"
                ratios = bench_corpus(name, images, model, Path(tmp), cfg.faces.decode_workers, args.repeats)
                headline[label] = next(iter(ratios.values()))  # against FaceAnalysis' default loop
    print("\n== likerank / insightface FaceAnalysis (default det sizes): "
          + ", ".join(f"x{r:.2f} {label}" for label, r in headline.items())
          + f"; load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())

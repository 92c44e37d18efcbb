"""Face-detection throughput: likerank's stage against insightface's own FaceAnalysis loop.

    .venv/bin/python bench/faces.py [--n 500]          # faces.model: the shipped det_500m by default

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
counts of the two sides agree. Runs are interleaved to even out a shared machine's noise.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sys
import tempfile
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


# --------------------------------------------------------------------------- main


def bench_corpus(label: str, images: list[bytes], model: Path, root: Path, decode_workers: int,
                 repeats: int) -> None:
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
    times: dict[str, float] = {}
    counts: dict[str, list[int]] = {}
    for r in range(repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            kind, obj = sides[name]
            sec, c = run_baseline(obj, images) if kind == "base" else run_likerank(obj, images, decode_workers)
            times[name] = min(sec, times.get(name, sec))
            counts[name] = c
    n = len(images)
    mb = sum(map(len, images)) / n / 1e3
    print(f"\n== {label}: {n} images, {mb:.0f} kB average, CPU x{os.cpu_count()}, best of {repeats}")
    base_default = n / times[next(iter(sides))]
    for name in sides:
        rate = n / times[name]
        print(f"  {name:<55s} {rate:7.1f} images/s   x{rate / base_default:4.2f}")
    ours = "likerank, faces.threads=1 x cores workers"  # the shipped defaults are the headline
    for b in (k for k in sides if sides[k][0] == "base"):
        agree = np.mean(np.array(counts[b]) == np.array(counts[ours]))
        print(f"  likerank (defaults: threads=1) / {b.removeprefix('insightface ')}: x{times[b] / times[ours]:.2f}, "
              f"face counts agree on {agree:.1%}")
    found = np.array(counts[ours])
    print(f"  likerank found: no face {np.sum(found == 0)}, one {np.sum(found == 1)}, several {np.sum(found > 1)}, "
          f"errors {np.sum(found < 0)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="images per corpus (>= 500 for the record)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; the best counts")
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
    print(f"model {model.name}, det_size {cfg.faces.det_size}, fallback {cfg.faces.fallback_det_size}, "
          f"decode_workers {cfg.faces.decode_workers}; corpora built in {time.perf_counter() - t:.1f} s ({source})")

    print(f"\n== decode + fit to {cfg.faces.det_size} px, ms per JPEG (one thread)")
    tables = {"simulator-sized": decoder_table(small, cfg.faces.det_size)}
    if large:
        tables["photo-sized"] = decoder_table(large, cfg.faces.det_size)
    print(f"  {'decoder':<24s}" + "".join(f"{k:>18s}" for k in tables))
    for name in next(iter(tables.values())):
        print(f"  {name:<24s}" + "".join(f"{tables[k][name]:18.2f}" for k in tables))

    with tempfile.TemporaryDirectory(prefix="likerank-bench-") as tmp:
        bench_corpus(f"simulator-sized ({source})", small, model, Path(tmp), cfg.faces.decode_workers, args.repeats)
        if large:
            bench_corpus("photo-sized (1080-2048 px JPEG)", large, model, Path(tmp), cfg.faces.decode_workers,
                         args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

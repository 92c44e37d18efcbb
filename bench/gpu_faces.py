"""Face-detection throughput on one GPU: onnxruntime-gpu, CUDA EP (and TensorRT EP if usable).

    .venv/bin/python bench/gpu_faces.py [--budget 240] [--det-2-5g /path/det_2.5g.onnx]
    .venv/bin/python bench/gpu_faces.py --smoke      # CPU provider, tiny sizes: catches typos here

Without a usable CUDA device it says why and exits 0 (``make bench`` runs every ``bench/*.py``),
or 2 with ``--require-gpu``, as ``bench/gpu.sh`` calls it.

Called by ``bench/gpu.sh``. For each model (the shipped det_500m; det_2.5g only when a path is
given, as ``--det-2-5g`` or ``DET_2_5G``: it is not in this repository and nothing is
downloaded) and each execution provider it measures, at 640 px:

* model only: ``run_with_iobinding`` on a batch already on the device (the GPU's ceiling);
* decode excluded: decoded, fitted uint8 canvases in host memory -> device -> SCRFD -> host ->
  boxes (post-processing included);
* decode included: JPEG bytes -> decode threads (:func:`pipeline.faces.decode.decode_fitted`
  and the perceptual hash, as the stage does) -> the same batched path, overlapped;
* the production stage, :func:`pipeline.faces.detect_faces.detect_stream` with a CUDA
  :class:`~pipeline.faces.detector.FaceDetector` (batch 1, since insightface's SCRFD files
  fix the batch axis to 1).

Batching: the SCRFD files declare batch 1 and put the batch axis *inside* each output's rows
(Transpose to H, W, N, C before the final Reshape). :func:`batchable_model` rewrites the graph
in memory: a dynamic batch of uint8 NHWC canvases in, the normalisation ((x - 127.5) / 128)
done on the device (a quarter of the float32 upload), and :func:`split_outputs` takes the rows
of image ``n`` back out. Before timing, the rewrite is checked against the CPU stage on real
photos (same faces, boxes within 1.5 px): a wrong rewrite must not produce a fast figure.

Two corpora of simulator images, cycled: as rendered (256-640 px) and re-encoded at phone
sizes (1080-2048 px JPEG), where decoding costs ~4x more. The anchor is 2,000 images/s end to
end (decode included). Every measurement stops at its time limit, and the whole run at
``--budget`` seconds; what did not fit is printed as skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from faces import photo_sized, simulator_images  # noqa: E402  (bench/faces.py: the same corpora)

from pipeline.core.config import load_config  # noqa: E402
from pipeline.faces.decode import FittedImage, decode_fitted  # noqa: E402
from pipeline.faces.detector import CPU, CUDA, SHIPPED_MODEL, FaceDetector  # noqa: E402
from pipeline.faces.phash import perceptual_hash  # noqa: E402

TRT = "TensorrtExecutionProvider"
FACES_ANCHOR_IMG_S = 2000.0  # the target: images/s end to end, decode included, one GPU
INPUT = "image"  # the rewritten model's input: uint8 N x H x W x 3 (RGB)
DET_2_5G_HELP = ("det_2.5g (SCRFD-2.5GF) is not in this repository and is not downloaded at run time; "
                 "pass --det-2-5g /path/det_2.5g.onnx or DET_2_5G=/path/det_2.5g.onnx to measure it")


# --------------------------------------------------------------------------- model rewrite


def batchable_model(path: Path) -> bytes:
    """SCRFD ``path`` with a dynamic batch of uint8 NHWC RGB canvases as input, normalised in the graph."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    (old,) = graph.input  # SCRFD: one float32 input 1x3xHxW
    graph.input.remove(old)
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", "H", "W", 3]))
    graph.initializer.extend([
        helper.make_tensor("likerank_mean", TensorProto.FLOAT, [], [127.5]),
        helper.make_tensor("likerank_scale", TensorProto.FLOAT, [], [1.0 / 128.0]),  # exact: a power of 2
    ])
    pre = [
        helper.make_node("Cast", [INPUT], ["likerank_f32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["likerank_f32"], ["likerank_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Sub", ["likerank_nchw", "likerank_mean"], ["likerank_centred"]),
        helper.make_node("Mul", ["likerank_centred", "likerank_scale"], [old.name]),
    ]
    for i, node in enumerate(pre):
        graph.node.insert(i, node)
    for out in graph.output:  # row counts now grow with the batch
        for dim in out.type.tensor_type.shape.dim:
            dim.ClearField("dim_value")
    return model.SerializeToString()


def split_outputs(outs: list[np.ndarray], n: int, anchors: int) -> list[list[np.ndarray]]:
    """Per image, the outputs as a batch-1 run would give them.

    Each output is rows (h, w, image, anchor) x k: the graph transposes to H, W, N, C before
    its final Reshape(-1, k), so image ``i`` is every ``n``-th group of ``anchors`` rows.
    """
    per_image = []
    for i in range(n):
        per_image.append([o.reshape(-1, n, anchors, o.shape[1])[:, i].reshape(-1, o.shape[1]) for o in outs])
    return per_image


# --------------------------------------------------------------------------- runner


@dataclass
class Runner:
    """One onnxruntime session of the batchable model on one provider, run through IO binding."""

    session: object
    device: str  # "cuda" or "cpu": where inputs and outputs are bound
    provider: str

    @classmethod
    def create(cls, model_bytes: bytes, providers: list, device: str) -> Runner:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(model_bytes, so, providers=providers)
        return cls(session=session, device=device, provider=session.get_providers()[0])

    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run_host(self, canvases: np.ndarray) -> list[np.ndarray]:
        """Host uint8 batch in, host outputs back (what the decode paths pay)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT, canvases)
        for name in self.output_names():
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def device_loop(self, canvases: np.ndarray, seconds: float) -> float:
        """Images/s of runs on a batch that stays on the device, outputs left there too."""
        import onnxruntime as ort

        value = ort.OrtValue.ortvalue_from_numpy(canvases, self.device, 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(INPUT, value)
        for name in self.output_names():
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)  # first run: allocation, algorithm search
        runs, t0 = 0, time.perf_counter()
        while True:
            self.session.run_with_iobinding(binding)
            runs += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return runs * len(canvases) / elapsed


# --------------------------------------------------------------------------- paths


def canvas_batch(imgs: list[FittedImage], size: int) -> np.ndarray:
    """Fitted images top-left in zeroed ``size`` x ``size`` uint8 canvases (0 = SCRFD's letterbox)."""
    out = np.zeros((len(imgs), size, size, 3), np.uint8)
    for i, img in enumerate(imgs):
        h, w = img.rgb.shape[:2]
        out[i, :h, :w] = img.rgb
    return out


def faces_of_batch(runner: Runner, detector: FaceDetector, imgs: list[FittedImage], size: int) -> list[list]:
    """One batched run over ``imgs``; the faces of each, in original pixels."""
    outs = runner.run_host(canvas_batch(imgs, size))
    per_image = split_outputs(outs, len(imgs), detector.model._num_anchors)
    return [detector.faces_from_outputs(o, 0, (size, size), img, (img.rgb.shape[1], img.rgb.shape[0]))
            for o, img in zip(per_image, imgs, strict=True)]


def cycle_batches(items: list, batch: int) -> Callable[[], list]:
    """A function that returns the next ``batch`` items, going round ``items`` forever."""
    state = {"i": 0}

    def take() -> list:
        i = state["i"]
        state["i"] = (i + batch) % len(items)
        return [items[(i + k) % len(items)] for k in range(batch)]

    return take


def decode_excluded(runner: Runner, detector: FaceDetector, imgs: list[FittedImage], batch: int,
                    seconds: float) -> float:
    """Images/s from decoded images in host memory to faces: canvas, upload, run, download, boxes."""
    take = cycle_batches(imgs, batch)
    faces_of_batch(runner, detector, take(), detector.det_size)  # warm-up at this batch size
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(faces_of_batch(runner, detector, take(), detector.det_size))
    return n / (time.perf_counter() - t0)


def decode_included(runner: Runner, detector: FaceDetector, images: list[bytes], batch: int, workers: int,
                    seconds: float) -> float:
    """Images/s from image bytes to faces: ``workers`` threads decode, fit and hash (the stage's
    decode-thread work) while the calling thread runs batches; four batches are in flight."""
    take = cycle_batches(images, batch)
    size = detector.det_size

    def decode_and_hash(data: bytes) -> FittedImage:
        img = decode_fitted(data, size)
        perceptual_hash(img.rgb)
        return img

    with ThreadPoolExecutor(workers, thread_name_prefix="gpu-bench-decode") as pool:
        def submit() -> list[Future]:
            return [pool.submit(decode_and_hash, data) for data in take()]

        inflight = [submit() for _ in range(4)]
        faces_of_batch(runner, detector, [f.result() for f in inflight.pop(0)], size)  # warm-up
        inflight.append(submit())
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            imgs = [f.result() for f in inflight.pop(0)]
            inflight.append(submit())
            n += len(faces_of_batch(runner, detector, imgs, size))
        rate = n / (time.perf_counter() - t0)
        for futures in inflight:
            for f in futures:
                f.cancel()
    return rate


def production_stream(detector: FaceDetector, images: list[bytes], workers: int, seconds: float) -> float:
    """Images/s of the stage itself (:func:`detect_stream`, the detector's own batch and threads)."""
    from pipeline.faces.detect_faces import detect_stream

    chunk = images * max(1, 512 // len(images))
    list(detect_stream(detector, ((i, (lambda b=b: b)) for i, b in enumerate(chunk[:16])), decode_workers=workers))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in detect_stream(detector, ((i, (lambda b=b: b)) for i, b in enumerate(chunk)), decode_workers=workers):
            n += 1
    return n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- checks


def check_rewrite(runner: Runner, detector: FaceDetector, size: int = 640) -> tuple[list[int], str]:
    """Batched rewrite on this provider vs the CPU stage at ``size`` px, on real photos in one batch:
    the face counts, and '' if both agree, else what differs."""
    from simulator.images import source_path

    names = ["t1", "astronaut", "chelsea", "coffee"]  # 6, 1, 0, 0 faces at 640 px
    imgs = [decode_fitted(source_path(n).read_bytes(), size) for n in names]
    got = faces_of_batch(runner, detector, imgs, size)
    problems = []
    for name, img, faces in zip(names, imgs, got, strict=True):
        # the same square canvas, normalised on the host as the stage does: only the rewrite differs
        square = canvas_batch([img], size).transpose(0, 3, 1, 2).astype(np.float32)
        blob = (square - 127.5) * np.float32(1.0 / 128.0)
        ref = detector.faces_from_outputs(detector.run(blob), 0, blob.shape[2:], img,
                                          (img.rgb.shape[1], img.rgb.shape[0]))
        if len(ref) != len(faces):
            problems.append(f"{name}: {len(faces)} faces, CPU stage {len(ref)}")
            continue
        key = lambda f: (round(f.x1), round(f.y1))  # noqa: E731 - a sort key
        for a, b in zip(sorted(ref, key=key), sorted(faces, key=key), strict=True):
            worst = max(abs(a.x1 - b.x1), abs(a.y1 - b.y1), abs(a.x2 - b.x2), abs(a.y2 - b.y2))
            if worst > 1.5 or abs(a.score - b.score) > 0.01:
                problems.append(f"{name}: box off by {worst:.2f} px, score by {abs(a.score - b.score):.4f}")
    return [len(f) for f in got], "; ".join(problems)


def cuda_problem() -> str:
    """'' when onnxruntime can run on a CUDA device here, else why not."""
    import onnxruntime as ort

    from pipeline.faces.detector import cuda_device_present

    if CUDA not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no {CUDA} (providers: {ort.get_available_providers()}); "
                "install onnxruntime-gpu: GPU=1 make setup")
    if not cuda_device_present():
        return "no CUDA device: libcuda.so.1 is missing or reports 0 devices (nvidia-smi?)"
    return ""


# --------------------------------------------------------------------------- main


class Budget:
    """The run's time budget: each measurement gets at most what is left."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def provider_configs(smoke: bool, max_batch: int, cache_dir: str) -> list[tuple[str, list, str]]:
    """(label, providers, device) for each execution provider to measure."""
    import onnxruntime as ort

    if smoke:
        return [("CPU EP (smoke)", [CPU], "cpu")]
    configs = [("CUDA EP", [CUDA], "cuda")]
    if TRT in ort.get_available_providers():
        shapes = {"trt_profile_min_shapes": f"{INPUT}:1x640x640x3",
                  "trt_profile_opt_shapes": f"{INPUT}:{max_batch}x640x640x3",
                  "trt_profile_max_shapes": f"{INPUT}:{max_batch}x640x640x3"}
        for fp16 in (True, False):  # fp16 first: the usual deployment, if the budget allows only one
            opts = {"trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": cache_dir, **shapes}
            configs.append((f"TensorRT EP {'fp16' if fp16 else 'fp32'}", [(TRT, opts), CUDA], "cuda"))
    else:
        print(f"  TensorRT EP: not in this onnxruntime build ({ort.get_available_providers()}); skipped")
    return configs


def bench_model(name: str, path: Path, corpora: dict[str, list[bytes]], args: argparse.Namespace,
                budget: Budget) -> None:
    overrides = [f"faces.model={path}", f"faces.providers={CPU if args.smoke else CUDA + ',' + CPU}",
                 f"faces.det_size={args.size}", "faces.fallback_det_size=0"]
    cpu_ref = FaceDetector(load_config(overrides=[*overrides[:1], f"faces.providers={CPU}", *overrides[2:]]).faces)
    model_bytes = batchable_model(path)
    decoded = {label: [decode_fitted(b, args.size) for b in imgs] for label, imgs in corpora.items()}
    print(f"\n== {name} ({path.name}), {args.size} px, batches {args.batches}, "
          f"{args.workers} decode threads, {args.seconds:g} s per figure")
    det = FaceDetector(load_config(overrides=overrides).faces)
    for corpus, images in list(corpora.items())[:1 if args.smoke else None]:
        if not budget.allows(args.seconds):
            print(f"  production stage (detect_stream), {corpus}: skipped (budget)")
            continue
        rate = production_stream(det, images, args.workers, args.seconds)
        print(f"  production stage (detect_stream, {det.provider}, batch {det.max_batch}, {args.workers} decode "
              f"threads), {corpus}: {rate:.0f} images/s = {rate / FACES_ANCHOR_IMG_S:.2f}x the anchor")
    with tempfile.TemporaryDirectory(prefix="likerank-trt-") as cache:
        for label, providers, device in provider_configs(args.smoke, max(args.batches), cache):
            # TensorRT builds its engine on the first run (tens of seconds): start it only with room left
            need = (60 if label.startswith("TensorRT") else 0) + 3 * args.seconds
            if not budget.allows(need):
                print(f"  {label}: skipped, {budget.left():.0f} s of the budget left (needs {need:.0f} s)")
                continue
            t0 = time.perf_counter()
            try:
                runner = Runner.create(model_bytes, providers, device)
            except Exception as exc:  # noqa: BLE001 - an unusable provider is a line, not the end
                print(f"  {label}: cannot create the session: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
            if runner.provider != wanted:
                print(f"  {label}: onnxruntime fell back to {runner.provider}; skipped")
                continue
            counts, problem = check_rewrite(runner, cpu_ref)
            print(f"  {label}: session {time.perf_counter() - t0:.1f} s; batched rewrite vs CPU stage at 640 px "
                  f"(faces {counts}): {'MISMATCH: ' + problem if problem else 'same faces, boxes within 1.5 px'}")
            first = next(iter(decoded.values()))
            best_batch, best_rate = args.batches[0], 0.0
            for batch in args.batches:
                if not budget.allows(args.seconds):
                    print(f"    model only, batch {batch}: skipped (budget)")
                    continue
                canvases = canvas_batch(cycle_batches(first, batch)(), args.size)
                rate = runner.device_loop(canvases, args.seconds)
                print(f"    model only (input on device), batch {batch:>3}: {rate:9.0f} images/s")
                if rate > best_rate:
                    best_batch, best_rate = batch, rate
            for corpus, images in corpora.items():
                if not budget.allows(2 * args.seconds):
                    print(f"    {corpus}: skipped (budget)")
                    continue
                excl = decode_excluded(runner, cpu_ref, decoded[corpus], best_batch, args.seconds)
                incl = decode_included(runner, cpu_ref, images, best_batch, args.workers, args.seconds)
                print(f"    {corpus:<15} batch {best_batch}: decode excluded {excl:8.0f} images/s, "
                      f"decode included {incl:8.0f} images/s = {incl / FACES_ANCHOR_IMG_S:.2f}x the "
                      f"{FACES_ANCHOR_IMG_S:.0f} img/s anchor")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1",
                    help="CPU provider, tiny sizes, a few iterations (env SMOKE=1)")
    ap.add_argument("--require-gpu", action="store_true", help="no usable GPU is an error (exit 2), not a skip")
    ap.add_argument("--det-2-5g", default=os.environ.get("DET_2_5G", ""), help="path to det_2.5g.onnx (env DET_2_5G)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole run")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per figure")
    ap.add_argument("--images", type=int, default=256, help="images per corpus (cycled)")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode threads")
    args = ap.parse_args()
    args.size = 640
    if args.smoke:  # tiny everything: the point is to run every line once
        args.budget, args.seconds, args.images, args.batches = min(args.budget, 120.0), 0.3, 6, [1, 2]
        args.size, args.workers = 160, 2
    budget = Budget(args.budget)
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    if hasattr(ort, "preload_dlls") and not args.smoke:
        try:  # the CUDA/cuDNN libraries of the nvidia-* wheels, before the first session
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - the session's own error says more, later
            print(f"onnxruntime.preload_dlls(): {type(exc).__name__}: {exc}")
    problem = "" if args.smoke else cuda_problem()
    if problem:
        print(f"gpu_faces: {'' if args.require_gpu else 'skipped: '}{problem}", file=sys.stderr)
        return 2 if args.require_gpu else 0
    t = time.perf_counter()
    small = simulator_images(args.images, 11)
    if small is None:
        print("gpu_faces: the simulator package is not importable (run from the repository root)", file=sys.stderr)
        return 2
    corpora = {"simulator-sized": small, "photo-sized": photo_sized(small, 11)}
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}; corpora of "
          f"{args.images} images built in {time.perf_counter() - t:.1f} s")
    models = [("det_500m (shipped)", SHIPPED_MODEL)]
    if args.det_2_5g:
        path = Path(args.det_2_5g).expanduser()
        if not path.is_file():
            print(f"gpu_faces: det_2.5g: {path} is not a file. {DET_2_5G_HELP}", file=sys.stderr)
            return 2
        models.append(("det_2.5g", path))
    else:
        print(f"det_2.5g: skipped. {DET_2_5G_HELP}")
    for i, (name, path) in enumerate(models):  # the time left, shared evenly by the models still to run
        bench_model(name, path, corpora, args, Budget(budget.left() / (len(models) - i)))
    print(f"\ngpu_faces: done, {args.budget - budget.left():.0f} s of the {args.budget:.0f} s budget used")
    return 0


if __name__ == "__main__":
    sys.exit(main())

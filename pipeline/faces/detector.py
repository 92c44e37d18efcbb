"""The SCRFD face detector: model resolution, loading through insightface, inference.

insightface loads the model (``insightface.model_zoo.get_model``: it recognises SCRFD by its
output count and knows its strides, anchors and keypoints) and its post-processing is reused
(``distance2bbox``, ``distance2kps``, ``SCRFD.nms``). What is ours is the input side: the
image arrives already decoded and fitted to ``det_size`` (:mod:`pipeline.faces.decode`), is
normalised once into a float32 letterbox canvas, and the ONNX session is run directly, so
the work insightface's ``detect()`` would repeat per call (a second ``cv2.resize``, the
full-canvas ``cv2.dnn.blobFromImage`` with its colour swap, and insightface 2.1's default
second pass at 128 px) is not done.

On CPU the canvas is cut to the picture: SCRFD is fully convolutional, so a 640x480 picture
needs a 640x512 canvas, not 640x640 (:meth:`FaceDetector.canvas_shape`). One 32-px cell of
letterbox is kept below and right of the picture, because the network's own zero padding at
a closer edge shifts boxes near it. Measured on bench/faces.py's simulator corpus (300
images, 325 faces, det_500m): face counts identical to the full square canvas, boxes within
p99 0.5 px / max 3.3 px at 640 (the square canvas and insightface's own ``detect`` differ by
up to 2.4 px already, from the resize), scores within 0.005; 12-16 % less inference time.
The GPU keeps the square canvas: a batch needs one shape, and cuDNN searches its
convolution algorithms once per shape.

Two passes, by design: at 640 px SCRFD misses a tight close-up (insightface's own
``Tom_Hanks_54745.png``, a 112x112 face-filling crop) because the face is larger than its
biggest anchors; the second pass at ``fallback_det_size`` runs only when the first finds no
face, so it costs about a quarter of a pass on face-less images and nothing on the rest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.config import FacesConfig
from pipeline.faces.decode import FittedImage, fit_size, resize_rgb

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
INSIGHTFACE_ROOT = "~/.insightface"  # where insightface keeps (and downloads) its model packs

# SCRFD's input normalisation (insightface's SCRFD.input_mean / input_std).
_MEAN, _STD = 127.5, 128.0
# A letterbox pixel is uint8 0 in insightface's preprocessing; normalised that is:
_PAD = (0.0 - _MEAN) / _STD
# SCRFD's coarsest feature stride, pixels: canvas sides are multiples of it (anchor grids).
_STRIDE = 32


class DetectorError(RuntimeError):
    """The detector cannot be set up (model missing, not SCRFD, no usable provider)."""


@dataclass(frozen=True)
class Face:
    """One detected face in original-image pixels (box clipped to the image)."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    landmarks: tuple[float, ...]  # x,y of left eye, right eye, nose, left and right mouth corner

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    def as_dict(self) -> dict:
        return {"x1": self.x1, "y1": self.y1, "x2": self.x2, "y2": self.y2,
                "score": self.score, "landmarks": list(self.landmarks)}


# --------------------------------------------------------------------------- model files


#: The detector that ships with the package (see ``models/README.md``): SCRFD-500MF.
SHIPPED_MODEL = Path(__file__).with_name("models") / "det_500m.onnx"
SHIPPED_MODEL_SHA256 = "5e4447f50245bbd7966bd6c0fa52938c61474a04ec7def48753668a9d8b4ea3a"
#: An insightface model pack is named by a bare word (``buffalo_l``, ``buffalo_sc``, ...).
_PACK_NAME = re.compile(r"[A-Za-z0-9_-]+")


def resolve_model_path(cfg: FacesConfig, *, insightface_root: str = INSIGHTFACE_ROOT) -> Path:
    """The SCRFD ``.onnx`` file ``faces.model`` names, in this order:

    1. empty: the SCRFD-500MF detector shipped with the package (its sha256 is checked);
    2. an existing path: that ``.onnx`` file, or the ``det_*.onnx`` of a model-pack folder
       (or of an insightface root laid out as ``<root>/models/<pack>/``);
    3. a bare pack name (``buffalo_l``, ``buffalo_sc``, ...): insightface's own pack loading,
       which downloads the pack to ``~/.insightface/models`` on first use.
    """
    if not cfg.model:
        return shipped_model()
    path = Path(cfg.model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        found = _find_detector(path) or _find_detector_in_root(path)
        if found:
            return found
        raise DetectorError(f"faces.model {cfg.model!r}: folder has no det_*.onnx (nor models/<pack>/det_*.onnx)")
    if _PACK_NAME.fullmatch(cfg.model):
        return insightface_pack(cfg.model, insightface_root)
    raise DetectorError(f"faces.model {cfg.model!r}: no such file or folder, and not an insightface pack name")


def shipped_model() -> Path:
    """The packaged SCRFD-500MF, after checking that it is the file its README describes."""
    if not SHIPPED_MODEL.is_file():
        raise DetectorError(f"face detector: the shipped model {SHIPPED_MODEL} is missing; reinstall likerank")
    sha = file_sha256(SHIPPED_MODEL)
    if sha != SHIPPED_MODEL_SHA256:
        raise DetectorError(f"face detector: the shipped model {SHIPPED_MODEL} has sha256 {sha}, "
                            f"expected {SHIPPED_MODEL_SHA256}; the file is damaged, reinstall likerank")
    return SHIPPED_MODEL


def insightface_pack(name: str, insightface_root: str = INSIGHTFACE_ROOT) -> Path:
    """The ``det_*.onnx`` of insightface pack ``name``, downloaded by insightface if absent."""
    pack_dir = Path(insightface_root).expanduser() / "models" / name
    found = _find_detector(pack_dir)
    if found:
        return found
    try:  # insightface's own fetch of its model packs (a GitHub release zip)
        from insightface.utils.storage import ensure_available

        ensure_available("models", name, root=insightface_root)
    except Exception as exc:  # noqa: BLE001 - any failure to fetch means: tell the user what to set
        raise DetectorError(
            f"face detector: insightface model pack {name!r} is not in {pack_dir} and could not "
            f"be downloaded ({type(exc).__name__}: {exc}); set faces.model (env LIKERANK_FACES__MODEL) "
            "to a local SCRFD .onnx file or model-pack folder, or leave it empty for the shipped SCRFD-500MF") from None
    found = _find_detector(pack_dir)
    if not found:
        raise DetectorError(f"face detector: insightface model pack {name!r} in {pack_dir} has no det_*.onnx")
    return found


def _find_detector_in_root(root: Path) -> Path | None:
    packs = sorted((root / "models").glob("*/det_*.onnx"))
    return packs[0] if packs else None


def _find_detector(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = sorted(folder.glob("det_*.onnx")) or sorted(folder.glob("*/det_*.onnx"))
    return found[0] if found else None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def select_providers(requested: list[str], available: list[str] | None = None) -> list[str]:
    """``requested`` in order, keeping only those this onnxruntime build has."""
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    chosen = [p for p in requested if p in available]
    if not chosen:
        raise DetectorError(
            f"faces.providers {requested}: none is available in this onnxruntime (it has {available})")
    return chosen


def cuda_device_present() -> bool:
    """True when onnxruntime has the CUDA provider and the driver reports a device."""
    import onnxruntime

    if CUDA not in onnxruntime.get_available_providers():
        return False
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except OSError:
        return False


# --------------------------------------------------------------------------- detector


@dataclass
class _Stats:
    second_passes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class FaceDetector:
    """SCRFD on onnxruntime, configured by the ``[faces]`` section.

    Thread-safe: :meth:`detect` may be called from several threads at once (onnxruntime
    sessions are; each call allocates its own buffers). :attr:`infer_workers` says how many
    concurrent callers make sense for the provider and thread settings.
    """

    def __init__(self, cfg: FacesConfig, *, model_path: str | Path | None = None):
        import onnxruntime
        from insightface.model_zoo import get_model

        self.cfg = cfg
        self.model_path = Path(model_path) if model_path else resolve_model_path(cfg)
        self.detector_id = file_sha256(self.model_path)
        self.det_size = cfg.det_size
        self.fallback_det_size = cfg.fallback_det_size if cfg.fallback_det_size != cfg.det_size else 0
        self.det_thresh = cfg.det_thresh
        providers = select_providers(cfg.providers)

        so = onnxruntime.SessionOptions()
        so.log_severity_level = 3  # the model declares 640-px output shapes; other sizes warn per run
        if cfg.threads:
            so.intra_op_num_threads = cfg.threads
        # Decode threads share the cores; spinning intra-op workers would steal their time.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            model = get_model(str(self.model_path), providers=providers, sess_options=so)
        except Exception as exc:  # noqa: BLE001 - a broken/unknown file: name it
            raise DetectorError(f"face detector {self.model_path}: cannot load: {type(exc).__name__}: {exc}") from None
        if model is None or getattr(model, "taskname", None) != "detection" or not hasattr(model, "use_kps"):
            raise DetectorError(f"face detector {self.model_path}: not an SCRFD detection model")
        if not model.use_kps:
            raise DetectorError(f"face detector {self.model_path}: SCRFD without keypoints; likerank needs landmarks")
        model.det_thresh = cfg.det_thresh
        self.model = model
        self.session = model.session
        self.input_name = model.input_name
        self.output_names = model.output_names
        self.provider = self.session.get_providers()[0]
        self.on_gpu = self.provider == CUDA
        batch_dim = self.session.get_inputs()[0].shape[0]
        # A dynamic batch axis (a name or None) lets several images share one run.
        self.max_batch = 1 if isinstance(batch_dim, int) else (16 if self.on_gpu else 1)
        if self.on_gpu or not cfg.threads:
            self.infer_workers = 1
        else:  # n single-digit-thread runs in parallel beat one wide run on a few cores
            self.infer_workers = max(1, (os.cpu_count() or 1) // cfg.threads)
        self.stats = _Stats()
        if CUDA in cfg.providers and self.provider != CUDA:
            # A warning only where the CUDA build is installed and still failed (a lost GPU, a
            # driver mismatch); on a machine with the CPU build, CPU is simply what there is.
            cuda_installed = CUDA in onnxruntime.get_available_providers()
            log.log(logging.WARNING if cuda_installed else logging.INFO,
                    "face detector: %s was requested but %s runs (available: %s)%s", CUDA, self.provider,
                    onnxruntime.get_available_providers(),
                    " - detection will be much slower" if cuda_installed else ": this onnxruntime is the CPU build")
        log.info("face detector %s (sha256 %s...) on %s, det_size %d (fallback %s), %s intra-op thread(s) x %d",
                 self.model_path.name, self.detector_id[:12], self.provider, self.det_size,
                 self.fallback_det_size or "off", cfg.threads or "default", self.infer_workers)

    # ----------------------------------------------------------------- input

    def canvas_shape(self, height: int, width: int, size: int) -> tuple[int, int]:
        """(H, W) of the canvas for a picture of ``height`` x ``width`` fitted to ``size``:
        ``size`` x ``size`` on the GPU, else the picture plus one ``_STRIDE`` cell of
        letterbox, rounded up to ``_STRIDE`` and at most ``size`` (see the module note)."""
        if self.on_gpu or self.max_batch > 1:
            return size, size

        def side(n: int) -> int:
            return min(size, -(-(n + _STRIDE) // _STRIDE) * _STRIDE)

        return side(height), side(width)

    def blob(self, rgb: np.ndarray, size: int) -> np.ndarray:
        """Normalised 1x3xHxW float32 letterbox canvas with ``rgb`` (fitted to ``size``) top-left;
        (H, W) is :meth:`canvas_shape`."""
        h, w = rgb.shape[:2]
        ch, cw = self.canvas_shape(h, w, size)
        out = np.empty((1, 3, ch, cw), dtype=np.float32)
        out[0, :, h:, :] = _PAD
        out[0, :, :h, w:] = _PAD
        # Plane by plane from cv2.split: half the time of one strided HWC->CHW numpy pass.
        for c, plane in enumerate(cv2.split(rgb)):
            out[0, c, :h, :w] = plane
        region = out[0, :, :h, :w]
        region -= _MEAN
        region *= 1.0 / _STD  # 1/128: exact in float32, same values as insightface's blob
        return out

    # ----------------------------------------------------------------- inference

    def run(self, blobs: np.ndarray) -> list[np.ndarray]:
        """One onnxruntime run over an NCHW batch; the raw SCRFD outputs."""
        if self.on_gpu:  # IO binding: outputs land in host memory ORT allocates once per run
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, blobs)
            for name in self.output_names:
                binding.bind_output(name)
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        return self.session.run(self.output_names, {self.input_name: blobs})

    def faces_from_outputs(self, outs: list[np.ndarray], index: int, canvas: tuple[int, int], img: FittedImage,
                           fitted: tuple[int, int]) -> list[Face]:
        """Boxes, scores and landmarks of image ``index`` of a run on a ``canvas`` (H, W) input,
        in original pixels. ``fitted`` is the (w, h) the image had inside the canvas.
        """
        from insightface.model_zoo.scrfd import distance2bbox, distance2kps

        m = self.model
        fmc = m.fmc
        scores_l, boxes_l, kps_l = [], [], []
        for idx, stride in enumerate(m._feat_stride_fpn):
            if m.batched:
                scores, box_d, kps_d = outs[idx][index], outs[idx + fmc][index], outs[idx + 2 * fmc][index]
            else:
                scores, box_d, kps_d = outs[idx], outs[idx + fmc], outs[idx + 2 * fmc]
            keep = np.where(scores[:, 0] >= self.det_thresh)[0]
            if keep.size == 0:
                continue
            centers = self._anchor_centers(canvas[0] // stride, canvas[1] // stride, stride)[keep]
            boxes_l.append(distance2bbox(centers, box_d[keep] * stride))
            kps_l.append(distance2kps(centers, kps_d[keep] * stride))
            scores_l.append(scores[keep, 0])
        if not scores_l:
            return []
        sx, sy = fitted[0] / img.width, fitted[1] / img.height
        scale4 = np.array([sx, sy, sx, sy], dtype=np.float32)
        boxes = np.vstack(boxes_l) / scale4
        kps = np.vstack(kps_l) / np.tile(np.array([sx, sy], dtype=np.float32), 5)
        scores = np.concatenate(scores_l)
        order = np.argsort(-scores, kind="stable")
        dets = np.hstack([boxes, scores[:, None]]).astype(np.float32)[order]
        kps = kps[order]
        keep = m.nms(dets)  # insightface's NMS at its own IoU threshold (0.4)
        w, h = img.width, img.height
        faces = []
        for i in keep:
            x1, y1, x2, y2, s = (float(v) for v in dets[i])
            faces.append(Face(
                x1=min(max(x1, 0.0), w), y1=min(max(y1, 0.0), h),
                x2=min(max(x2, 0.0), w), y2=min(max(y2, 0.0), h),
                score=s, landmarks=tuple(float(v) for v in kps[i]),
            ))
        return faces

    def _anchor_centers(self, height: int, width: int, stride: int) -> np.ndarray:
        # Same grid as SCRFD.forward, sharing its cache.
        key = (height, width, stride)
        cache = self.model.center_cache
        centers = cache.get(key)
        if centers is None:
            centers = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
            centers = (centers * stride).reshape((-1, 2))
            if self.model._num_anchors > 1:
                centers = np.stack([centers] * self.model._num_anchors, axis=1).reshape((-1, 2))
            if len(cache) < 100:
                cache[key] = centers
        return centers

    def detect_fitted(self, img: FittedImage, blob: np.ndarray | None = None) -> list[Face]:
        """Faces in a decoded image: one pass at ``det_size``; a second at ``fallback_det_size``
        only when the first finds none. ``blob`` is ``self.blob(img.rgb, det_size)`` if the
        caller made it already (decode threads do)."""
        if blob is None:
            blob = self.blob(img.rgb, self.det_size)
        return self.detect_batch([img], blob)[0]

    def detect_batch(self, imgs: list[FittedImage], blobs: np.ndarray) -> list[list[Face]]:
        """:meth:`detect_fitted` for several images whose canvases are stacked in ``blobs``
        (one run when the model has a batch axis, ``len(imgs) <= max_batch``)."""
        if len(imgs) > 1 and self.max_batch == 1:
            return [self.detect_fitted(img, blobs[i:i + 1]) for i, img in enumerate(imgs)]
        outs = self.run(blobs)
        found = []
        for i, img in enumerate(imgs):
            faces = self.faces_from_outputs(outs, i, blobs.shape[2:], img, (img.rgb.shape[1], img.rgb.shape[0]))
            if not faces and self.fallback_det_size:
                faces = self._second_pass(img)
            found.append(faces)
        return found

    def _second_pass(self, img: FittedImage) -> list[Face]:
        with self.stats.lock:
            self.stats.second_passes += 1
        small = fit_size(img.width, img.height, self.fallback_det_size)
        blob = self.blob(resize_rgb(img.rgb, small), self.fallback_det_size)
        return self.faces_from_outputs(self.run(blob), 0, blob.shape[2:], img, small)

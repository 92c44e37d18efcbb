"""The test photos of the report's labels run through the model run: each decoded from the image
store, cropped around its largest face as training crops it (:func:`scoring.model.crop_batch`),
and scored; for the map and best-crops sections.

Rows and face boxes come from :func:`training.data.load_examples` (post_id order, the newest ok
faces row's largest box), so the photos are the ones training saw, cut the same way. A photo
without a face box is left out: both sections are about the face crop.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from likerank.report.load import NotAvailable, ReportContext
from pipeline.core.storage import ImageStore, StorageError
from pipeline.faces.crop import face_crop_box

log = logging.getLogger(__name__)

#: Images run through the model at once (memory: batch x 3 x image_size^2 float32).
BATCH = 32


@dataclass
class Photo:
    post_id: str
    label: int
    rgb: np.ndarray  # upright RGB uint8 HxWx3, decoded at about the resolution the face crop needs
    box: np.ndarray  # float32 x1, y1, x2, y2 of the largest face, in rgb's pixels


@dataclass
class Scored:
    """Photos run through the model, in the order asked for (unreadable ones left out)."""

    post_id: list[str] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    prob: list[float] = field(default_factory=list)  # sigmoid of the label logit
    features: list[np.ndarray] = field(default_factory=list)  # penultimate layer, one vector each
    thumbs: list[Any] = field(default_factory=list)  # PIL images: the face crop, thumb_px square
    unreadable: int = 0


def labeled_test_examples(ctx: ReportContext) -> Any:
    """The labels run's test rows (:class:`training.data.Examples`); raises when there are none."""
    ctx.need_labels()
    from training.data import load_examples

    test = load_examples(ctx.storage, str(ctx.labels_run))["test"]
    if not len(test):
        raise NotAvailable(f"labels run {ctx.labels_run!r} has no test rows")
    return test


def with_face(examples: Any, limit: int) -> np.ndarray:
    """Indices of the rows that have a face box: all of them, or ``limit`` spread evenly along
    the post_id order (deterministic, and not just the first posts)."""
    idx = np.flatnonzero(np.isfinite(examples.box).all(axis=1))
    if len(idx) > limit:
        idx = idx[np.unique(np.linspace(0, len(idx) - 1, limit).round().astype(int))]
    return idx


def decode_side(box: np.ndarray, frame: tuple[float, float], image_size: int, face_margin: float) -> int | None:
    """The long side (pixels) to decode at so the face crop still has ``image_size`` pixels
    across (as training decodes); None when the image's size is unknown (decode in full)."""
    long = max(frame)
    if not math.isfinite(long) or long <= 0:
        return None
    crop = max(float(box[2] - box[0]), float(box[3] - box[1]), 1.0) * (1.0 + face_margin)
    return int(min(long, math.ceil(image_size * long / crop)))


def read_photo(images: ImageStore, examples: Any, i: int, spec: Any) -> Photo | None:
    """Row ``i`` decoded with its face box scaled to the decoded pixels; None if unreadable."""
    from PIL import Image

    from pipeline.faces.decode import DecodeError, decode_fitted

    sha, box = examples.sha256[i], examples.box[i]
    frame = (float(examples.frame[i][0]), float(examples.frame[i][1]))
    try:
        data = images.get(sha)
        side = decode_side(box, frame, spec.image_size, spec.face_margin)
        if side is None:
            with Image.open(io.BytesIO(data)) as im:  # the header only
                side = max(im.size)
        img = decode_fitted(data, side, orientation=examples.orientations.get(sha))  # stored bytes carry no EXIF
    except (StorageError, DecodeError, OSError) as exc:
        log.warning("report: image %s (post %s) unreadable: %s", sha, examples.post_id[i], exc)
        return None
    fw, fh = frame if all(math.isfinite(v) and v > 0 for v in frame) else (img.width, img.height)
    h, w = img.rgb.shape[:2]
    scale = np.array([w / fw, h / fh, w / fw, h / fh], dtype=np.float32)
    return Photo(post_id=examples.post_id[i], label=int(examples.label[i]), rgb=img.rgb, box=box * scale)


def face_crop(photo: Photo, face_margin: float, px: int | None = None) -> Any:
    """The training-style face crop of ``photo`` (PIL; black outside the image), ``px`` square if given."""
    from PIL import Image


    h, w = photo.rgb.shape[:2]
    crop = Image.fromarray(photo.rgb).crop(face_crop_box(photo.box, face_margin, (w, h)))
    return crop.resize((px, px), Image.Resampling.LANCZOS) if px else crop


def score_photos(ctx: ReportContext, model: Any, examples: Any, idx: np.ndarray, thumb_px: int) -> Scored:
    """Rows ``idx`` run through ``model`` in batches: probability, features and a face thumbnail each."""
    from scoring.model import crop_batch, label_probability

    images, out = ImageStore(ctx.storage), Scored()
    for start in range(0, len(idx), BATCH):
        photos = []
        for i in idx[start:start + BATCH]:
            photo = read_photo(images, examples, int(i), model.spec)
            if photo is None:
                out.unreadable += 1
            else:
                photos.append(photo)
        if not photos:
            continue
        logits, features = model.run(crop_batch([p.rgb for p in photos], [p.box for p in photos], model.spec))
        for photo, logit, feature in zip(photos, logits, features, strict=True):
            out.post_id.append(photo.post_id)
            out.label.append(photo.label)
            out.prob.append(float(label_probability(logit)))
            out.features.append(feature)
            out.thumbs.append(face_crop(photo, model.spec.face_margin, thumb_px))
    return out


def search_best_crops(ctx: ReportContext, model: Any, examples: Any,
                      idx: np.ndarray) -> tuple[list[dict[str, Any]], int]:
    """Rows ``idx`` through :func:`scoring.best_crop.best_crop`: one pair each (the numbers, and
    both crops as PIL images: ``original`` and ``best``, None when no grid crop fits), and how
    many photos could not be read."""
    from PIL import Image

    from scoring.best_crop import best_crop

    images, pairs, unreadable = ImageStore(ctx.storage), [], 0
    for i in idx:
        photo = read_photo(images, examples, int(i), model.spec)
        if photo is None:
            unreadable += 1
            continue
        found = best_crop(model, photo.rgb, photo.box)
        best = found["best"]
        pairs.append({"post_id": photo.post_id, "label": photo.label, "original_prob": found["original_prob"],
                      "best_prob": best["prob"] if best else None, "aspect": best["aspect"] if best else None,
                      "candidates": found["candidates"], "original": face_crop(photo, model.spec.face_margin),
                      "best": Image.fromarray(photo.rgb).crop(tuple(best["box"])) if best else None})
    return pairs, unreadable


def tsne_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """(n, 2) t-SNE coordinates of (n, d) features, and the perplexity used (n >= 5)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(features)
    perplexity = min(30.0, (n - 1) / 3)  # t-SNE needs perplexity < n; ~n/3 keeps small maps stable
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    # One OpenMP thread: the Barnes-Hut gradient's threads spin-wait on a busy machine (600 points
    # of 512 features: 15 s with 2 threads, 3.7 s with 1 on a loaded 2-core box).
    with threadpool_limits(limits=1, user_api="openmp"):
        xy = tsne.fit_transform(np.asarray(features, dtype=np.float64))
    return xy, perplexity

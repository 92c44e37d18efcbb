"""The training data: a published labels run joined with face boxes, read image by image.

- which labels run to train on is :mod:`pipeline.core.published`'s answer: a run is trainable
  only when ``labels/_published.json`` names it and its validation vouches for its bytes.
- :func:`load_examples` — the small per-row arrays (sha256, label, score, split, face box)
  for one run, split by ``split``. Only these live in memory; image bytes never do.
- :class:`LabeledImages` — a ``torch.utils.data.Dataset`` that fetches one image's bytes from
  the image store per item, decodes it (Pillow), crops (largest face plus margin, or the full
  image), squishes to ``image_size`` square, augments (train only) and normalizes, all through
  :class:`ImageTransform`, which :class:`training.shards.ShardImages` (``training.input =
  "shards"``) calls too. Storage is opened lazily in each DataLoader worker, so S3 clients are
  never pickled across processes.

An image that cannot be read or decoded is not an exception: the item comes back as zeros
with ``weight`` 0, the loss and the metrics ignore it, and it is counted in the run's metrics.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.config import StorageConfig
from pipeline.core.largest_face import largest_faces
from pipeline.core.orientation import orientation_of, recorded_orientations, upright
from pipeline.core.storage import ImageStore, Storage, open_storage
from pipeline.core.tables import read_table
from pipeline.faces.crop import MEAN, STD, face_crop_box

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class Examples:
    """One split's rows, as small arrays. ``box`` is NaN where no face box is known."""

    post_id: list[str]
    sha256: list[str]
    author_key: list[str]
    label: np.ndarray  # int64 (0/1)
    score: np.ndarray  # float32, 0..1
    box: np.ndarray  # float32 (n, 4): x1, y1, x2, y2 in the detector's pixel frame
    frame: np.ndarray  # float32 (n, 2): width, height the boxes refer to (NaN: unknown)
    detector_ids: set[str] = field(default_factory=set)
    #: sha256 -> the EXIF orientation the images table recorded (stored bytes carry no EXIF)
    orientations: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sha256)


def load_examples(storage: Storage, run_id: str, *, crop: str = "face") -> dict[str, Examples]:
    """The rows of labels run ``run_id`` by split, with face boxes joined when ``crop`` is 'face'."""
    t = read_table(storage, "labels", partitions=[run_id],
                   columns=["post_id", "image_sha256", "author_key", "label", "score", "split"])
    # Deterministic order, independent of how the labeler wrote the file.
    t = t.sort_by([("post_id", "ascending"), ("image_sha256", "ascending")])
    shas = t["image_sha256"].to_pylist()
    faces = largest_faces(storage, set(shas)) if crop == "face" else {}
    orientations = recorded_orientations(storage, shas)
    split = np.asarray(t["split"].to_pylist())
    label = t["label"].to_numpy().astype(np.int64)
    score = t["score"].to_numpy().astype(np.float32)
    box = np.full((len(shas), 4), np.nan, dtype=np.float32)
    frame = np.full((len(shas), 2), np.nan, dtype=np.float32)
    detectors = np.full(len(shas), "", dtype=object)
    for i, sha in enumerate(shas):
        if sha in faces:
            box[i], fw, fh, detectors[i] = faces[sha][0], faces[sha][1], faces[sha][2], faces[sha][3]
            frame[i] = (fw, fh)
    unknown = sorted(set(split) - set(SPLITS))
    if unknown:
        raise ValueError(f"labels run {run_id!r}: unknown split value(s) {unknown} (expected {SPLITS})")
    post, author = t["post_id"].to_pylist(), t["author_key"].to_pylist()
    out = {}
    for s in SPLITS:
        idx = np.flatnonzero(split == s)
        out[s] = Examples(
            post_id=[post[i] for i in idx], sha256=[shas[i] for i in idx], author_key=[author[i] for i in idx],
            label=label[idx], score=score[idx], box=box[idx], frame=frame[idx],
            detector_ids={d for d in detectors[idx] if d},
            orientations={shas[i]: orientations[shas[i]] for i in idx if shas[i] in orientations},
        )
    if crop == "face":
        n_box = sum(int(np.isfinite(e.box[:, 0]).sum()) for e in out.values())
        if n_box < len(shas):
            log.info("labels run %s: %d of %d images have no ok face row; those use the full image",
                     run_id, len(shas) - n_box, len(shas))
    return out


class ImageTransform:
    """Stored image bytes -> the model's input tensor; every dataset of images calls this one.

    Decode (Pillow; JPEG draft-decoded at a reduced scale when the crop is downsized anyway),
    upright by the EXIF orientation, crop (largest face box plus ``face_margin``, or the full
    image), squish to ``image_size`` square, augment (flip + small colour jitter, when
    ``augment``) and normalize. :meth:`item` wraps it into a dataset item, with a bad image as
    a zero-weight item.
    """

    def __init__(self, *, image_size: int, crop: str = "face", face_margin: float = 0.6, augment: bool = False):
        self.image_size, self.crop, self.face_margin, self.augment = image_size, crop, face_margin, augment
        self._jitter = None
        if augment:
            from torchvision import transforms

            # Small colour jitter only: the label is about the photo's look, so keep it mostly intact.
            self._jitter = transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1)

    def load_image(self, data: bytes, box: np.ndarray, frame: np.ndarray, orientation: int | None):
        """The cropped, squished, un-normalized PIL image (raises on bad bytes).

        ``box`` is x1, y1, x2, y2 (NaN: no face, the full image), in pixels of the upright image
        of size ``frame`` (width, height; NaN: the decoded image's own size). ``orientation`` is
        the recorded EXIF orientation the stored bytes no longer carry; None: the file's own EXIF.
        """
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        has_face = self.crop == "face" and bool(np.isfinite(box).all())
        full_w, full_h = img.size
        if img.format == "JPEG":
            # Let libjpeg decode at a reduced scale when the crop will be downsized anyway.
            want = self.image_size
            if has_face:
                side = max(box[2] - box[0], box[3] - box[1], 1.0) * (1 + self.face_margin)
                want = self.image_size * max(full_w, full_h) / side
            img.draft("RGB", (int(want), int(want)))
        # Upright as the face boxes are: by the recorded orientation (the stored bytes' EXIF is
        # gone), or by the file's own EXIF for an image stored before stripping.
        img = upright(img, orientation_of(img, orientation)).convert("RGB")
        if has_face:
            fw, fh = frame
            fw = fw if np.isfinite(fw) and fw > 0 else full_w
            fh = fh if np.isfinite(fh) and fh > 0 else full_h
            sx, sy = img.size[0] / fw, img.size[1] / fh
            img = img.crop(face_crop_box(box * np.array([sx, sy, sx, sy], dtype=np.float32),
                                         self.face_margin, img.size))
        return img.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)

    def __call__(self, data: bytes, box: np.ndarray, frame: np.ndarray, orientation: int | None) -> torch.Tensor:
        """The normalized (and, when augmenting, flipped and jittered) 3 x size x size tensor."""
        from torchvision.transforms import functional as F

        img = self.load_image(data, box, frame, orientation)
        if self.augment:
            if torch.rand(()) < 0.5:
                img = F.hflip(img)
            img = self._jitter(img)
        return F.normalize(F.to_tensor(img), MEAN, STD)

    def item(self, read: Callable[[], bytes], box: np.ndarray, frame: np.ndarray, orientation: int | None, *,
             label: float, score: float, index: int, what: str) -> dict[str, Any]:
        """A dataset item: ``image``, ``label``, ``score``, ``weight`` (0: unreadable), ``index``.

        ``read`` fetches the bytes; a failure there or in decoding is logged (``what`` names the
        image) and gives zeros with weight 0, not an exception.
        """
        weight = 1.0
        try:
            x = self(read(), box, frame, orientation)
        except Exception as exc:  # noqa: BLE001 - a bad image is a zero-weight item, not a crash
            log.warning("image %s: %s: %s", what, type(exc).__name__, exc)
            x = torch.zeros(3, self.image_size, self.image_size)
            weight = 0.0
        return {
            "image": x,
            "label": torch.tensor(float(label)),
            "score": torch.tensor(float(score)),
            "weight": torch.tensor(weight),
            "index": torch.tensor(index),
        }


class LabeledImages(Dataset):
    """Images of one split with their label and score; one image read from storage per item.

    ``storage`` is a :class:`~pipeline.core.config.StorageConfig` (opened lazily in each process:
    the right thing for DataLoader workers and S3) or an open :class:`Storage`.
    """

    def __init__(self, examples: Examples, storage: StorageConfig | Storage, *, image_size: int,
                 crop: str = "face", face_margin: float = 0.6, augment: bool = False):
        self.ex = examples
        self._storage_cfg = storage if isinstance(storage, StorageConfig) else None
        self._storage = None if self._storage_cfg is not None else storage
        self._pid = os.getpid()
        self.transform = ImageTransform(image_size=image_size, crop=crop, face_margin=face_margin, augment=augment)

    def __len__(self) -> int:
        return len(self.ex)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._storage_cfg is not None:
            state["_storage"] = None  # never pickle a live S3 client into a worker
        return state

    @property
    def images(self) -> ImageStore:
        if self._storage is None or (self._storage_cfg is not None and self._pid != os.getpid()):
            self._storage, self._pid = open_storage(self._storage_cfg), os.getpid()
        return ImageStore(self._storage)

    def load_image(self, i: int):
        """The cropped, squished, un-normalized PIL image of item ``i`` (raises on bad bytes)."""
        sha = self.ex.sha256[i]
        return self.transform.load_image(self.images.get(sha), self.ex.box[i], self.ex.frame[i],
                                         self.ex.orientations.get(sha))

    def __getitem__(self, i: int) -> dict[str, Any]:
        sha = self.ex.sha256[i]
        return self.transform.item(lambda: self.images.get(sha), self.ex.box[i], self.ex.frame[i],
                                   self.ex.orientations.get(sha), label=self.ex.label[i], score=self.ex.score[i],
                                   index=i, what=f"{sha} (post {self.ex.post_id[i]})")

"""The face-detection stage: stored images in, one ``faces`` row per image out.

Read, decode, detect, write, in that order and overlapped:

* :func:`detect_stream` runs the pipeline over any iterable of (key, loader) pairs. Loading and
  decoding run in ``faces.decode_workers`` threads (Pillow, cv2, numpy and storage reads all
  release the GIL), each producing an image fitted to ``det_size``, its normalised canvas and
  its perceptual hash (:mod:`pipeline.faces.phash`: the downloader reads headers only, so
  this is where an image's pixels are first decoded, and the hash is taken here) and its
  pixel attributes (:mod:`pipeline.faces.photo_attributes`: brightness, contrast, saturation,
  black and white, border, sharpness, measured from the same fitted pixels);
  inference runs in :attr:`FaceDetector.infer_workers` threads. At most ``queue_size`` images
  are in flight between the two, so memory stays bounded whatever the shard size. Results
  come back in input order.
* :func:`plan_shards` lists the images of the ``images`` table that have no finished row
  for the current detector (its model file's sha256) and cuts them into shards.
* :func:`detect_shard` detects one shard and writes it as one ``faces`` partition,
  ``<logical date>-s<shard>-<8 hex of the shard's content>``: a retried shard replaces its
  own partition, and a re-planned run (other content) never overwrites an earlier one. Each
  image is turned upright by the ``exif_orientation`` the ``images`` table recorded (stored
  bytes have no EXIF left to read it from).

Item failures are rows (status ``decode_error``, ``missing``, ``error``); only a shard that
cannot be processed at all (no model, storage down) raises.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from pipeline.core import keys
from pipeline.faces.decode import DecodeError, FittedImage, decode_fitted
from pipeline.faces.phash import perceptual_hash
from pipeline.faces.photo_attributes import (
    PIXEL_COLUMNS,
    PixelAttributes,
    face_geometry,
    measure_pixels,
)

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from pipeline.core.config import Config
    from pipeline.core.storage import Storage
    from pipeline.faces.detector import Face, FaceDetector

log = logging.getLogger(__name__)

#: Statuses that mean "this image is done for this detector"; ``missing``/``error`` are retried.
DONE_STATUSES = ("ok", "decode_error")

Loader = Callable[[], bytes]


@dataclass
class Detection:
    """What detection found in one image (or why it could not look)."""

    status: str  # ok | decode_error | missing | error
    error: str | None = None
    width: int | None = None
    height: int | None = None
    faces: list[Face] = field(default_factory=list)
    phash: str | None = None  # of the decoded image; None when it did not decode
    pixels: PixelAttributes | None = None  # of the decoded image; None when it did not decode

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "error": self.error, "width": self.width, "height": self.height,
                "phash": self.phash, "n_faces": len(self.faces), "faces": [f.as_dict() for f in self.faces]}


# --------------------------------------------------------------------------- the stream


def detect_stream(
    detector: FaceDetector,
    items: Iterable[tuple[Any, Loader]],
    *,
    decode_workers: int = 2,
    max_pixels: int = 40_000_000,
    queue_size: int = 0,
    orientations: Mapping[Any, int] | None = None,
) -> Iterator[tuple[Any, Detection]]:
    """Detect faces in every ``(key, loader)`` item; yield ``(key, Detection)`` in input order.

    ``loader()`` returns the image bytes; ``FileNotFoundError`` from it means status ``missing``.
    ``orientations``: key -> the EXIF orientation recorded for a stored image (its EXIF is
    gone); a key without one is turned upright by its own EXIF, if any.
    ``queue_size`` bounds the images decoded or being decoded ahead of inference
    (0 = four per worker thread); each holds ~6 MB at det_size 640 (its float32 canvas and
    fitted RGB copy), so the default 12 cost ~75 MB whatever the shard size.
    """
    window = queue_size or 4 * (decode_workers + detector.infer_workers)
    recorded = orientations or {}
    batch = detector.max_batch
    pending: deque[tuple[list[Any], Future]] = deque()
    in_flight = 0

    with ThreadPoolExecutor(decode_workers, thread_name_prefix="faces-decode") as decode_pool, \
            ThreadPoolExecutor(detector.infer_workers, thread_name_prefix="faces-infer") as infer_pool:
        def submit(keys: list[Any], loaders: list[Loader]) -> None:
            nonlocal in_flight
            decoded = [decode_pool.submit(_load_and_prepare, detector, ld, max_pixels, recorded.get(key))
                       for key, ld in zip(keys, loaders, strict=True)]
            pending.append((keys, infer_pool.submit(_infer, detector, decoded)))
            in_flight += len(keys)

        def oldest() -> Iterator[tuple[Any, Detection]]:
            nonlocal in_flight
            keys, fut = pending.popleft()
            in_flight -= len(keys)
            yield from zip(keys, fut.result(), strict=True)

        try:
            keys: list[Any] = []
            loaders: list[Loader] = []
            for key, loader in items:
                keys.append(key)
                loaders.append(loader)
                if len(keys) == batch:
                    submit(keys, loaders)
                    keys, loaders = [], []
                while in_flight >= window:
                    yield from oldest()
            if keys:
                submit(keys, loaders)
            while pending:
                yield from oldest()
        finally:  # consumer stopped early or a shard-level error: drop what has not started
            for _, fut in pending:
                fut.cancel()


def _load_and_prepare(detector: FaceDetector, loader: Loader, max_pixels: int,
                      orientation: int | None) -> tuple[FittedImage, np.ndarray, str, PixelAttributes | None] | Detection:
    """Decode-thread work: bytes -> fitted image, normalised canvas, phash and pixel attributes,
    or a failure row."""
    try:
        data = loader()
    except FileNotFoundError as exc:
        return Detection("missing", error=str(exc) or "image not found")
    except Exception as exc:  # noqa: BLE001 - storage hiccup: a row, retried by the next plan
        return Detection("error", error=f"cannot read image: {type(exc).__name__}: {exc}")
    try:
        img = decode_fitted(data, detector.det_size, max_pixels=max_pixels, orientation=orientation)
    except DecodeError as exc:
        return Detection("decode_error", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad image must not fail the shard
        return Detection("decode_error", error=f"{type(exc).__name__}: {exc}")
    try:
        pixels = measure_pixels(img.rgb)
    except Exception:  # noqa: BLE001 - the detection stands without them (null columns)
        log.exception("cannot measure the pixel attributes of a %dx%d image", img.width, img.height)
        pixels = None
    return img, detector.blob(img.rgb, detector.det_size), perceptual_hash(img.rgb), pixels


def _infer(detector: FaceDetector, decoded: list[Future]) -> list[Detection]:
    """Inference-thread work for one batch (waits for its decodes, in order)."""
    import numpy as np

    prepared = [f.result() for f in decoded]
    out: list[Detection | None] = [p if isinstance(p, Detection) else None for p in prepared]
    todo = [i for i, d in enumerate(out) if d is None]
    if not todo:
        return out  # type: ignore[return-value]
    try:
        imgs = [prepared[i][0] for i in todo]
        if len(todo) == 1:
            found = [detector.detect_fitted(imgs[0], prepared[todo[0]][1])]
        else:
            found = detector.detect_batch(imgs, np.concatenate([prepared[i][1] for i in todo]))
        for i, img, faces in zip(todo, imgs, found, strict=True):
            out[i] = Detection("ok", width=img.width, height=img.height, faces=faces, phash=prepared[i][2],
                               pixels=prepared[i][3])
    except Exception as exc:  # noqa: BLE001 - a failed run marks its images, the shard goes on
        log.exception("face detection failed for a batch of %d image(s)", len(todo))
        for i in todo:
            img, _, phash, pixels = prepared[i]
            out[i] = Detection("error", error=f"{type(exc).__name__}: {exc}", width=img.width, height=img.height,
                               phash=phash, pixels=pixels)
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- rows


def faces_table(results: Iterable[tuple[str, Detection]], detector_id: str, detected_at: datetime | None = None) -> pa.Table:
    """``faces`` rows (FACES schema) for ``(sha256, Detection)`` pairs: the face geometry
    (:func:`~pipeline.faces.photo_attributes.face_geometry`) of an ``ok`` row, the pixel
    attributes of any row whose image decoded."""
    import pyarrow as pa

    from pipeline.core.schemas import FACES

    detected_at = detected_at or datetime.now(UTC)
    cols: dict[str, list] = {name: [] for name in FACES.names}
    for sha, det in results:
        boxes = [f.as_dict() for f in det.faces]
        geometry = face_geometry(boxes, det.width, det.height) if det.status == "ok" else face_geometry([], None, None)
        pixels = dict.fromkeys(PIXEL_COLUMNS) if det.pixels is None else asdict(det.pixels)
        row = {"sha256": sha, "detector_id": detector_id, "status": det.status, "error": det.error,
               "width": det.width, "height": det.height, "phash": det.phash, "n_faces": len(det.faces),
               "faces": boxes, **geometry, **pixels, "detected_at": detected_at}
        for name in FACES.names:
            cols[name].append(row[name])
    return pa.Table.from_pydict(cols, schema=FACES)


def summarize(results: Iterable[Detection]) -> dict[str, int]:
    """Counts by outcome: ok rows split by 0 / 1 / 2+ faces, failures by status."""
    counts = {"images": 0, "no_face": 0, "one_face": 0, "many_faces": 0, "decode_error": 0, "missing": 0, "error": 0}
    for det in results:
        counts["images"] += 1
        if det.status == "ok":
            n = len(det.faces)
            counts["no_face" if n == 0 else "one_face" if n == 1 else "many_faces"] += 1
        else:
            counts[det.status] += 1
    return counts


# --------------------------------------------------------------------------- planning


def current_detector_id(cfg: Config) -> str:
    """sha256 of the model file ``faces.model`` resolves to (without loading it)."""
    from pipeline.faces.detector import file_sha256, resolve_model_path

    return file_sha256(resolve_model_path(cfg.faces))


def plan_shards(cfg: Config, storage: Storage | None = None, *, detector_id: str | None = None,
                max_shards: int = 0) -> list[list[str]]:
    """Image sha256s of the ``images`` table with no finished ``faces`` row for this detector,
    sorted, in shards of ``faces.shard_size`` (larger when ``max_shards`` > 0 would be exceeded,
    e.g. Airflow's ``max_map_length``). A new model means a new detector id: all re-detected."""
    import pyarrow.compute as pc

    from pipeline.core.storage import open_storage
    from pipeline.core.tables import list_partitions, read_table

    storage = storage or open_storage(cfg.storage)
    detector_id = detector_id or current_detector_id(cfg)
    if not list_partitions(storage, "images"):
        return []
    shas = set(read_table(storage, "images", columns=["sha256"]).column("sha256").to_pylist())
    if list_partitions(storage, "faces"):
        done = read_table(storage, "faces", columns=["sha256"],
                          filter=(pc.field("detector_id") == detector_id)
                          & pc.field("status").isin(list(DONE_STATUSES)))
        shas -= set(done.column("sha256").to_pylist())
    todo = sorted(shas)
    size = cfg.faces.shard_size
    if max_shards and math.ceil(len(todo) / size) > max_shards:
        size = math.ceil(len(todo) / max_shards)
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def shard_partition(logical_date: str | date | datetime, shard_id: int, shas: list[str]) -> str:
    """Partition value ``YYYY-MM-DD-sNNNN-<8 hex>``: the date, the shard number and a digest
    of the shard's images, so only a rerun of the very same shard replaces it."""
    day = logical_date.date() if isinstance(logical_date, datetime) else logical_date
    day = day.isoformat() if isinstance(day, date) else str(day)[:10]
    digest = hashlib.sha256("\n".join(sorted(shas)).encode()).hexdigest()[:8]
    return f"{day}-s{int(shard_id):04d}-{digest}"


# --------------------------------------------------------------------------- one shard


def detect_shard(
    cfg: Config,
    shard_id: int,
    shas: list[str],
    logical_date: str | date | datetime,
    *,
    storage: Storage | None = None,
    detector: FaceDetector | None = None,
    on_result: Callable[[str, Detection], None] | None = None,
) -> dict[str, Any]:
    """Detect faces in the images ``shas`` and write them as one ``faces`` partition.

    Returns a small summary (counts, partition, seconds, images/s, provider) for XCom and logs.
    ``detector`` reuses a loaded model across shards; ``on_result`` is called per image
    (progress bars).
    """
    from pipeline.core.orientation import recorded_orientations
    from pipeline.core.storage import ImageStore, StorageError, open_storage
    from pipeline.core.tables import write_partition
    from pipeline.faces.detector import FaceDetector

    storage = storage or open_storage(cfg.storage)
    detector = detector or FaceDetector(cfg.faces)
    images = ImageStore(storage)

    def loader(sha: str) -> Loader:
        def load() -> bytes:
            try:
                return images.get(sha)
            except StorageError as exc:
                if str(exc).endswith(": not found"):
                    raise FileNotFoundError(f"{images.key(sha)}: not in storage") from None
                raise
        return load

    started = time.perf_counter()
    results: list[tuple[str, Detection]] = []
    orientations = recorded_orientations(storage, shas)  # stored images carry no EXIF to read it from
    for sha, det in detect_stream(detector, ((s, loader(s)) for s in shas),
                                  decode_workers=cfg.faces.decode_workers, max_pixels=cfg.scrape.max_pixels,
                                  orientations=orientations):
        results.append((sha, det))
        if on_result:
            on_result(sha, det)
    seconds = time.perf_counter() - started
    if results and all(d.status == "error" for _, d in results):
        raise RuntimeError(f"faces shard {shard_id}: all {len(results)} image(s) failed, e.g. {results[0][1].error}")

    partition = shard_partition(logical_date, shard_id, shas)
    key = write_partition(storage, "faces", partition, faces_table(results, detector.detector_id))
    storage.put_text(key.rsplit("/", 1)[0] + "/_config.toml", cfg.to_toml())
    summary: dict[str, Any] = {
        "shard_id": int(shard_id), "partition": partition, "key": key,
        **summarize(d for _, d in results),
        "seconds": round(seconds, 3), "images_per_s": round(len(results) / seconds, 2) if seconds > 0 else 0.0,
        "provider": detector.provider, "detector_id": detector.detector_id,
    }
    log.info("faces shard %s: %s", partition, summary)
    return summary


# --------------------------------------------------------------------------- Airflow hand-off


def write_shard_manifests(cfg: Config, logical_date: str | date | datetime, *, max_shards: int = 0,
                          storage: Storage | None = None) -> list[dict[str, Any]]:
    """Plan, store each shard's image list as JSON, return small ``{"shard_id", "manifest", "n"}``
    dicts: what an Airflow mapped task receives (XCom stays small however large the shard)."""
    from pipeline.core.storage import open_storage
    from pipeline.core.tables import put_json

    storage = storage or open_storage(cfg.storage)
    out = []
    for i, shas in enumerate(plan_shards(cfg, storage, max_shards=max_shards)):
        key = keys.faces_manifest(shard_partition(logical_date, i, shas))
        put_json(storage, key, {"shard_id": i, "shas": shas})
        out.append({"shard_id": i, "manifest": key, "n": len(shas)})
    return out


def detect_manifest(cfg: Config, shard: dict[str, Any], logical_date: str | date | datetime) -> dict[str, Any]:
    """:func:`detect_shard` on a shard stored by :func:`write_shard_manifests`."""
    from pipeline.core.storage import open_storage
    from pipeline.core.tables import get_json

    storage = open_storage(cfg.storage)
    manifest = get_json(storage, shard["manifest"])
    if manifest is None:
        raise FileNotFoundError(f"faces shard manifest {storage.uri(shard['manifest'])} is missing")
    return detect_shard(cfg, manifest["shard_id"], manifest["shas"], logical_date, storage=storage)


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for a run of several shards."""
    keys = ("images", "no_face", "one_face", "many_faces", "decode_error", "missing", "error")
    total: dict[str, Any] = {k: sum(s.get(k, 0) for s in summaries) for k in keys}
    total["shards"] = len(summaries)
    total["partitions"] = [s["partition"] for s in summaries]
    total["providers"] = sorted({s["provider"] for s in summaries})
    return total

"""Measure a photo's visual attributes: the ``faces`` table's attribute columns.

The face stage decodes every stored image once (:mod:`pipeline.faces.decode`) to the detector's
input size; the attributes are measured here from that same decoded, upright RGB array, in the
decode threads, so no image is decoded a second time for them. They are what the report's
"What makes a good photo" section (:mod:`likerank.report.findings`) bins against the label:

* **face geometry** (:func:`face_geometry`), from the detections: the largest face (by box
  area) as a share of the image area and of the image height, its centre, and its head tilt
  (roll) from the two eye landmarks;
* **pixels** (:func:`pixel_attributes`), from the image brought to :data:`ANALYSIS_PX` on its
  long side first (:func:`analysis_rgb`), since sharpness and a border's width depend on the
  scale: brightness, contrast, saturation, black and white, a uniform border, sharpness.

The pixels measured are the detector's (``det_size``, 640 by default, on the long side: small
images scaled up, as SCRFD's letterbox does) shrunk to :data:`ANALYSIS_PX` by area averaging,
not a separate decode at :data:`ANALYSIS_PX`; :func:`measure_bytes` does the same from bytes for
an image whose row was written before these columns existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipeline.core.largest_face import box_area, largest_box
from pipeline.faces.decode import decode_fitted, fit_size, resize_rgb

#: Long side the pixel attributes are measured at, pixels: sharpness and the border width are
#: scale-dependent, so every photo is brought to the same size first.
ANALYSIS_PX = 256

#: The long side a stored image is decoded to before :data:`ANALYSIS_PX`: the detector's
#: default input size (``faces.det_size``), so bytes measured later read as the stage measured.
FIT_PX = 640

#: A border is at least this wide on each side at ANALYSIS_PX, pixels.
BORDER_MIN_PX = 2

#: A border line's values stay within this many levels (0-255, any channel) of the corner colour,
#: 95 % of them: JPEG ringing next to the photo and noise pass, a picture does not.
BORDER_TOLERANCE = 12

#: Black-and-white: the 99th percentile of each pixel's max-min channel spread, levels (0-255).
#: A grey JPEG decodes with a spread of 0-2; a washed-out colour photo keeps 10 or more.
BW_MAX_SPREAD = 6

#: Brightness is this percentile of luma: how bright the brightest part of the photo gets. Low
#: light and under-exposure lower it; a dark background, dark clothes or a dark scene with a lit
#: subject barely move it (the mean luma mostly measures what is in the picture: on the simulator's
#: photos it follows the planted exposure with Spearman 0.65, this with 0.91).
BRIGHTNESS_PERCENTILE = 99

#: Pixels darker than this HSV value (0-255) are left out of the saturation: their hue and
#: saturation are compression noise.
SATURATION_MIN_VALUE = 26

#: The ``faces`` columns this module fills.
FACE_COLUMNS = ("largest_face_share", "largest_face_cx", "largest_face_cy", "largest_face_height", "head_tilt")
PIXEL_COLUMNS = ("brightness", "contrast", "saturation", "black_and_white", "border", "sharpness")


@dataclass(frozen=True)
class PixelAttributes:
    """The pixel attributes of one photo, in the units of their ``faces`` columns."""

    brightness: float  # 99th-percentile luma, 0-255
    contrast: float  # standard deviation of luma, 0-255
    saturation: float  # mean HSV saturation of the lit pixels, fraction 0-1
    black_and_white: bool
    border: bool
    sharpness: float  # variance of the Laplacian of luma at ANALYSIS_PX


def border_widths(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """Widths (top, bottom, left, right, pixels) of a frame of one colour around ``rgb``; all 0
    when the four corners disagree or any side is under BORDER_MIN_PX wide."""
    h, w = rgb.shape[:2]
    img = rgb.astype(np.int16)
    corners = np.stack([img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]])
    colour = np.median(corners, axis=0)
    if np.abs(corners - colour).max() > BORDER_TOLERANCE:
        return 0, 0, 0, 0

    def uniform(line: np.ndarray) -> bool:  # at most 5 % of its values off the corner colour
        return np.count_nonzero(np.abs(line - colour) > BORDER_TOLERANCE) <= 0.05 * line.size

    def run(lines: Callable[[int], np.ndarray], limit: int) -> int:
        k = 0
        while k < limit and uniform(lines(k)):
            k += 1
        return k

    # A side more than a quarter of the image wide is not a border but a plain picture.
    top = run(lambda i: img[i], h // 4)
    bottom = run(lambda i: img[h - 1 - i], h // 4)
    left = run(lambda i: img[:, i], w // 4)
    right = run(lambda i: img[:, w - 1 - i], w // 4)
    sides = (top, bottom, left, right)
    if min(sides) < BORDER_MIN_PX:
        return 0, 0, 0, 0
    return sides


def analysis_rgb(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` (uint8 HxWx3) resized so its long side is :data:`ANALYSIS_PX`."""
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(resize_rgb(rgb, fit_size(w, h, ANALYSIS_PX)))


def pixel_attributes(rgb: np.ndarray) -> PixelAttributes:
    """The pixel attributes of an RGB uint8 image already at the analysis size (:func:`analysis_rgb`)."""
    top, bottom, left, right = border_widths(rgb)
    inner = np.ascontiguousarray(rgb[top:rgb.shape[0] - bottom, left:rgb.shape[1] - right])
    luma = cv2.cvtColor(inner, cv2.COLOR_RGB2GRAY).astype(np.float32)  # Rec. 601 weights
    hsv = cv2.cvtColor(inner, cv2.COLOR_RGB2HSV)
    lit = hsv[..., 2] >= SATURATION_MIN_VALUE
    saturation = float(hsv[..., 1][lit].mean()) / 255 if lit.any() else 0.0
    r, g, b = cv2.split(inner)  # cv2's per-pixel max/min: ~100x numpy's reduction over a 3-wide axis
    spread = cv2.subtract(cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b))
    coloured = np.count_nonzero(spread > BW_MAX_SPREAD)  # "99th percentile <= BW_MAX_SPREAD"
    return PixelAttributes(
        brightness=float(np.percentile(luma, BRIGHTNESS_PERCENTILE)),
        contrast=float(luma.std()),
        saturation=saturation,
        black_and_white=bool(coloured <= 0.01 * spread.size),
        border=bool(top),
        sharpness=float(cv2.Laplacian(luma, cv2.CV_32F).var()),
    )


def measure_pixels(fitted_rgb: np.ndarray) -> PixelAttributes:
    """The pixel attributes of a decoded image as detection sees it (any size; brought to
    :data:`ANALYSIS_PX` first)."""
    return pixel_attributes(analysis_rgb(fitted_rgb))


def measure_bytes(data: bytes, *, orientation: int | None = None, fit_px: int = FIT_PX,
                  max_pixels: int = 40_000_000) -> PixelAttributes:
    """The pixel attributes of image bytes, decoded as the face stage decodes them (upright by
    ``orientation``, fitted to ``fit_px``). Raises :class:`~pipeline.faces.decode.DecodeError`."""
    fitted = decode_fitted(data, fit_px, max_pixels=max_pixels, orientation=orientation)
    return measure_pixels(fitted.rgb)


def face_geometry(faces: Sequence[Mapping[str, Any]], width: int | None, height: int | None) -> dict[str, float | None]:
    """The face columns of one image from its detections (``x1, y1, x2, y2`` in image pixels,
    ``landmarks``: x, y of the left eye, right eye, nose, mouth corners, image left first).

    ``largest_face_share`` and ``largest_face_height`` are 0 without a face; the centre and
    the tilt are None then (and the tilt when the largest face has no eye landmarks). All None
    when the size is unknown (the image did not decode).
    """
    out: dict[str, float | None] = dict.fromkeys(FACE_COLUMNS)
    if not width or not height:
        return out
    out["largest_face_share"] = out["largest_face_height"] = 0.0
    if not faces:
        return out
    big = largest_box(faces)
    out["largest_face_share"] = box_area(big) / (width * height)
    out["largest_face_height"] = (big["y2"] - big["y1"]) / height
    out["largest_face_cx"] = (big["x1"] + big["x2"]) / 2 / width
    out["largest_face_cy"] = (big["y1"] + big["y2"]) / 2 / height
    lm = big.get("landmarks")
    if lm is not None and len(lm) >= 4:
        out["head_tilt"] = abs(math.degrees(math.atan2(lm[3] - lm[1], lm[2] - lm[0])))
    return out

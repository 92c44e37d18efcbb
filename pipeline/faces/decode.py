"""Decode image bytes straight to the detector's input size.

The detector sees at most ``det_size`` pixels on the long side, so decoding a 3000-pixel JPEG
at full resolution only to shrink it again is wasted work. Pillow's ``draft()`` asks libjpeg
to scale by 1/2, 1/4 or 1/8 inside the DCT (never below the requested size), which makes a
large JPEG several times cheaper to decode; one resize then fits the result to ``det_size``.
Measured by bench/faces.py on this project's 2-core machine (decode + fit to 640, one
thread, ms per 1080-2048 px JPEG): Pillow full 18.6, Pillow ``draft()`` 4.8, ``cv2.imdecode``
11.0, cv2 ``IMREAD_REDUCED_*`` 3.8, simplejpeg 10.3, simplejpeg scaled 6.1; on the simulator's
256-640 px images all are 0.9-1.5 ms. cv2's reduced decode is ~1 ms faster on big JPEGs, but
it needs a separate header parse to pick the scale and answers a bad file with ``None`` and
no reason; Pillow says what is wrong (truncated, unknown format), reads every format the
scraper stores, and gives the EXIF orientation, so it is the decoder here (no new dependency).

Stored images have no EXIF left (the scraper strips it), so the caller passes the orientation
the ``images`` table recorded; without one, the file's own EXIF orientation applies (an image
stored before stripping, or a file scored from disk).

Errors are values for the caller to record: :class:`DecodeError` carries a one-line reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.core.orientation import orientation_of, swaps_axes, upright

_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: multi-picture JPEG (phones); Pillow drafts it like JPEG


class DecodeError(ValueError):
    """The bytes are not a decodable image (unknown format, truncated, corrupt, too large)."""


@dataclass(frozen=True)
class FittedImage:
    """An upright RGB image fitted inside ``det_size`` x ``det_size``, plus the original size.

    ``rgb`` is ``uint8`` HxWx3 with its long side equal to ``det_size`` (small images are
    scaled up, as SCRFD's own letterbox does). ``width``/``height`` are the original image's,
    after EXIF orientation. Multiply original pixels by ``sx``/``sy`` to get ``rgb`` pixels.
    """

    rgb: np.ndarray
    width: int
    height: int

    @property
    def sx(self) -> float:
        return self.rgb.shape[1] / self.width

    @property
    def sy(self) -> float:
        return self.rgb.shape[0] / self.height


def fit_size(width: int, height: int, det_size: int) -> tuple[int, int]:
    """(w, h) of an image scaled so its long side is ``det_size``, aspect kept."""
    s = det_size / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to ``size`` (w, h): area averaging when shrinking more than 2x (no aliasing),
    bilinear otherwise (what SCRFD's own preprocessing uses)."""
    h, w = rgb.shape[:2]
    if (w, h) == size:
        return rgb
    shrink = max(w / size[0], h / size[1])
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if shrink > 2 else cv2.INTER_LINEAR)


def decode_fitted(data: bytes, det_size: int, *, max_pixels: int = 40_000_000,
                  orientation: int | None = None) -> FittedImage:
    """Decode ``data`` (any Pillow format) to an upright RGB image fitted to ``det_size``.

    ``orientation`` (EXIF 1..8) is the recorded one of a stored image; None reads the file's EXIF.

    Raises :class:`DecodeError` for anything that is not a whole, decodable image of at most
    ``max_pixels`` pixels (the decompression-bomb guard).
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w < 1 or h < 1:
            raise DecodeError(f"image has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise DecodeError(f"image too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
        orientation = orientation_of(im, orientation)
        tw, th = fit_size(w, h, det_size)
        if im.format in _JPEG_FORMATS and tw < w:
            im.draft("RGB", (tw, th))  # DCT-domain downscale; result stays >= (tw, th)
        im.load()  # decodes; a truncated or corrupt file raises here
        if im.mode != "RGB":  # convert() copies even an RGB image: ~0.4 ms per phone photo
            im = im.convert("RGB")
    except DecodeError:
        raise
    except UnidentifiedImageError:  # its text names Pillow's buffer object, which helps nobody
        raise DecodeError(f"cannot decode image: not a known image format (starts {data[:8]!r})") from None
    except (OSError, ValueError, SyntaxError, EOFError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        reason = str(exc) or type(exc).__name__
        raise DecodeError(f"cannot decode image: {reason}") from None
    im = upright(im, orientation)
    if swaps_axes(orientation):
        w, h, tw, th = h, w, th, tw
    rgb = resize_rgb(np.asarray(im), (tw, th))
    return FittedImage(rgb=np.ascontiguousarray(rgb), width=w, height=h)

"""The perceptual hash of a stored image, computed where the pipeline decodes it anyway.

The face stage decodes every image once (:mod:`pipeline.faces.decode`); hashing the same
pixels there spares the downloader a second decode of each image. The hash is
``imagehash.phash`` (64 bits, 16 hex digits): re-encoded or resized copies of one photo get
hashes a few bits apart, unrelated photos ~32 bits apart.

Its input is the detector's fitted image (long side ``det_size``), box-reduced first to at
least 64 px on the short side: phash's own Lanczos resize straight from 640 px to 32 x 32 took
~2.5 ms an image here, ~0.7 ms after the box reduction (same hash on scikit-image's
``astronaut.png``).
"""

from __future__ import annotations

import imagehash
import numpy as np
import scipy.fftpack  # noqa: F401 - imagehash.phash imports it on first call: here, not in a worker thread
from PIL import Image

#: Shortest side kept by the box reduction: twice phash's 32 x 32 input.
REDUCED_SIDE = 64


def perceptual_hash(rgb: np.ndarray) -> str:
    """``imagehash.phash`` of an HxWx3 uint8 image, as 16 hex digits."""
    im = Image.fromarray(rgb)
    factor = min(im.size) // REDUCED_SIDE
    if factor > 1:
        im = im.reduce(factor)
    return str(imagehash.phash(im))

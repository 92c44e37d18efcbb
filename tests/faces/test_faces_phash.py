"""The perceptual hash the face stage stores: imagehash's phash of the decoded photo."""

from __future__ import annotations

import io

import imagehash
import numpy as np
from PIL import Image

from pipeline.faces.decode import decode_fitted
from pipeline.faces.phash import REDUCED_SIDE, perceptual_hash
from tests.fixtures.faces import photo_bytes


def _rgb(name: str) -> np.ndarray:
    return decode_fitted(photo_bytes(name), 640).rgb


def test_it_is_imagehash_phash_of_the_box_reduced_image():
    rgb = _rgb("t1")
    im = Image.fromarray(rgb)
    factor = min(im.size) // REDUCED_SIDE
    assert factor > 1  # the fitted photo is big enough to be reduced first
    want = str(imagehash.phash(im.reduce(factor)))
    assert perceptual_hash(rgb) == want and len(want) == 16
    # A small image is hashed as it is.
    small = rgb[:40, :50]
    assert perceptual_hash(small) == str(imagehash.phash(Image.fromarray(small)))


def test_a_recompressed_copy_is_near_and_another_photo_is_far():
    original = Image.fromarray(_rgb("astronaut"))
    buf = io.BytesIO()
    original.resize((300, 300)).save(buf, "JPEG", quality=60)
    copy = decode_fitted(buf.getvalue(), 640).rgb

    def distance(a: np.ndarray, b: np.ndarray) -> int:
        return imagehash.hex_to_hash(perceptual_hash(a)) - imagehash.hex_to_hash(perceptual_hash(b))

    assert distance(_rgb("astronaut"), copy) <= 6
    assert distance(_rgb("astronaut"), _rgb("chelsea")) >= 16

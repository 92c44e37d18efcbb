"""Turning a stored image upright by its recorded EXIF orientation.

Stored images carry no EXIF (:mod:`pipeline.core.strip_metadata`), so Pillow's
``ImageOps.exif_transpose`` finds nothing to apply. The orientation the original carried is a
column of the ``images`` table (``exif_orientation``); whoever decodes a stored image reads it
with :func:`recorded_orientations` and applies it with :func:`upright`. An image stored before
stripping still has its EXIF; :func:`orientation_of` reads it there when no value is recorded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from pipeline.core.storage import Storage

#: EXIF orientation -> the transpose that makes the image upright (as ``ImageOps.exif_transpose``).
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
_EXIF_FORMATS = ("JPEG", "MPO", "WEBP", "PNG", "TIFF")


def swaps_axes(orientation: int | None) -> bool:
    """Whether turning the image upright swaps its width and height (orientations 5 to 8)."""
    return orientation in (5, 6, 7, 8)


def orientation_of(im: Image.Image, recorded: int | None = None) -> int:
    """The orientation to apply to ``im``: ``recorded`` when known, else its own EXIF's, else 1."""
    if recorded is not None:
        return recorded
    if im.format not in _EXIF_FORMATS:
        return 1
    value = im.getexif().get(_EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(im: Image.Image, orientation: int | None) -> Image.Image:
    """``im`` transposed by ``orientation`` (1 or None: as it is)."""
    transpose = TRANSPOSE.get(orientation or 1)
    return im if transpose is None else im.transpose(transpose)


def recorded_orientations(storage: Storage, shas: Iterable[str]) -> dict[str, int]:
    """sha256 -> the ``exif_orientation`` the ``images`` table records for it, for those of
    ``shas`` that have one. A digest with several rows (posted on several days) takes the
    newest partition's value: the bytes are the same, and so was the tag, but for a photo
    whose only difference was its orientation tag (then the newest post wins)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.core.tables import list_partitions, read_table

    wanted = sorted(set(shas))
    if not wanted or not list_partitions(storage, "images"):
        return {}
    t = read_table(storage, "images", columns=["dt", "sha256", "exif_orientation"])
    # Filtered here, not in the scan: on files a Delta merge rewrote, pyarrow's ``isin``
    # pushdown can fail comparing string with string_view (ArrowNotImplementedError).
    t = t.filter(pc.is_in(t["sha256"], value_set=pa.array(wanted, pa.string())))
    out: dict[str, tuple[str, int]] = {}
    for day, sha, value in zip(t["dt"].to_pylist(), t["sha256"].to_pylist(), t["exif_orientation"].to_pylist(),
                               strict=True):
        if value is not None and (sha not in out or day >= out[sha][0]):
            out[sha] = (day, int(value))
    return {sha: value for sha, (_, value) in out.items()}

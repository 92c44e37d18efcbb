"""How a face becomes a model input: the square crop around it and the channel statistics.

Training, scoring and the report all crop and normalize the same way, so the geometry and the
constants live here, below all three, in plain numpy (scoring on ONNX must not need torch).
"""

from __future__ import annotations

import numpy as np

#: ImageNet channel statistics; torchvision's pretrained backbones expect inputs normalized so.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def face_crop_box(box: np.ndarray, margin: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A square crop around a face box: side = max(w, h) * (1 + margin), centred on the box.

    The square may extend past the image; Pillow fills the outside with black, which keeps
    the face centred and undistorted instead of shifting it near borders.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1, 1.0) * (1.0 + margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    return left, top, left + round(side), top + round(side)

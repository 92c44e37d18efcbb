"""Face detection: SCRFD (insightface) over the stored images, and the face filter for labeling.

Modules, one verb each:

* :mod:`~pipeline.faces.decode` - image bytes to an RGB array fitted to the detector input;
* :mod:`~pipeline.faces.detector` - load SCRFD through insightface, run it, decode its outputs;
* :mod:`~pipeline.faces.detect_faces` - the stage: plan shards, detect a shard, write ``faces``;
* :mod:`~pipeline.faces.face_filter` - ``passes_face_filter``, the labeler's predicate.

Importing this package is cheap; onnxruntime and insightface load only with a detector.
"""

from pipeline.faces.face_filter import passes_face_filter

__all__ = ["passes_face_filter"]

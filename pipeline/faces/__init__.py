"""Face detection: SCRFD (insightface) over the stored images.

Modules, one verb each:

* :mod:`~pipeline.faces.decode` - image bytes to an RGB array fitted to the detector input;
* :mod:`~pipeline.faces.detector` - load SCRFD through insightface, run it, decode its outputs;
* :mod:`~pipeline.faces.photo_attributes` - measure a photo's attributes (face size, position and
  tilt; brightness, contrast, saturation, black and white, border, sharpness) from the pixels
  decoded for detection: the ``faces`` table's attribute columns;
* :mod:`~pipeline.faces.detect_faces` - the stage: plan shards, detect a shard, write ``faces``;
* ``models/`` - the shipped SCRFD-500MF detector and its license.

Which photos have the faces a dataset wants is the labeler's decision
(:func:`labeling.eligibility.apply_filters`), made from the ``faces`` table.

Importing this package is cheap; onnxruntime and insightface load only with a detector.
"""

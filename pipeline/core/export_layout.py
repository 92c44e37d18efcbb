"""The layout of an exported dataset, named once: ``likerank export`` writes it, training reads it.

An export is one folder (local or ``s3://``) per published labels run and format::

    <output>/
      export.json                 the manifest, written last: run, content hash, table versions,
                                  format, tombstones checked, and "files": one {"name", "split",
                                  "samples"} per data file (training reads the shards by it)
      croissant.json              MLCommons Croissant 1.0 metadata with its Responsible-AI fields
      DATASHEET.md                the same in prose ("Datasheets for Datasets" questions)
      _progress.json              the resume journal: the files finished so far
      webdataset: <split>-000000.tar ...   tar shards, ``export.shard_size`` samples each
      hf:         data/<split>-00000-of-00001.parquet + README.md (dataset card with its YAML header)
      parquet:    <split>.parquet

A webdataset sample is ``<key>.jpg`` or ``<key>.png`` (the stored bytes: metadata stripped,
pixels as downloaded) and ``<key>.json`` (:data:`SAMPLE_FIELDS`). The key is
:func:`sample_key`: opaque, stable across runs, and carrying no platform identifier.
"""

from __future__ import annotations

import hashlib

FORMATS = ("webdataset", "hf", "parquet")
SPLITS = ("train", "val", "test")

MANIFEST = "export.json"
CROISSANT = "croissant.json"
DATASHEET = "DATASHEET.md"
HF_CARD = "README.md"
#: The resume journal: which files are finished (name, split, samples, sha256), and of which run,
#: format and rows. Written first and after each file, kept beside the manifest.
PROGRESS = "_progress.json"


def shard_name(split: str, index: int) -> str:
    """The tar shard ``index`` of ``split`` (a webdataset export)."""
    return f"{split}-{index:06d}.tar"


def parquet_name(fmt: str, split: str) -> str:
    """The Parquet file of ``split`` in an ``hf`` or ``parquet`` export."""
    return f"data/{split}-00000-of-00001.parquet" if fmt == "hf" else f"{split}.parquet"


def sample_key(post_id: str) -> str:
    """A sample's key: a hash of the post id, so shards name no post and hold no dot (webdataset
    splits a member name at its first dot)."""
    return hashlib.sha256(post_id.encode()).hexdigest()[:32]


#: The fields of a sample's JSON (and the columns of a Parquet export beside the image), with
#: what each means. Face boxes are pixels in the upright image: apply ``orientation`` (the EXIF
#: orientation the stored bytes no longer carry) before cropping.
SAMPLE_FIELDS: dict[str, str] = {
    "label": "1 if the post ranked in the upper half of its exposure group by likes, else 0",
    "score": "(rank_in_group - 0.5) / group_size: the within-group rank as a fraction",
    "group_id": "exposure group (ids run on across sources; lower = higher exposure within a source)",
    "exposure": "followers * (1 + tag_bonus * (n_tags - 1)) at the observation used",
    "source": "platform of the post: 'mastodon' or 'bluesky'",
    "split": "train, val or test; disjoint by author",
    "face_box": "largest face [x1, y1, x2, y2], pixels of the upright image; null when none was recorded",
    "image_width": "width of the upright image the box refers to, pixels",
    "image_height": "height of the upright image the box refers to, pixels",
    "orientation": "EXIF orientation (1-8) to apply to the stored bytes; 1 = as stored",
    "image_sha256": "content address of the stored image bytes",
}

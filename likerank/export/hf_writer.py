"""A Hugging Face ``datasets`` folder: ``data/<split>-00000-of-00001.parquet`` per split and a
``README.md`` dataset card whose YAML header the Hub and ``load_dataset`` read.

The Parquet files carry the ``datasets`` feature metadata (the ``huggingface`` schema key that
``Features.arrow_schema`` writes): ``image`` is an ``Image`` feature (a ``{bytes, path}``
struct, decoded to PIL on access) and ``label`` a ``ClassLabel``. The rows are streamed
through :func:`likerank.export.parquet_writer.write_rows` rather than built in a ``Dataset``
first, so no Arrow cache of the whole split is written to ``~/.cache``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from likerank.export.parquet_writer import write_rows
from likerank.export.parts import Part, Tick, Written
from likerank.export.samples import Sample, Samples, StoredImage, sample_fields
from pipeline.core.storage import ImageStore

LABEL_NAMES = ["negative", "positive"]  # ClassLabel: 0 = lower half of its exposure group by likes


def features():
    """The ``datasets.Features`` of a row."""
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=LABEL_NAMES),
        "score": datasets.Value("float64"),
        "group_id": datasets.Value("int32"),
        "exposure": datasets.Value("float64"),
        "source": datasets.Value("string"),
        "split": datasets.Value("string"),
        "face_box": datasets.Sequence(datasets.Value("float32"), length=4),
        "image_width": datasets.Value("int32"),
        "image_height": datasets.Value("int32"),
        "orientation": datasets.Value("int8"),
        "image_sha256": datasets.Value("string"),
    })


def plan(samples: Samples) -> list[Part]:
    from likerank.export import parquet_writer

    return parquet_writer.plan(samples, "hf")


def write(part: Part, images: ImageStore, path: Path, tick: Tick) -> tuple[int, int]:
    feats = features()

    def row_of(sample: Sample, image: StoredImage) -> dict[str, Any]:
        # encode_example turns the image dict into the struct and checks each value's type.
        return feats.encode_example({"image": {"bytes": image.data, "path": f"{sample.key}.{image.ext}"},
                                     **sample_fields(sample, image)})

    return write_rows(part, images, path, tick, feats.arrow_schema, row_of)


def _yaml_features() -> list[dict[str, Any]]:
    """``dataset_info.features`` as ``datasets`` itself writes it into a card's header."""
    import datasets

    return datasets.DatasetInfo(features=features())._to_yaml_dict()["features"]


def card(run_id: str, files: list[Written], datasheet: str) -> str:
    """The dataset card: the YAML header (configs, features, splits, license, task) and the
    datasheet as its body."""
    import yaml

    splits = [w for w in files if w.name.startswith("data/")]
    header = {
        "license": "other",
        "license_name": "rights-remain-with-authors",
        "license_details": "Each photo's rights stay with its author. Research use only; see DATASHEET.md.",
        "task_categories": ["image-classification"],
        "tags": ["likerank", "engagement", "faces", "croissant"],
        "pretty_name": f"likerank labels run {run_id}",
        "size_categories": [_size_category(sum(w.samples for w in splits))],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": w.split, "path": w.name} for w in splits]}],
        "dataset_info": {
            "features": _yaml_features(),
            "splits": [{"name": w.split, "num_bytes": w.bytes, "num_examples": w.samples} for w in splits],
            "download_size": sum(w.bytes for w in splits),
            "dataset_size": sum(w.bytes for w in splits),
        },
    }
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + datasheet


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"



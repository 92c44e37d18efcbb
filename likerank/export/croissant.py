"""``croissant.json``: MLCommons Croissant 1.0 metadata with the Responsible-AI (RAI 1.0) fields.

Built with ``mlcroissant`` from the files actually written (each a FileObject with its sha256)
and from :class:`~likerank.export.facts.Facts`; :func:`build` refuses to return a document that
``mlcroissant`` finds errors in. One RecordSet per split:

- webdataset: ``<split>`` reads each sample's JSON from the shards (a FileSet of ``*.json``
  inside them), and its ``key`` references ``<split>-images``, the image members by key;
- hf, parquet: ``<split>`` reads the split's Parquet file, columns by name.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from likerank.export import datasheet
from likerank.export.facts import Facts
from likerank.export.parts import Written
from likerank.export.samples import MIME
from pipeline.core.export_layout import SAMPLE_FIELDS, SPLITS

RAI = "http://mlcommons.org/croissant/RAI/1.0"
CROISSANT = "http://mlcommons.org/croissant/1.0"


class CroissantInvalid(RuntimeError):
    """mlcroissant found errors in the metadata built."""


def _types() -> dict[str, Any]:
    import mlcroissant as mlc

    d = mlc.DataType
    return {"label": d.INTEGER, "score": d.FLOAT, "group_id": d.INTEGER, "exposure": d.FLOAT, "source": d.TEXT,
            "split": d.TEXT, "face_box": d.FLOAT, "image_width": d.INTEGER, "image_height": d.INTEGER,
            "orientation": d.INTEGER, "image_sha256": d.TEXT}


def _file_objects(files: list[Written], fmt: str) -> list[Any]:
    import mlcroissant as mlc

    encoding = "application/x-tar" if fmt == "webdataset" else "application/x-parquet"
    return [mlc.FileObject(id=w.name, name=w.name, content_url=w.name, encoding_formats=[encoding],
                           sha256=w.sha256, content_size=f"{w.bytes} B",
                           description=f"{w.split}: {w.samples} samples")
            for w in files]


def _fields(split: str, source: dict[str, str], fmt: str) -> list[Any]:
    """The SAMPLE_FIELDS of ``split``'s RecordSet, each read from ``source`` (file_set or file_object)."""
    import mlcroissant as mlc

    types = _types()
    out = []
    for name, meaning in SAMPLE_FIELDS.items():
        extract = mlc.Extract(json_path=f"$.{name}") if fmt == "webdataset" else mlc.Extract(column=name)
        out.append(mlc.Field(id=f"{split}/{name}", name=name, description=meaning, data_types=[types[name]],
                             is_array=True if name == "face_box" else None,
                             source=mlc.Source(**source, extract=extract)))
    return out


def _webdataset_sets(files: list[Written], exts: list[str]) -> tuple[list[Any], list[Any]]:
    import mlcroissant as mlc

    file_sets, record_sets = [], []
    for split in SPLITS:
        shards = [w.name for w in files if w.split == split]
        if not shards:
            continue
        json_files, image_files = f"{split}-json-files", f"{split}-image-files"
        file_sets += [
            mlc.FileSet(id=json_files, name=json_files, contained_in=shards, encoding_formats=["application/json"],
                        includes=["*.json"], description=f"the samples' fields ({split})"),
            mlc.FileSet(id=image_files, name=image_files, contained_in=shards,
                        encoding_formats=sorted({MIME.get(e, "application/octet-stream") for e in exts}),
                        includes=[f"*.{e}" for e in exts], description=f"the samples' images ({split})"),
        ]

        def key_from(file_set: str) -> Any:
            return mlc.Source(file_set=file_set, extract=mlc.Extract(file_property=mlc.FileProperty.filename),
                              transforms=[mlc.Transform(regex=r"^([0-9a-f]+)\..*$")])

        images = f"{split}-images"
        record_sets.append(mlc.RecordSet(id=images, name=images, key=[f"{images}/key"], fields=[
            mlc.Field(id=f"{images}/key", name="key", data_types=[mlc.DataType.TEXT], source=key_from(image_files),
                      description="the sample key (tar member name before its first dot)"),
            mlc.Field(id=f"{images}/image", name="image", data_types=[mlc.DataType.IMAGE_OBJECT],
                      source=mlc.Source(file_set=image_files, extract=mlc.Extract(file_property=mlc.FileProperty.content)),
                      description="the stored image bytes (metadata stripped); apply `orientation` to view upright"),
        ]))
        record_sets.append(mlc.RecordSet(id=split, name=split, description=f"the {split} split", fields=[
            mlc.Field(id=f"{split}/key", name="key", data_types=[mlc.DataType.TEXT], source=key_from(json_files),
                      references=mlc.Source(field=f"{images}/key"), description="joins a sample to its image"),
            *_fields(split, {"file_set": json_files}, "webdataset"),
        ]))
    return file_sets, record_sets


def _parquet_sets(files: list[Written], fmt: str) -> list[Any]:
    import mlcroissant as mlc

    record_sets = []
    for w in files:
        image = mlc.Field(id=f"{w.split}/image", name="image", data_types=[mlc.DataType.IMAGE_OBJECT],
                          description="the stored image bytes (metadata stripped); apply `orientation` to view upright",
                          source=mlc.Source(file_object=w.name, extract=mlc.Extract(column="image"),
                                            transforms=[mlc.Transform(json_path="bytes")] if fmt == "hf" else []))
        record_sets.append(mlc.RecordSet(id=w.split, name=w.split, description=f"the {w.split} split",
                                         fields=[image, *_fields(w.split, {"file_object": w.name}, fmt)]))
    return record_sets


def _day(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def build(facts: Facts, fmt: str, files: list[Written], exts: list[str], version: str) -> dict[str, Any]:
    """The Croissant JSON-LD of an export of ``files`` (``exts``: the image extensions written)."""
    import mlcroissant as mlc

    data_files = [w for w in files if w.samples or w.missing]
    distribution: list[Any] = _file_objects(data_files, fmt)
    if fmt == "webdataset":
        file_sets, record_sets = _webdataset_sets(data_files, exts or ["jpg"])
        distribution += file_sets
    else:
        record_sets = _parquet_sets(data_files, fmt)
    window = facts.created or facts.scraped
    text = datasheet.facts_text(facts)
    metadata = mlc.Metadata(
        name=f"likerank-{facts.run_id}",
        description=text["summary"],
        conforms_to=[CROISSANT, RAI],
        url="https://github.com/likerank/likerank",
        license=["other: each photo's rights remain with its author; research use only (see DATASHEET.md)"],
        version="1.0.0",
        date_published=datetime.now(UTC),
        creators=[mlc.Organization(name="likerank")],
        cite_as=f"likerank labels run {facts.run_id} (labels sha256 {facts.pointer.get('labels_sha256', '')})",
        keywords=["faces", "engagement", "likes", "image classification", *facts.hashtags],
        distribution=distribution,
        record_sets=record_sets,
        data_collection=text["collection"],
        data_collection_type=["Web Scraping", "Secondary Data Analysis"],
        data_collection_timeframe=[_day(window[0]), _day(window[1])] if window else None,
        data_collection_raw_data=text["sources"],
        data_preprocessing_protocol=[text["preprocessing"]],
        data_annotation_protocol=[text["annotation"]],
        data_annotation_platform=["likerank (automatic, no human annotators)"],
        annotations_per_item="1 (a deterministic rule)",
        machine_annotation_tools=[f"likerank labeler {facts.labeler!r}, parameters hash {facts.params_hash}"],
        data_biases=text["biases"],
        data_limitations=text["limitations"],
        data_use_cases=text["uses"],
        data_social_impact=text["impact"],
        personal_sensitive_information=text["personal"],
        data_release_maintenance_plan=text["maintenance"],
    )
    if metadata.issues.errors:
        raise CroissantInvalid(metadata.issues.report())
    return metadata.to_json()

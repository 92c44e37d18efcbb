"""The unit an export writes, skips when finished, and resumes: one file and its samples."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from likerank.export.samples import Sample, StoredImage, read_image
from pipeline.core.storage import ImageStore


@dataclass(frozen=True)
class Part:
    """A file to write: a tar shard or a split's Parquet file, with the samples it holds."""

    name: str  # path inside the export folder
    split: str
    samples: list[Sample]


@dataclass(frozen=True)
class Written:
    """A finished file, as the manifest and the Croissant file list it."""

    name: str
    split: str
    samples: int  # samples in the file
    missing: int  # samples planned for it whose image the store no longer had
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"name": self.name, "split": self.split, "samples": self.samples, "missing_images": self.missing,
                "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict) -> Written:
        return cls(name=d["name"], split=d["split"], samples=int(d["samples"]), missing=int(d["missing_images"]),
                   bytes=int(d["bytes"]), sha256=d["sha256"])


#: Called once per sample handled, with its image (None: missing from the store): advances the
#: progress bar and records the image extensions written.
Tick = Callable[[StoredImage | None], None]


def readable_samples(part: Part, images: ImageStore, tick: Tick) -> Iterator[tuple[Sample, StoredImage]]:
    """``part``'s samples whose image the store still has, each with its bytes; every sample,
    read or missing, ticks the progress. A writer's missing count is len(part.samples) - written."""
    for sample in part.samples:
        image = read_image(images, sample)
        tick(image)
        if image is not None:
            yield sample, image

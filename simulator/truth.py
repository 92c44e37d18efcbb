"""The world's ground truth as a table: what the server never tells, for judging labels.

One row per status (boosts and text/video posts included, told apart by ``kind``); the
image columns describe the post's first image (the one the pipeline labels) and are null
for posts without one. ``post_id`` is the world's status id: the id the Mastodon API serves,
and for a Bluesky post (``platform``) the id behind its at-URI (:func:`simulator.bluesky.at_uri`
maps one to the other; :meth:`simulator.bluesky.BlueskyIndex.post_by_uri` goes back).
``source_id`` is the part of a scraper's post id the truth can know: the Mastodon status id,
or the Bluesky record key (likerank's Bluesky post id adds a pseudonym after it).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from simulator.bluesky import tid
from simulator.world import World


def _f(name: str, t: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, t, nullable=nullable, metadata={"doc": doc})


TRUTH_SCHEMA = pa.schema([
    _f("post_id", pa.string(), "Status id (as the API gives it)."),
    _f("kind", pa.string(), "photo, text, video or boost."),
    _f("author_id", pa.string(), "Account id of the author."),
    _f("author_followers", pa.int64(), "Author's followers (constant in the world)."),
    _f("created_at", pa.timestamp("ms", tz="UTC"), "When the status was posted."),
    _f("tags", pa.list_(pa.string()), "Tags, lower case (empty for boosts)."),
    _f("n_tags", pa.int32(), "Number of tags."),
    _f("reblog_of", pa.string(), "Boosted status id (boosts only).", nullable=True),
    _f("quality", pa.float64(), "Hidden quality (log-likes scale); null for boosts.", nullable=True),
    _f("visual_quality", pa.float64(), "Part of quality explained by the first image's factors.", nullable=True),
    _f("expected_likes", pa.float64(), "Saturated mean likes (likes model)."),
    _f("final_likes", pa.int64(), "Likes the post ends with once saturated."),
    _f("like_tau_days", pa.float64(), "Time constant of the post's like arrivals, days."),
    _f("media_id", pa.string(), "First image's attachment id.", nullable=True),
    _f("has_face", pa.bool_(), "First image contains a face."),
    _f("n_faces", pa.int32(), "Faces composed into the first image."),
    _f("image_kind", pa.string(), "face, group or noface.", nullable=True),
    _f("face_share", pa.float64(), "Largest face-box height / frame height.", nullable=True),
    _f("face_area_share", pa.float64(), "Largest face-box area / image area.", nullable=True),
    _f("brightness", pa.float64(), "Brightness multiplier (< 1 darker).", nullable=True),
    _f("saturation", pa.float64(), "Saturation multiplier (0 = black and white).", nullable=True),
    _f("filter", pa.string(), "normal, washed_out or bw.", nullable=True),
    _f("border", pa.bool_(), "White border.", nullable=True),
    _f("group_photo", pa.bool_(), "The group photo.", nullable=True),
    _f("face_source", pa.string(), "Source photo of the faces or scene.", nullable=True),
    _f("image_format", pa.string(), "JPEG or PNG.", nullable=True),
    _f("image_width", pa.int32(), "Pixels.", nullable=True),
    _f("image_height", pa.int32(), "Pixels.", nullable=True),
    _f("platform", pa.string(), "mastodon or bluesky: where the author lives and the post is served."),
    _f("source_id", pa.string(), "What a scraper's post id starts with: the status id on Mastodon, the "
                                 "record key (rkey) of the post's at-URI on Bluesky."),
])


def truth_table(world: World) -> pa.Table:
    """The ground truth of every status in the world (see :data:`TRUTH_SCHEMA`)."""
    cols: dict[str, list] = {f.name: [] for f in TRUTH_SCHEMA}
    eng = world.engagement
    for p in world.posts:
        a = world.accounts[p.author]
        img = world.media[p.first_image].plan if p.first_image >= 0 else None
        row = {
            "post_id": p.id, "kind": p.kind, "author_id": a.id, "author_followers": a.followers,
            "created_at": p.created_ms, "tags": list(p.tags), "n_tags": len(p.tags),
            "reblog_of": world.posts[p.reblog_of].id if p.reblog_of >= 0 else None,
            "quality": None if math.isnan(p.quality) else p.quality,
            "visual_quality": None if math.isnan(p.visual_quality) else p.visual_quality,
            "expected_likes": float(eng.mu[p.index]),
            "final_likes": int(eng.start[p.index + 1] - eng.start[p.index]),
            "like_tau_days": float(eng.tau_days[p.index]),
            "media_id": world.media[p.first_image].id if img else None,
            "has_face": bool(img and img.has_face), "n_faces": img.n_faces if img else 0,
            "platform": world.platform(p.index),
            "source_id": tid(p.created_ms, p.id) if world.platform(p.index) == "bluesky" else p.id,
        }
        if img:
            f = img.factors
            row.update({
                "image_kind": f.kind, "face_share": f.face_share if img.has_face else 0.0,
                "face_area_share": img.largest_face_area_share, "brightness": f.brightness,
                "saturation": f.saturation, "filter": f.filter, "border": f.border,
                "group_photo": f.kind == "group", "face_source": img.source, "image_format": img.format,
                "image_width": img.width, "image_height": img.height,
            })
        for name in cols:
            cols[name].append(row.get(name))
    return pa.Table.from_pydict(cols, schema=TRUTH_SCHEMA)


def write_truth(world: World, path: str | Path) -> Path:
    """Write the truth table to a Parquet file (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(truth_table(world), buf, compression="zstd")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path

"""One pyarrow schema per table, defined once.

Writers check frames against these (:func:`conform`), readers and the validation suites use
them, and README's table reference is generated from them (:func:`pipeline.core.tables.markdown_reference`).
Every field carries a ``doc`` in its metadata.

Every table is a Delta table; where each lives under the storage root, how it is partitioned
and the identity key its rows are merged on (:attr:`Table.identity`):

=============  ======================  ============================================  ==========================
table          path                    partition                                     identity
=============  ======================  ============================================  ==========================
posts          ``posts/``              ``dt``: logical date of the scrape run        dt, instance, post_id
engagement     ``engagement/``         ``dt``: date of the observation run           dt, instance, post_id
downloads      ``downloads/``          ``dt``: logical date of the scrape run        dt, source, post_id, url
images         ``images/index/``       ``dt``; the bytes are ``images/<aa>/<sha>``   dt, sha256
faces          ``faces/``              ``dt``: date and shard of the detection       dt, sha256, detector_id
labels         ``labels/``             ``run``: one labeling run                     run, post_id
tombstones     ``state/tombstones/``   none (likerank's own state)                   kind, key_hash
post_refs      ``state/refs/``         none (likerank's own state)                   platform, host, post_id
=============  ======================  ============================================  ==========================

Files written once per run rather than as a partitioned table (:data:`FILES`):
``predictions`` at ``models/<run>/predictions.parquet`` (see :mod:`pipeline.core.keys`).

A ``downloads`` row is one try of one URL: a failed try that may succeed later carries
``next_attempt_at``, and the run that tries again writes a new row (``attempt`` + 1) in its own
partition; the latest row per ``(source, post_id, url)`` is the URL's state.

A post with several images is one ``posts`` row with all its ``image_urls`` (in the
author's order); the first image is the one labeled, since likes belong to the post.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


def f(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


UTC_TS = pa.timestamp("us", tz="UTC")

POSTS = pa.schema([
    f("source", pa.string(), "Platform: 'mastodon' or 'bluesky'."),
    f("instance", pa.string(), "Base URL of the instance the post was read from."),
    f("hashtag", pa.string(), "The hashtag queried (lower case, no '#')."),
    f("post_id", pa.string(), "Post id, unique within its instance (Mastodon status id)."),
    f("created_at", UTC_TS, "When the post was published (UTC)."),
    f("author_key", pa.string(), "Keyed hash of the author's account URI (pseudonym)."),
    f("author_followers", pa.int64(), "Author's follower count when scraped."),
    f("tags", pa.list_(pa.string()), "Tag names, lower case."),
    f("n_tags", pa.int32(), "Number of tags (the queried one included)."),
    f("likes", pa.int64(), "Likes (favourites_count) when scraped."),
    f("reposts", pa.int64(), "Reposts (reblogs_count) when scraped."),
    f("replies", pa.int64(), "Replies (replies_count) when scraped."),
    f("views", pa.int64(), "Views, where the source reports them.", nullable=True),
    f("image_urls", pa.list_(pa.string()), "Image attachment URLs, in order; the first is labeled."),
    f("sensitive", pa.bool_(), "Marked sensitive by its author."),
    f("language", pa.string(), "ISO 639 language code, if given.", nullable=True),
    f("scraped_at", UTC_TS, "When likerank read the post (UTC)."),
])

ENGAGEMENT = pa.schema([
    f("source", pa.string(), "Platform: 'mastodon' or 'bluesky'."),
    f("instance", pa.string(), "Instance base URL."),
    f("post_id", pa.string(), "Post id."),
    f("observed_at", UTC_TS, "When the counts were read (UTC)."),
    f("likes", pa.int64(), "Likes at observation."),
    f("reposts", pa.int64(), "Reposts at observation."),
    f("replies", pa.int64(), "Replies at observation."),
    f("views", pa.int64(), "Views at observation, where reported.", nullable=True),
    f("author_followers", pa.int64(), "Author's followers at observation."),
    f("age_days", pa.float64(), "Post age at observation, days."),
])

DOWNLOADS = pa.schema([
    f("source", pa.string(), "Platform: 'mastodon' or 'bluesky'."),
    f("post_id", pa.string(), "Post the URL belongs to."),
    f("url", pa.string(), "The URL attempted."),
    f("status", pa.string(), "ok, http_error, timeout, too_large, not_image, decode_error, bomb, blocked, bad_url, "
                             "connection_error, redirect_loop, opted_out (X-Robots-Tag noai/noimageai or a TDM "
                             "reservation: the bytes are not kept), robots_disallowed (the host's robots.txt "
                             "disallows it: never requested), not_strippable (a TIFF or AVIF whose metadata cannot "
                             "be removed: not kept), deferred (the host asked for a wait longer than "
                             "scrape.max_server_wait_s or the download's time budget, e.g. X-RateLimit-Remaining: 0 "
                             "with a far reset, or its robots.txt could not be read: not a failure; a later run "
                             "tries it). A timeout, connection_error, deferred, or http_error 429/5xx is tried again "
                             "by a later run (next_attempt_at); every other status is final."),
    f("http_status", pa.int32(), "Last HTTP status code, if a response came.", nullable=True),
    f("error", pa.string(), "What went wrong, for humans.", nullable=True),
    f("bytes", pa.int64(), "Body bytes received."),
    f("elapsed_ms", pa.float64(), "Wall time of the attempt(s), milliseconds."),
    f("attempts", pa.int32(), "Requests sent within this try (1 + retries; 0 when none was sent, e.g. a "
                              "deferred URL whose host was already closed)."),
    f("sha256", pa.string(), "Content hash of the stored image, when status is ok.", nullable=True),
    f("attempted_at", UTC_TS, "When the download started (UTC)."),
    f("attempt", pa.int32(), "Which try of this URL the row records, counted from 1 across scrape runs; each try is "
                             "its own row in the partition of the run that made it (a run never tries again a URL "
                             "that already has a row in its own partition, so no try replaces another). Null on "
                             "rows written before tries were counted.", nullable=True),
    f("next_attempt_at", UTC_TS, "When a later scrape run may try this URL again (UTC): after "
                                 "scrape.retry_delay_s * 2**(attempt-1), or the server's reset when later. Null "
                                 "when the row is final: a final status, or scrape.max_attempts tries made.",
      nullable=True),
    f("opt_out_reason", pa.string(), "Why the image was refused: noai (X-Robots-Tag noai/noimageai), robots "
                                     "(robots.txt), tdm (a TDM reservation: tdm-reservation header or tdmrep.json); "
                                     "null otherwise.", nullable=True),
])

IMAGES = pa.schema([
    f("sha256", pa.string(), "Content hash (hex); the key of the stored bytes."),
    f("width", pa.int32(), "Width, pixels."),
    f("height", pa.int32(), "Height, pixels."),
    f("format", pa.string(), "Pillow format name, e.g. JPEG, PNG."),
    f("bytes", pa.int64(), "Size of the stored file, bytes."),
    f("storage_key", pa.string(), "Key under the storage root: images/<aa>/<sha256>."),
    f("metadata_stripped", pa.bool_(), "The stored bytes carry no EXIF, XMP, IPTC, GPS or comments (removed "
                                       "segment by segment, pixels untouched); null: stored before stripping, "
                                       "until `likerank migrate` cleans it.", nullable=True),
    f("metadata_removed", pa.list_(pa.string()), "Kinds of metadata removed: exif, xmp, iptc, comment, text, "
                                                 "mpf, trailer, app<n>; empty when there was none.", nullable=True),
    f("exif_orientation", pa.int32(), "EXIF orientation (1..8) the original carried, applied when decoding; "
                                      "null when it had none.", nullable=True),
])

FACE = pa.struct([
    pa.field("x1", pa.float32()), pa.field("y1", pa.float32()),
    pa.field("x2", pa.float32()), pa.field("y2", pa.float32()),
    pa.field("score", pa.float32()),
    pa.field("landmarks", pa.list_(pa.float32(), 10)),  # x,y of eyes, nose, mouth corners
])

FACES = pa.schema([
    f("sha256", pa.string(), "Image content hash."),
    f("detector_id", pa.string(), "sha256 of the detector model file."),
    f("status", pa.string(), "ok, decode_error, missing, error."),
    f("error", pa.string(), "What went wrong, for humans.", nullable=True),
    f("width", pa.int32(), "Image width, pixels.", nullable=True),
    f("height", pa.int32(), "Image height, pixels.", nullable=True),
    f("phash", pa.string(), "64-bit perceptual hash (imagehash.phash) of the decoded image, 16 hex digits; "
                            "null when it did not decode.", nullable=True),
    f("n_faces", pa.int32(), "Faces found at or above the detector threshold."),
    f("faces", pa.list_(FACE), "Each face: box (pixels), score, five landmarks (x,y pairs)."),
    f("largest_face_share", pa.float32(), "Largest face box area / image area, fraction 0-1; 0 when no face "
                                          "was found.", nullable=True),
    f("largest_face_cx", pa.float32(), "Largest face centre x / width, fraction 0-1 from the left.",
      nullable=True),
    f("largest_face_cy", pa.float32(), "Largest face centre y / height, fraction 0-1 from the top.",
      nullable=True),
    f("detected_at", UTC_TS, "When detection ran (UTC)."),
    # The photo's attributes (pipeline/faces/photo_attributes.py), measured by the face stage from
    # the pixels it decoded for detection. Null on rows that did not decode, and on rows written
    # before the columns existed (likerank.report.findings measures those from the bytes).
    f("largest_face_height", pa.float32(), "Largest face box height / image height, fraction 0-1; 0 when no "
                                           "face was found.", nullable=True),
    f("head_tilt", pa.float32(), "Head roll of the largest face, degrees 0-180: the angle between the line "
                                 "through its two eye landmarks and the horizontal, without sign; null when no "
                                 "face was found.", nullable=True),
    f("brightness", pa.float32(), "99th percentile of luma (Rec. 601), levels 0-255, inside any uniform border.",
      nullable=True),
    f("contrast", pa.float32(), "Standard deviation of luma (Rec. 601), levels 0-255, inside any uniform border.",
      nullable=True),
    f("saturation", pa.float32(), "Mean HSV saturation, fraction 0-1, of the pixels inside any uniform border "
                                  "whose HSV value is at least 26 of 255 (darker ones are noise).", nullable=True),
    f("black_and_white", pa.bool_(), "No colour beyond compression noise: at most 1 % of pixels have a max-min "
                                     "channel spread above 6 levels (0-255).", nullable=True),
    f("border", pa.bool_(), "A uniform frame of one colour on all four sides, each at least 2 px wide with the "
                            "image at 256 px on its long side.", nullable=True),
    f("sharpness", pa.float32(), "Variance of the Laplacian of luma (levels squared, luma 0-255) with the image "
                                 "at 256 px on its long side, inside any uniform border.", nullable=True),
])

LABELS = pa.schema([
    f("post_id", pa.string(), "Post id."),
    f("source", pa.string(), "Platform of the post ('mastodon', 'bluesky'); groups never mix sources."),
    f("image_sha256", pa.string(), "The labeled image (the post's first)."),
    f("author_key", pa.string(), "Author pseudonym."),
    f("likes", pa.int64(), "Likes used (observed at age >= min_age_days)."),
    f("followers", pa.int64(), "Author followers at that observation."),
    f("n_tags", pa.int32(), "Tags on the post."),
    f("age_days", pa.float64(), "Post age when its likes were observed, days."),
    f("exposure", pa.float64(), "followers * (1 + tag_bonus * (n_tags - 1)), or views."),
    f("group_id", pa.int32(), "Exposure group. Ids run on across sources (in name order): within a source, "
                              "a lower id is a higher exposure. Each group's span: max(exposure) / min(exposure)."),
    f("rank_in_group", pa.int32(), "1..group_size by likes ascending (1 = fewest)."),
    f("label", pa.int8(), "1 if rank_in_group > group_size / 2, else 0."),
    f("score", pa.float64(), "(rank_in_group - 0.5) / group_size."),
    f("split", pa.string(), "train, val or test; assigned per author."),
    f("labeler", pa.string(), "Which labeler made the row ('groups' = the rule)."),
    f("params_hash", pa.string(), "Hash of the [labeling] parameter set."),
    f("run_id", pa.string(), "Labeling run id."),
])


@dataclass(frozen=True)
class Table:
    name: str
    path: str  # the Delta table's folder under the storage root
    partition: str  # partition column (a string), or "" for an unpartitioned table
    schema: pa.Schema
    identity: tuple[str, ...] = ()  # the columns a row is merged on (partition column included)


TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table("posts", "posts", "dt", POSTS, ("dt", "instance", "post_id")),
        Table("engagement", "engagement", "dt", ENGAGEMENT, ("dt", "instance", "post_id")),
        Table("downloads", "downloads", "dt", DOWNLOADS, ("dt", "source", "post_id", "url")),
        Table("images", "images/index", "dt", IMAGES, ("dt", "sha256")),
        Table("faces", "faces", "dt", FACES, ("dt", "sha256", "detector_id")),
        Table("labels", "labels", "run", LABELS, ("run", "post_id")),
    )
}


PREDICTIONS = pa.schema([
    f("post_id", pa.string(), "The labeled post."),
    f("split", pa.string(), "'val' or 'test' (user-disjoint splits)."),
    f("prob", pa.float32(), "Predicted probability of label 1."),
    f("pred_score", pa.float32(), "Predicted rank score in (0, 1); NaN when the model has no score head."),
    f("label", pa.int8(), "The post's label (0 or 1)."),
    f("weight", pa.float32(), "1, or 0 where the image could not be read (excluded from the metrics)."),
])

TOMBSTONES = pa.schema([
    f("kind", pa.string(), "'author' or 'post'."),
    f("key_hash", pa.string(), "HMAC-SHA256, under the pseudonym key, of the author key or of 'instance\\npost_id': "
                               "never the identifier itself."),
    f("images", pa.list_(pa.string()), "Digests of the images the forgotten posts referenced (cleaned once)."),
    f("reason", pa.string(), "Why: 'request', 'deleted at source', 'opted out'."),
    f("forgotten_at", UTC_TS, "When (UTC)."),
])

POST_REFS = pa.schema([
    f("platform", pa.string(), "Source platform."),
    f("host", pa.string(), "Instance host the post was read from."),
    f("post_id", pa.string(), "Post id."),
    f("author_key", pa.string(), "Author pseudonym (so forget can find the reference)."),
    f("ref", pa.string(), "What a re-read needs: a Bluesky post's at:// URI (it names the author's DID)."),
])

#: Tables of likerank's own state, beside the analyst tables (no partition; merged on identity).
INTERNAL_TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table("tombstones", "state/tombstones", "", TOMBSTONES, ("kind", "key_hash")),
        Table("post_refs", "state/refs", "", POST_REFS, ("platform", "host", "post_id")),
    )
}

#: Tables written as one file per run (not hive-partitioned): name -> schema.
FILES: dict[str, pa.Schema] = {"predictions": PREDICTIONS}


class SchemaError(TypeError):
    """A frame does not match its table's schema. The message names table and column."""


def conform(table: str, data: pa.Table) -> pa.Table:
    """Return ``data`` in the column order and types of ``table``'s schema, or raise.

    Safe casts (e.g. int32 -> int64) are applied; anything lossy, missing or extra is an error
    naming the table, the column, the expected and the found type.
    """
    schema = (TABLES[table].schema if table in TABLES else INTERNAL_TABLES[table].schema if table in INTERNAL_TABLES
              else FILES[table])
    missing = [n for n in schema.names if n not in data.column_names]
    if missing:
        raise SchemaError(f"table {table}: missing column(s) {', '.join(missing)}")
    extra = [n for n in data.column_names if n not in schema.names]
    if extra:
        raise SchemaError(f"table {table}: unexpected column(s) {', '.join(extra)}")
    columns = []
    for fld in schema:
        col = data.column(fld.name)
        if not col.type.equals(fld.type):
            try:
                col = col.cast(fld.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise SchemaError(
                    f"table {table}: column {fld.name}: expected {fld.type}, found {data.column(fld.name).type}"
                ) from None
        if not fld.nullable and col.null_count:
            raise SchemaError(f"table {table}: column {fld.name}: {col.null_count} null value(s) in a non-null column")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)

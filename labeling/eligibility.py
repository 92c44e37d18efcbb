"""Which posts may be labeled (step 1 of the rule), and reading them in.

Both inputs become one *candidates* table (:data:`CANDIDATES`) with one row per post:

- :func:`read_candidates` joins the project's tables: the latest ``posts`` row per
  (instance, post_id); the latest ``engagement`` snapshot whose ``age_days >= min_age_days``;
  the ``downloads`` row with status ok for the post's first image URL (its sha256); the latest
  ok ``faces`` row of that image, counting only faces scoring ``>= faces.min_score``.
- :func:`read_input_file` reads a bring-your-own Parquet/CSV file (columns: docs/architecture.md,
  "The labeling rule").

:func:`apply_filters` then drops posts, each for the first reason that applies, in the order
of :data:`DROP_REASONS`; every drop is counted. A null in the candidates means "not known":
no mature observation (``age_days``), no downloaded image (``image_sha256``), no face
detection (``n_faces``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.config import Config, FacesConfig, LabelingConfig
from pipeline.core.forget import load_tombstones, salt_for
from pipeline.core.storage import Storage

CANDIDATES = pa.schema([
    ("post_id", pa.string()),
    # The platform: groups never mix sources. Dictionary-encoded: a handful of values over
    # millions of rows. "" (a file without the column) is one source.
    ("source", pa.dictionary(pa.int32(), pa.string())),
    ("author_key", pa.string()),
    ("image_sha256", pa.string()),  # null: no ok download of the first image; "" = not tracked (BYO)
    ("likes", pa.int64()),
    ("followers", pa.int64()),
    ("n_tags", pa.int32()),
    ("age_days", pa.float64()),  # null: no observation at age >= min_age_days
    ("views", pa.int64()),  # null: the source reports none
    ("n_faces", pa.int32()),  # faces scoring >= faces.min_score; null: not detected yet
    ("face_share", pa.float64()),  # largest counted face area / image area; null: unknown
])

#: Why a post is not labeled, in the order the checks run (a post counts under the first).
DROP_REASONS = (
    "forgotten",  # the author or post was removed by `likerank forget` (its rows are gone; a straggler is dropped)
    "duplicate_post_id",  # the same post_id read from two instances: the first instance wins
    "age_below_min",  # likes not observed at age >= min_age_days
    "followers_out_of_range",  # outside [min_followers, max_followers]
    "too_many_tags",  # more than max_tags
    "no_image",  # the first image was not downloaded (status ok)
    "no_face_detection",  # the image has no ok faces row yet
    "face_filter",  # fails faces.min_faces / max_faces / min_face_share
    "duplicate_image",  # same image sha256 as a post with a smaller post_id
    "partial_group",  # in the trailing partial group (the lowest exposure); set by the labeler
)


class InputError(ValueError):
    """A bring-your-own input file is unusable; the message names the file and every problem."""


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(DROP_REASONS, 0)


# --------------------------------------------------------------------------- filters


def apply_filters(cands: pa.Table, lab: LabelingConfig, faces: FacesConfig, *,
                  check_faces: bool = True, check_face_share: bool = True) -> tuple[np.ndarray, dict[str, int]]:
    """Which rows of ``cands`` are eligible (a boolean mask) and the count of dropped rows by reason.

    ``check_faces`` / ``check_face_share`` are off for files that carry no face columns.
    Images are checked where ``image_sha256`` is null; "" means "not tracked" and passes.
    """
    counts = empty_counts()
    alive = np.ones(cands.num_rows, dtype=bool)
    # The costly half of the duplicate-image check does not depend on the other filters: it
    # runs on a second core meanwhile (numpy releases the GIL).
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="label-images")
    shared = pool.submit(shared_image_rows, cands.column("image_sha256"))
    pool.shutdown(wait=False)

    # Batch by batch: each column is read in place (nulls filled), never copied whole.
    start = 0
    for batch in cands.to_batches():
        here = alive[start:start + batch.num_rows]  # a view: drops land in ``alive``
        start += batch.num_rows

        def drop(reason: str, bad: np.ndarray, here: np.ndarray = here) -> None:
            hit = here & bad
            counts[reason] += int(np.count_nonzero(hit))
            here[hit] = False

        def col(name: str, fill: float | int, batch: pa.RecordBatch = batch) -> np.ndarray:
            return filled(batch.column(name), fill)

        followers = col("followers", -1)
        drop("age_below_min", ~(col("age_days", np.nan) >= lab.min_age_days))  # NaN (no mature observation) fails
        drop("followers_out_of_range", (followers < lab.min_followers) | (followers > lab.max_followers))
        drop("too_many_tags", col("n_tags", 0) > lab.max_tags)
        drop("no_image", batch.column("image_sha256").is_null().to_numpy(zero_copy_only=False))
        if check_faces:
            n_faces = col("n_faces", -1)
            drop("no_face_detection", n_faces < 0)
            bad = n_faces < faces.min_faces
            if faces.max_faces:
                bad |= n_faces > faces.max_faces
            if check_face_share and faces.min_face_share > 0:
                bad |= ~(col("face_share", np.nan) >= faces.min_face_share)
            drop("face_filter", bad)
    duplicate = duplicate_images(cands, alive, shared.result())  # the last reason: only alive rows
    counts["duplicate_image"] = int(np.count_nonzero(duplicate))
    alive[duplicate] = False
    return alive, counts


def filled(values: pa.Array, fill: float | int, dtype: type | None = None) -> np.ndarray:
    """One Arrow array as numpy with ``fill`` for nulls (cast to ``dtype`` first where it has
    nulls and one is given): a view of Arrow's buffer when there is no null to fill."""
    if values.null_count:
        if dtype is not None:
            values = values.cast(pa.from_numpy_dtype(dtype))
        values = values.fill_null(fill)
    return values.to_numpy(zero_copy_only=False)


def numpy_column(column: pa.ChunkedArray | pa.Array, dtype: type, fill: float | int,
                 keep: np.ndarray | None = None) -> np.ndarray:
    """One numeric column as a numpy array with ``fill`` for nulls (only the rows where the
    boolean ``keep`` is true, if given), written chunk by chunk into one array: ``fill_null``,
    ``np.asarray`` then indexing copy the whole column three times (0.2-0.5 s per 10M rows,
    most of it faulting in fresh memory)."""
    out = np.empty(len(column) if keep is None else int(np.count_nonzero(keep)), dtype=dtype)
    start = at = 0
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        values = filled(chunk, fill, dtype)
        if keep is not None:
            values = values[keep[start:start + len(values)]]
        start += len(chunk)
        out[at:at + len(values)] = values
        at += len(values)
    return out


def filter_rows(table: pa.Table, mask: np.ndarray) -> pa.Table:
    """``table.filter(mask)``, column by column: 6x faster than Table.filter at 10M rows (pyarrow 26)."""
    keep = pa.array(mask)
    return pa.Table.from_arrays([c.filter(keep) for c in table.columns], schema=table.schema)


def duplicate_images(cands: pa.Table, alive: np.ndarray, shared: np.ndarray | None = None) -> np.ndarray:
    """Rows whose image another alive row with a smaller post_id also uses (empty sha: never).

    ``shared``: :func:`shared_image_rows` of the table, if already known. The exact decision is
    made on the full strings of the alive rows among them, so a key collision never drops a post.
    """
    import pandas as pd

    dup = np.zeros(cands.num_rows, dtype=bool)
    if shared is None:
        shared = shared_image_rows(cands.column("image_sha256"))
    suspects = shared[alive[shared]]
    if len(suspects) < 2:
        return dup
    frame = pd.DataFrame({"i": suspects, "sha": take_rows(cands.column("image_sha256"), suspects),
                          "post_id": take_rows(cands.column("post_id"), suspects)})
    frame = frame.sort_values(["sha", "post_id"], kind="stable")
    dup[frame.loc[frame.duplicated("sha", keep="first"), "i"].to_numpy()] = True
    return dup


def shared_image_rows(shas: pa.ChunkedArray) -> np.ndarray:
    """The rows (ascending) with a non-empty image value whose short key another row also has.

    The key: for sha256 hex digests (the pipeline's), 32 bits from their first 8 characters,
    read straight from Arrow's buffer, no string copied; for other values, DuckDB's 64-bit
    ``hash``. Every row sharing an image is among them, and at 10M images some 40k others.
    """
    import pandas as pd

    digests = _digest_keys(shas)
    if digests is None:
        rows = np.flatnonzero(numpy_column(pc.binary_length(shas), np.int32, 0) > 0)
        keys = _hashed_keys(shas, rows)
    else:
        rows, keys = digests
    if len(rows) < 2:
        return np.empty(0, dtype=np.int64)
    ordered = np.sort(keys)  # one sorted copy: at 10M rows 2x faster than a DuckDB GROUP BY, 10x less memory
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    return rows[pd.Series(keys).isin(repeated).to_numpy()]  # a hash probe of the few repeated keys


def take_rows(column: pa.ChunkedArray, rows: np.ndarray) -> list:
    """The values at ascending ``rows`` as Python objects, taken chunk by chunk: pyarrow's
    ChunkedArray.take first concatenates every chunk (seconds and GBs for 10M strings)."""
    bounds = np.cumsum([0] + [len(c) for c in column.chunks])
    chunk_of = np.searchsorted(bounds, rows, side="right") - 1
    out: list = []
    for i in np.unique(chunk_of):
        out += column.chunk(int(i)).take(pa.array(rows[chunk_of == i] - bounds[i])).to_pylist()
    return out


#: Fibonacci hashing's multiplier (2**64 / golden ratio): its top 32 bits of ``word * _MIX``
#: spread the 32 bits of 8 hex characters over a uint32.
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _digest_keys(shas: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows with a non-empty value, and a uint32 key per such row from the first 8
    characters of its value, read from the string buffers in place; None unless every such
    value is 64 characters (a hex sha256).

    32 bits: sorting them is twice as fast as 64, and the extra chance collisions (about
    n**2 / 2**33 pairs) only add rows to the exact check.
    """
    rows = np.empty(len(shas), dtype=np.int32 if len(shas) < 2**31 else np.int64)
    keys = np.empty(len(shas), dtype=np.uint32)
    start = done = 0
    for chunk in shas.chunks:
        if not pa.types.is_string(chunk.type):
            return None
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
        lengths = np.diff(offsets)
        if chunk.null_count == 0 and np.all(lengths == 64):
            # Every value a digest, back to back: their first words are one strided view.
            at = np.arange(len(chunk))
            heads = np.ndarray((len(chunk),), dtype="<u8", buffer=chunk.buffers()[2],
                               offset=int(offsets[0]) if len(chunk) else 0, strides=(64,))
        else:
            wanted = lengths > 0
            if chunk.null_count:
                wanted &= np.asarray(chunk.is_valid())
            at = np.flatnonzero(wanted)
            if not np.all(lengths[at] == 64):
                return None
            firsts = offsets[at].astype(np.int64)
            data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8) if len(at) else np.zeros(0, np.uint8)
            heads = np.empty(len(at), dtype=np.uint64)
            # One 8-byte word at each value's start, gathered from a uint64 view of the buffer
            # shifted by the start's remainder mod 8 (one view per remainder; usually just one).
            remainder = firsts & 7
            for r in np.flatnonzero(np.bincount(remainder, minlength=8)):
                sel = remainder == r
                words = data[r:r + (len(data) - r) // 8 * 8].view("<u8")
                heads[sel] = words[(firsts[sel] - r) // 8]
        rows[done:done + len(at)] = at + start
        keys[done:done + len(at)] = (heads * _MIX) >> np.uint64(32)  # the product wraps mod 2**64
        start += len(chunk)
        done += len(at)
    return rows[:done], keys[:done]


def _hashed_keys(shas: pa.ChunkedArray, rows: np.ndarray) -> np.ndarray:
    """DuckDB's 64-bit ``hash`` of each value (fast, parallel) for ``rows``."""
    from labeling.duck import connect

    with connect() as con:
        con.register("t", pa.table({"sha": shas}))
        return np.asarray(con.sql("SELECT hash(sha) FROM t").to_arrow_table().column(0))[rows]


# --------------------------------------------------------------------------- project tables

#: The one face measure the filter reads, per image: its latest ok detection, the number of
#: faces scoring >= $min_score, and the largest such face's area / image area (0 without one;
#: the stored ``largest_face_share``, over all faces, where the size is unknown).
FACE_COUNTS_SQL = """
    SELECT sha256,
           len(list_filter(faces, lambda x: x.score >= $min_score))::INTEGER AS n_faces,
           CASE WHEN width > 0 AND height > 0
                THEN coalesce(list_max(list_transform(list_filter(faces, lambda x: x.score >= $min_score),
                                                      lambda x: (x.x2 - x.x1) * (x.y2 - x.y1))) / (width * height), 0)
                ELSE largest_face_share END::DOUBLE AS face_share
    FROM faces
    WHERE status = 'ok'
    QUALIFY row_number() OVER (PARTITION BY sha256 ORDER BY detected_at DESC, detector_id) = 1
"""

_CANDIDATES_SQL = f"""
WITH p AS (
    SELECT instance, post_id, source, author_key, n_tags, image_urls[1] AS first_url
    FROM posts
    QUALIFY row_number() OVER (PARTITION BY instance, post_id ORDER BY scraped_at DESC, dt DESC) = 1
), o AS (
    SELECT instance, post_id, likes, author_followers, views, age_days
    FROM engagement
    WHERE age_days >= $min_age_days
    QUALIFY row_number() OVER (PARTITION BY instance, post_id
                               ORDER BY observed_at DESC, age_days DESC, likes DESC) = 1
), d AS (
    SELECT url, sha256 FROM downloads
    WHERE status = 'ok' AND sha256 IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY url ORDER BY attempted_at DESC, sha256) = 1
), f AS (
    -- Counted here, per image, not after the joins: DuckDB 2.0.0 gave wrong list lengths for
    -- list columns carried through the joins below (caught by tests/labeling/test_labels_io.py).
{FACE_COUNTS_SQL}
)
SELECT p.post_id, p.source, p.author_key, d.sha256 AS image_sha256, o.likes,
       o.author_followers AS followers, p.n_tags, o.age_days, o.views,
       f.n_faces, f.face_share, p.instance,
       row_number() OVER (PARTITION BY p.post_id ORDER BY p.instance) AS nth
FROM p
LEFT JOIN o ON o.instance = p.instance AND o.post_id = p.post_id
LEFT JOIN d ON d.url = p.first_url
LEFT JOIN f ON f.sha256 = d.sha256
ORDER BY p.post_id, p.instance  -- a deterministic row order for the labels file
"""


def face_counts(faces: pa.Table, min_score: float) -> pa.Table:
    """``sha256, n_faces, face_share`` per image of a ``faces`` table (:data:`FACE_COUNTS_SQL`)."""
    from labeling.duck import connect

    with connect() as con:
        con.register("faces", faces)
        return con.sql(FACE_COUNTS_SQL, params={"min_score": min_score}).to_arrow_table()


#: The tables a labels run reads (their versions are recorded in its record).
INPUT_TABLES = ("posts", "engagement", "downloads", "faces")


def read_candidates(storage: Storage, cfg: Config,
                    versions: dict[str, int | None] | None = None) -> tuple[pa.Table, dict[str, int]]:
    """Candidates from the project's posts, engagement, downloads and faces tables, each at
    its version in ``versions`` (default: the current one; see :func:`input_versions`).

    Returns the candidates and the count of ``duplicate_post_id`` drops (the other reasons
    are counted by :func:`apply_filters`). Tombstones are always read at their newest: a
    rebuild of a past run never brings back someone forgotten since.
    """
    from labeling.duck import connect
    from pipeline.core.tables import read_table

    versions = versions if versions is not None else input_versions(storage)

    columns = {
        "posts": ["instance", "post_id", "source", "author_key", "n_tags", "image_urls", "scraped_at", "dt"],
        "engagement": ["instance", "post_id", "observed_at", "likes", "author_followers", "views", "age_days"],
        "downloads": ["url", "status", "sha256", "attempted_at"],
        "faces": ["sha256", "detector_id", "status", "width", "height", "faces", "largest_face_share",
                  "detected_at"],
    }
    with connect() as con:
        for name, cols in columns.items():
            con.register(name, read_table(storage, name, columns=cols, version=versions.get(name)))
        joined = con.sql(_CANDIDATES_SQL, params={"min_age_days": cfg.labeling.min_age_days,
                                                  "min_score": cfg.faces.min_score}).to_arrow_table()
    counts = empty_counts()
    tomb = load_tombstones(storage, salt_for(cfg))
    if tomb and joined.num_rows:
        gone = tomb.mask(joined)
        counts["forgotten"] = pc.sum(gone).as_py() or 0
        joined = joined.filter(pc.invert(gone))
    # Post ids are unique within an instance only; a label row needs a unique post_id.
    first = pc.equal(joined.column("nth"), 1)
    counts["duplicate_post_id"] = joined.num_rows - pc.sum(first).as_py() if joined.num_rows else 0
    joined = joined.filter(first).drop_columns(["nth", "instance"])
    return joined.cast(CANDIDATES), counts


def input_versions(storage: Storage) -> dict[str, int | None]:
    """The current version of each input table (None: no commit yet), to read exactly these."""
    from pipeline.core.tables import version

    return {name: version(storage, name) for name in INPUT_TABLES}


# --------------------------------------------------------------------------- bring your own

#: The columns of a bring-your-own file (docs/architecture.md, "The labeling rule"): name -> kind.
REQUIRED_COLUMNS = {"post_id": "string", "author_key": "string", "likes": "integer",
                    "followers": "integer", "n_tags": "integer", "age_days": "number"}
OPTIONAL_COLUMNS = {"views": "integer", "n_faces": "integer", "image_sha256": "string", "source": "string"}


def _kind_ok(kind: str, typ: pa.DataType) -> bool:
    if pa.types.is_null(typ):  # an all-empty CSV column
        return True
    if kind == "string":
        return pa.types.is_string(typ) or pa.types.is_large_string(typ)
    if kind == "integer":
        return pa.types.is_integer(typ)
    return pa.types.is_integer(typ) or pa.types.is_floating(typ)


def read_input_file(path: str | Path) -> tuple[pa.Table, list[str]]:
    """A bring-your-own Parquet or CSV file as candidates, and the columns it lacked (optional ones).

    Missing optional columns: ``views`` (exposure from followers), ``n_faces`` (no face filter),
    ``image_sha256`` (filled with "", so no image check and no duplicate-image collapse),
    ``source`` (filled with "": every row one source, so groups span the whole file).
    Raises :class:`InputError` naming the file and every missing column, wrong type, null or
    negative count, and duplicated post_id.
    """
    path = Path(path)
    table = _read_any(path)
    problems: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    for name, kind in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items():
        if name in table.column_names and not _kind_ok(kind, table.schema.field(name).type):
            problems.append(f"column {name}: expected {kind}, found {table.schema.field(name).type}")
    if not problems:
        for name in REQUIRED_COLUMNS:
            nulls = table.column(name).null_count
            if nulls:
                problems.append(f"column {name}: {nulls} empty value(s)")
        for name in ("likes", "followers", "n_tags", "age_days", "views", "n_faces"):
            if name in table.column_names and table.num_rows:
                low = pc.min(table.column(name)).as_py()
                if low is not None and low < 0:
                    problems.append(f"column {name}: negative value(s), e.g. {low}")
    if not problems and table.num_rows:
        counts = pc.value_counts(table.column("post_id"))
        repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
        if len(repeated):
            shown = ", ".join(repr(v) for v in repeated[:5].to_pylist())
            problems.append(f"column post_id: {len(repeated)} value(s) repeat, e.g. {shown}")
    if problems:
        raise InputError(f"input {path}: " + "; ".join(problems))

    absent = [c for c in OPTIONAL_COLUMNS if c not in table.column_names]
    n = table.num_rows
    fills = {"views": pa.nulls(n, pa.int64()), "n_faces": pa.nulls(n, pa.int32()),
             "image_sha256": pa.array([""] * n, pa.string()), "face_share": pa.nulls(n, pa.float64()),
             "source": pa.DictionaryArray.from_arrays(np.zeros(n, dtype=np.int32), pa.array([""]))}
    columns = [table.column(f.name) if f.name in table.column_names else fills[f.name] for f in CANDIDATES]
    try:
        return pa.Table.from_arrays(columns, names=CANDIDATES.names).cast(CANDIDATES), absent
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # e.g. an int too large for int32
        raise InputError(f"input {path}: {exc}") from None


def _read_any(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise InputError(f"input {path}: file not found")
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            # Ids stay strings even when they look like numbers ("00123" must not become 123).
            strings = {c: pa.string() for c, k in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items() if k == "string"}
            return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types=strings))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"input {path}: cannot be read: {exc}") from None
    raise InputError(f"input {path}: unknown format {suffix!r} (use .parquet or .csv)")

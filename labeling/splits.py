"""User-disjoint train/val/test splits from a salted hash of ``author_key``.

``bucket = author_hash(split_salt, author_key) mod 10000``; ``test`` if
``bucket < test_fraction * 10000``, else ``val`` if below ``(test_fraction + val_fraction) * 10000``,
else ``train``. An author's posts therefore share one split in every run with the same salt,
whatever else changes, and on any library version: the hash is ours, not a library's.

``author_hash``: start from the first 8 bytes of sha256(salt); for each 8-byte little-endian
word of the key's UTF-8 bytes (the last one zero-padded) ``h = mix(h ^ word)``; finally
``h = mix(h ^ byte_length)``. ``mix`` is the splitmix64 finalizer (Steele et al. 2014), a
bijection on 64-bit integers. Vectorized over rows (one numpy pass per 8 bytes of key, about
0.1 s per 10M 16-byte keys); :func:`split_of` is the same in plain Python.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from pipeline.core.config import LabelingConfig

SPLITS = ("train", "val", "test")
BUCKETS = 10_000
_M64 = (1 << 64) - 1
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _seed(salt: str) -> int:
    return int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little")


def _mix_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def _mix_inplace(z: np.ndarray, tmp: np.ndarray) -> None:
    """splitmix64's finalizer on every element of ``z``, in place; ``tmp`` is scratch of z's shape.

    In place because at 10M rows each temporary is 80 MB of freshly faulted memory.
    """
    for shift, mult in ((30, _C1), (27, _C2)):
        np.right_shift(z, np.uint64(shift), out=tmp)
        np.bitwise_xor(z, tmp, out=z)
        np.multiply(z, np.uint64(mult), out=z)  # uint64 arithmetic wraps mod 2**64
    np.right_shift(z, np.uint64(31), out=tmp)
    np.bitwise_xor(z, tmp, out=z)


def author_hash_one(salt: str, author_key: str) -> int:
    """The 64-bit split hash of one author (reference for :func:`author_hash`)."""
    data, h = author_key.encode(), _seed(salt)
    for j in range(0, len(data), 8):
        h = _mix_int(h ^ int.from_bytes(data[j:j + 8].ljust(8, b"\0"), "little"))
    return _mix_int(h ^ len(data))


def _byte_matrix(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Each string's UTF-8 bytes, zero-padded to a common multiple of 8, and the byte lengths.

    Strings of one length that is a multiple of 8 (hex pseudonyms) are a view of Arrow's buffer.
    """
    if not pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    n = len(arr)
    offset_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=offset_type)[arr.offset:arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None \
        else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    longest = int(lengths.max()) if n else 0
    width = max(8, -(-longest // 8) * 8)
    fixed = n > 0 and int(lengths.min()) == longest
    if fixed:  # one length: the strings are one reshape of the data buffer
        block = data[offsets[0]:offsets[0] + n * longest].reshape(n, longest)
        if longest == width:
            return block, lengths  # no padding needed: a view, no copy
    out = np.zeros((n, width), dtype=np.uint8)
    if fixed:
        out[:, :longest] = block
    else:
        starts = offsets[:-1]
        for j in range(longest):  # one vectorized gather per byte position
            rows = np.flatnonzero(lengths > j)
            out[rows, j] = data[starts[rows] + j]
    return out, lengths


def author_hash(salt: str, author_key: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The 64-bit split hash of every row (uint64), see the module docstring."""
    if isinstance(author_key, pa.ChunkedArray):  # chunk by chunk: each a view of its buffer, no copy
        if author_key.num_chunks == 0:
            return np.empty(0, dtype=np.uint64)
        return np.concatenate([author_hash(salt, chunk) for chunk in author_key.chunks])
    matrix, lengths = _byte_matrix(author_key)
    words = matrix.view("<u8")
    n_words = (lengths + 7) // 8
    h = np.full(len(lengths), _seed(salt), dtype=np.uint64)
    tmp = np.empty_like(h)
    for j in range(words.shape[1]):
        longer = n_words > j
        if longer.all():
            np.bitwise_xor(h, words[:, j], out=h)
            _mix_inplace(h, tmp)
        else:  # rows whose key has ended keep their hash
            mixed = h ^ words[:, j]
            _mix_inplace(mixed, tmp)
            np.copyto(h, mixed, where=longer)
    np.bitwise_xor(h, lengths.astype(np.uint64), out=h)
    _mix_inplace(h, tmp)
    return h


def _split_index(bucket: np.ndarray, lab: LabelingConfig) -> np.ndarray:
    """0 (train), 1 (val) or 2 (test) per bucket: one comparison per boundary, no branches."""
    test = round(lab.test_fraction * BUCKETS)
    val = test + round(lab.val_fraction * BUCKETS)
    index = (bucket < val).view(np.int8)
    index += (bucket < test).view(np.int8)
    return index


def split_of(author_key: str, lab: LabelingConfig) -> str:
    """The split of one author (reference implementation of :func:`assign_splits`)."""
    return SPLITS[int(_split_index(np.array([author_hash_one(lab.split_salt, author_key) % BUCKETS]), lab)[0])]


def split_index(author_key: pa.Array | pa.ChunkedArray, lab: LabelingConfig) -> np.ndarray:
    """The split of every row as an index into :data:`SPLITS` (int8), aligned with ``author_key``."""
    if isinstance(author_key, pa.ChunkedArray):  # chunk by chunk: only the int8 result is kept whole
        return np.concatenate([split_index(chunk, lab) for chunk in author_key.chunks] or [np.empty(0, np.int8)])
    return _split_index(author_hash(lab.split_salt, author_key) % np.uint64(BUCKETS), lab)


def assign_splits(author_key: pa.Array | pa.ChunkedArray, lab: LabelingConfig) -> pa.Array:
    """The split of every row, as a string array aligned with ``author_key``."""
    # take() from the three names: 6x faster than casting a dictionary array to strings (10M rows).
    return pa.array(SPLITS).take(pa.array(split_index(author_key, lab)))

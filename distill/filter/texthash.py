"""Stable, vectorised hashing of words and word windows (shared by dedup and decontam).

Python's ``hash()`` is salted per process, so it would make filter results differ from
run to run; every hash here is a fixed function of the text. Words are hashed once per
distinct word (blake2b), windows of words are combined in numpy with wrapping uint64
arithmetic, so the per-token cost is a few vector operations.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Odd multipliers that make a window hash depend on word order (fixed: results are stable).
_WINDOW_MULT = np.random.default_rng(0x5EED).integers(1, 2**63, size=64, dtype=np.uint64) * 2 + 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (SplitMix64 finaliser), elementwise, wrapping."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def word_hash(word: str) -> int:
    """Stable 64-bit hash of one word."""
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Lower-cased whitespace words of every text, as 64-bit word hashes.

    Returns ``(hashes, offsets)``: the words of text ``i`` are
    ``hashes[offsets[i]:offsets[i + 1]]``. Splitting and the distinct-word dictionary are
    computed by Arrow in C++; only distinct words are hashed in Python.
    """
    arr = pa.array(texts, type=pa.large_string()).fill_null("")
    words = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(pc.utf8_lower(arr)))
    # an empty (or all-space) text splits into one empty word: drop empty words
    flat = words.flatten()
    keep = np.asarray(pc.not_equal(flat, ""), dtype=bool)
    offsets = np.r_[0, np.cumsum(keep)][np.asarray(words.offsets, dtype=np.int64)]
    flat = pc.dictionary_encode(flat.filter(pa.array(keep)))
    vocab = np.fromiter(
        (word_hash(w) for w in flat.dictionary.to_pylist()),
        dtype=np.uint64,
        count=len(flat.dictionary),
    )
    codes = np.asarray(flat.indices, dtype=np.int64)
    return vocab[codes], offsets


def window_hashes(values: np.ndarray, offsets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every window of ``k`` consecutive values that lies inside one text.

    Returns ``(hashes, owner)``: one hash per window, in text order, and the index of the
    text each window belongs to. Texts with fewer than ``k`` values have no window.
    """
    n = len(values)
    if n < k or k < 1:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    with np.errstate(over="ignore"):
        acc = values[: n - k + 1] * _WINDOW_MULT[0]
        for j in range(1, k):
            acc = acc + values[j : n - k + 1 + j] * _WINDOW_MULT[j % len(_WINDOW_MULT)]
    lengths = np.diff(offsets)
    owner_of_pos = np.repeat(np.arange(len(lengths)), lengths)[: n - k + 1]
    end_of_pos = offsets[1:][owner_of_pos]
    valid = np.arange(n - k + 1) + k <= end_of_pos
    # word hashes are uniform and the multipliers odd, so the sum is uniform: no final mix
    return acc[valid], owner_of_pos[valid]

"""Exact and near-duplicate detection: normalised-text hashes and MinHash LSH in numpy.

Both detectors return, for every text, the index of the text it duplicates (itself when
it is kept). The earliest text of a group is kept, so results follow input order and are
the same on every run.

Near duplicates: word shingles -> MinHash signatures (``num_perm`` affine permutations
of 32-bit shingle hashes, vectorised over all shingles of a chunk of texts) -> LSH
banding with the ``(bands, rows)`` that minimise weighted false positives + false
negatives around ``threshold`` (``datasketch``'s rule, with misses weighted higher) ->
every bucket member is compared with the bucket's first text on the signatures, and
pairs whose estimated Jaccard similarity reaches ``threshold`` are merged (union-find).
Verifying candidates removes the bucket collisions of dissimilar texts that plain LSH
would report.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from distill.filter.texthash import splitmix64, tokenize, window_hashes

DEDUP_VERSION = "1"
_CHUNK_SHINGLES = 1 << 12  # shingles hashed at once: the buffer stays in cache (2 MiB)


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed: what counts as 'the same text'."""
    return " ".join(text.lower().split())


def exact_duplicates(texts: list[str]) -> np.ndarray:
    """For each text, the index of the first text with the same normalised form."""
    first: dict[bytes, int] = {}
    rep = np.empty(len(texts), np.int64)
    for i, t in enumerate(texts):
        key = hashlib.blake2b(normalize(t).encode(), digest_size=16).digest()
        rep[i] = first.setdefault(key, i)
    return rep


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``x -> a*x + b (mod 2^32)`` with odd ``a``: a random permutation of 32-bit values
    per MinHash function; uint32 arithmetic is twice as fast as uint64 in numpy."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)
    return a, b


def shingles(texts: list[str], shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of the word ``shingle_size``-grams of every text, and their owner.

    A text shorter than ``shingle_size`` words (but not empty) is one shingle of all its
    words, so short texts still have a signature.
    """
    words, offsets = tokenize(texts)
    hashes, owner = window_hashes(words, offsets, shingle_size)
    lengths = np.diff(offsets)
    short = np.nonzero((lengths > 0) & (lengths < shingle_size))[0]
    if len(short):
        extra_h, extra_o = [], []
        for i in short:
            h, _ = window_hashes(
                words[offsets[i] : offsets[i + 1]], np.array([0, lengths[i]]), lengths[i]
            )
            extra_h.append(h)
            extra_o.append(np.full(len(h), i))
        hashes = np.concatenate([hashes, *extra_h])
        owner = np.concatenate([owner, *extra_o])
        order = np.argsort(owner, kind="stable")
        hashes, owner = hashes[order], owner[order]
    return (hashes >> np.uint64(32)).astype(np.uint32), owner


def minhash(
    texts: list[str], num_perm: int = 128, shingle_size: int = 5, seed: int = 1
) -> np.ndarray:
    """MinHash signatures, shape ``(len(texts), num_perm)`` uint32; an empty text's row is
    all ``0xFFFFFFFF`` (it matches nothing but other empty texts)."""
    x, owner = shingles(texts, shingle_size)
    a, b = _permutations(num_perm, seed)
    sig = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, np.uint32)
    if not len(x):
        return sig
    # chunk boundaries fall between texts so each text is reduced within one chunk
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    bounds = [0]
    for s in starts:
        if s - bounds[-1] >= _CHUNK_SHINGLES:
            bounds.append(int(s))
    bounds.append(len(x))
    buf = np.empty((num_perm, min(len(x), 2 * _CHUNK_SHINGLES)), np.uint32)
    with np.errstate(over="ignore"):
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if hi - lo > buf.shape[1]:  # one very long text
                buf = np.empty((num_perm, hi - lo), np.uint32)
            hv = buf[:, : hi - lo]
            np.multiply(a[:, None], x[None, lo:hi], out=hv)
            hv += b[:, None]
            o = owner[lo:hi]
            first = np.flatnonzero(np.r_[True, o[1:] != o[:-1]])
            sig[o[first]] = np.minimum.reduceat(hv, first, axis=1).T
    return sig


# Candidates are verified on their signatures, so a false positive of the banding costs
# one comparison while a false negative is a missed duplicate: weigh misses 19:1.
FP_WEIGHT, FN_WEIGHT = 0.05, 0.95

# numpy 2 renamed trapz (deprecated there); 1.26, pyproject's floor, has only the old name
_trapezoid = getattr(np, "trapezoid", None) or np.trapz


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` minimising the weighted false-positive + false-negative
    probability mass around ``threshold`` (for 0.9 and 128 permutations: 9 bands of 14
    rows, which makes a pair of similarity 0.93 a candidate with probability 0.98)."""
    grid = np.linspace(0.0, 1.0, 501)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1.0 - (1.0 - grid**rows) ** bands
            fp = _trapezoid(np.where(grid < threshold, p, 0.0), grid)
            fn = _trapezoid(np.where(grid >= threshold, 1.0 - p, 0.0), grid)
            err = FP_WEIGHT * fp + FN_WEIGHT * fn
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def near_duplicates_from_signatures(sig: np.ndarray, threshold: float) -> np.ndarray:
    """For each row of ``sig``, the index of the earliest row of its near-duplicate group."""
    n, num_perm = sig.shape
    bands, rows = lsh_params(threshold, num_perm)
    parent = np.arange(n)
    nonempty = np.flatnonzero(sig[:, 0] != np.iinfo(np.uint32).max)
    if len(nonempty) < 2:
        return parent
    s = sig[nonempty].astype(np.uint64)
    for band in range(bands):
        block = s[:, band * rows : (band + 1) * rows]
        with np.errstate(over="ignore"):
            key = splitmix64(
                (block * (np.arange(rows, dtype=np.uint64) * 2 + 1)[None, :]).sum(axis=1)
            )
            key = splitmix64(key + np.uint64(band))
        order = np.argsort(key, kind="stable")  # stable: the group's first is its earliest
        k = key[order]
        group_start = np.r_[True, k[1:] != k[:-1]]
        head = order[np.maximum.accumulate(np.where(group_start, np.arange(len(k)), 0))]
        member = order
        cand = ~group_start
        h, m = nonempty[head[cand]], nonempty[member[cand]]
        if not len(h):
            continue
        sim = (sig[h] == sig[m]).mean(axis=1)
        for x, y in zip(h[sim >= threshold].tolist(), m[sim >= threshold].tolist(), strict=True):
            rx, ry = _find(parent, x), _find(parent, y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)  # the root is always the earliest text
    return np.array([_find(parent, i) for i in range(n)])


def near_duplicates(
    texts: list[str],
    threshold: float = 0.9,
    num_perm: int = 128,
    shingle_size: int = 5,
    seed: int = 1,
) -> np.ndarray:
    """For each text, the index of the earliest text it near-duplicates (itself if none)."""
    return near_duplicates_from_signatures(minhash(texts, num_perm, shingle_size, seed), threshold)

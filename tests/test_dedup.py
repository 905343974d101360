"""Exact and MinHash-LSH near-duplicate detection (distill.filter.dedup)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from distill.filter.dedup import exact_duplicates, lsh_params, minhash, near_duplicates, normalize


def _doc(rng: random.Random, n: int = 150) -> list[str]:
    return [f"w{rng.randrange(5000)}" for _ in range(n)]


def test_exact_duplicates_normalise_case_and_spacing_keep_first():
    texts = ["A  b\nc", "x", "a b c", "3+4", "3-4", " X "]
    assert exact_duplicates(texts).tolist() == [0, 1, 0, 3, 4, 1]
    assert normalize("  Hello\t World ") == "hello world"


def test_near_duplicates_found_and_distinct_texts_kept():
    rng = random.Random(0)
    base = [_doc(rng, 250) for _ in range(300)]
    texts = [" ".join(d) for d in base]
    for i in range(0, 60, 3):  # one word changed in 250: Jaccard about 0.96
        d = list(base[i])
        d[120] = "edited"
        texts.append(" ".join(d))
    rep = near_duplicates(texts, threshold=0.9)
    assert rep[:300].tolist() == list(range(300))  # random documents are all kept
    assert rep[300:].tolist() == list(range(0, 60, 3))  # each copy points at its original


def test_threshold_separates_similarity_levels():
    rng = random.Random(1)
    d = _doc(rng, 200)
    far = list(d)
    for j in range(0, 200, 10):  # 20 edits: Jaccard well under 0.7
        far[j] = f"x{j}"
    assert near_duplicates([" ".join(d), " ".join(far)], threshold=0.9).tolist() == [0, 1]
    assert near_duplicates([" ".join(d), " ".join(far)], threshold=0.3).tolist() == [0, 0]


def test_short_and_empty_texts():
    sig = minhash(["short", "", "SHORT ", "a b"], num_perm=32)
    assert (sig[0] == sig[2]).all() and not (sig[0] == sig[3]).all()
    assert (sig[1] == np.iinfo(np.uint32).max).all()
    assert near_duplicates(["short", "", "SHORT ", "", "a b"]).tolist() == [0, 1, 0, 3, 4]


def test_signatures_are_stable_and_estimate_jaccard():
    rng = random.Random(2)
    a = _doc(rng, 400)
    b = a[:300] + _doc(rng, 100)  # shared shingles / all shingles about 0.6
    sa = set(zip(*[a[i:] for i in range(5)], strict=False))
    sb = set(zip(*[b[i:] for i in range(5)], strict=False))
    true = len(sa & sb) / len(sa | sb)
    sig = minhash([" ".join(a), " ".join(b)], num_perm=256)
    assert (sig[0] == sig[1]).mean() == pytest.approx(true, abs=0.08)
    assert (minhash([" ".join(a)], num_perm=256) == sig[:1]).all()  # same text, same signature


def test_lsh_params_fill_the_permutations():
    bands, rows = lsh_params(0.9, 128)
    assert bands * rows <= 128 and rows > 1
    b_lo, r_lo = lsh_params(0.5, 128)
    assert r_lo < rows  # a lower threshold needs fewer rows per band

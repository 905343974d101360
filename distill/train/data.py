"""Training data: tokenize once, mix domains, pack rows, resume at a position.

1. :func:`tokenize_domain` renders every trace of a clean shard directory (read
   memory-mapped) into examples and caches flat numpy arrays under the output dir, keyed
   by the shards' sha256s, the tokenizer, ``max_length`` and the render version.
2. :func:`mixture_order` draws each epoch's examples by domain sampling weights, by rows
   or by token budget, upsampling a domain whose weight asks for more than it has.
3. :func:`pack_rows` places several examples per row up to ``max_length``.
4. :class:`RowStream` yields the rows of one optimizer step; its position (epoch, row) is
   saved in checkpoints, and the order is a pure function of the seed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.chat.render import RENDER_VERSION
from distill.errors import UserError
from distill.files import short_hash
from distill.models import tokenizer_fingerprint
from distill.shards import read_manifest
from distill.tokenize import tokenize_table


@dataclass
class DomainData:
    """Every example of one domain as flat arrays (memory-mapped from the cache)."""

    name: str
    ids: np.ndarray  # int32, all examples concatenated
    mask: np.ndarray  # uint8, 1 = loss token
    offsets: np.ndarray  # int64, n + 1
    kd_ids: np.ndarray | None = None  # int32 [loss tokens, K], -1 = no entry
    kd_lp: np.ndarray | None = None  # float32 [loss tokens, K]
    kd_offsets: np.ndarray | None = None  # int64, n + 1: first loss token of each example
    dropped: int = 0  # examples longer than max_seq_len
    kd_realigned: int = 0  # traces whose teacher tokens were aligned to the student's
    kd_unaligned: int = 0  # traces that could not be: trained without the KL term

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def cache_key(
    shard_dir: Path, tokenizer, max_seq_len: int, kd: bool, short_share: float = 0.0
) -> str:
    manifest = read_manifest(shard_dir)
    data = {
        "shards": [s["sha256"] for s in manifest["shards"]],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": max_seq_len,
        "render": RENDER_VERSION,
        "kd": kd,
    }
    if short_share:  # absent when off: caches of earlier runs keep their keys
        data["short_share"] = short_share
    return short_hash(json.dumps(data, sort_keys=True))


def tokenize_domain(
    domain: str,
    shard_dir: str | Path,
    tokenizer,
    max_seq_len: int,
    cache_root: str | Path,
    kd: bool = False,
    short_share: float = 0.0,
) -> DomainData:
    """The domain's examples, from the cache when the shards and tokenizer are unchanged;
    ``short_share`` of its traces without system prompt and tool list
    (:func:`teachers.base.shorten_prompt`)."""
    shard_dir = Path(shard_dir)
    key = cache_key(shard_dir, tokenizer, max_seq_len, kd, short_share)
    path = Path(cache_root) / f"{domain}-{key}"
    if not (path / "meta.json").exists():
        arrays, meta = tokenize_table(domain, shard_dir, tokenizer, max_seq_len, kd, short_share)
        _save_cache(path, arrays, meta)
    return _load_cache(domain, path)


def _save_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    # write beside, rename when complete: a killed run never leaves a half cache
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
    (tmp / "meta.json").write_text(json.dumps(meta))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _load_cache(domain: str, path: Path) -> DomainData:
    meta = json.loads((path / "meta.json").read_text())

    def load(name):
        f = path / f"{name}.npy"
        return np.load(f, mmap_mode="r") if f.exists() else None

    return DomainData(
        domain,
        load("ids"),
        load("mask"),
        load("offsets"),
        load("kd_ids"),
        load("kd_lp"),
        load("kd_offsets"),
        meta["dropped"],
        meta.get("kd_realigned", 0),
        meta.get("kd_unaligned", 0),
    )


def mixture_order(
    lengths: dict[str, np.ndarray], weights: dict[str, float], mode: str, seed: int, epoch: int
) -> list[tuple[str, int]]:
    """One epoch's examples as (domain, index), shuffled.

    The epoch holds as many rows (mode "rows") or tokens (mode "tokens") as all domains
    together; each domain gets its weight's share, cycling through fresh permutations of
    its examples when the share exceeds what it has (upsampling).
    """
    rng = np.random.default_rng([seed, epoch])
    live = {d: w for d, w in weights.items() if w > 0 and d in lengths}
    if not live:
        raise UserError("train: every domain has sampling weight 0")
    total_w = sum(live.values())
    size = {d: (len(lengths[d]) if mode == "rows" else int(lengths[d].sum())) for d in live}
    budget_all = sum(size.values())
    order: list[tuple[str, int]] = []
    for d in sorted(live):
        budget = budget_all * live[d] / total_w
        order += [(d, i) for i in _take(lengths[d], budget, mode, rng)]
    perm = rng.permutation(len(order))
    return [order[i] for i in perm]


def _take(lengths: np.ndarray, budget: float, mode: str, rng: np.random.Generator) -> list[int]:
    out: list[int] = []
    used = 0.0
    while used < budget:
        for i in rng.permutation(len(lengths)):
            if used >= budget:
                break
            out.append(int(i))
            used += 1 if mode == "rows" else int(lengths[i])
    return out


def pack_rows(
    lengths: list[int], max_len: int, pack: bool = True, window: int = 64
) -> list[list[int]]:
    """Rows of example positions. First fit over the ``window`` most recent open rows:
    dense packing while staying close to the shuffled order."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    room: list[int] = []
    first_open = 0
    for i, n in enumerate(lengths):
        for r in range(first_open, len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
            first_open = max(first_open, len(rows) - window)
    return rows


class RowStream:
    """Packed rows across epochs in a seed-determined order; resumable at (epoch, row)."""

    def __init__(
        self,
        domains: dict[str, DomainData],
        weights: dict[str, float],
        mode: str,
        max_len: int,
        pack: bool,
        seed: int,
    ):
        self.domains, self.weights, self.mode = domains, weights, mode
        self.max_len, self.pack, self.seed = max_len, pack, seed
        self.lengths = {d: np.asarray(dd.lengths) for d, dd in domains.items()}
        self.epoch, self.row = 0, 0
        self._cache: tuple[int, list[list[tuple[str, int]]]] | None = None

    def epoch_rows(self, epoch: int) -> list[list[tuple[str, int]]]:
        if self._cache is None or self._cache[0] != epoch:
            order = mixture_order(self.lengths, self.weights, self.mode, self.seed, epoch)
            lens = [int(self.lengths[d][i]) for d, i in order]
            rows = [[order[i] for i in r] for r in pack_rows(lens, self.max_len, self.pack)]
            self._cache = (epoch, rows)
        return self._cache[1]

    def take(self, n: int) -> list[list[tuple[str, int]]]:
        out: list[list[tuple[str, int]]] = []
        while len(out) < n:
            rows = self.epoch_rows(self.epoch)
            got = rows[self.row : self.row + n - len(out)]
            out += got
            self.row += len(got)
            if self.row >= len(rows):
                self.epoch, self.row = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


def collate(
    rows: list[list[tuple[str, int]]],
    domains: dict[str, DomainData],
    domain_index: dict[str, int],
    loss_weights: dict[str, float],
    pad_id: int,
    kd: bool = False,
    width: int | None = None,
    flat: bool = False,
    max_segment: int | None = None,
) -> dict[str, np.ndarray]:
    """A micro-batch: ids and restarting positions per row (padding is its own segment,
    so no real token attends to it), plus flat loss positions, targets, weights, domains.

    ``flat`` puts every row's traces in one ``[1, width]`` sequence and adds
    ``cu_seqlens`` (int32 segment boundaries, for varlen attention): no padding between
    rows, and at the end only what ``width`` asks for, cut in segments of at most
    ``max_segment`` tokens so no segment is longer than the attention kernel is told."""
    if flat:
        rows = [[x for r in rows for x in r]]
    longest = max(
        sum(int(domains[d].offsets[i + 1] - domains[d].offsets[i]) for d, i in r) for r in rows
    )
    width = max(width or 0, longest)
    ids = np.full((len(rows), width), pad_id, np.int64)
    pos = np.zeros((len(rows), width), np.int64)
    loss_pos, targets, weights, dom, kd_ids, kd_lp = [], [], [], [], [], []
    segments: list[int] = []
    for b, row in enumerate(rows):
        at = 0
        for d, i in row:
            dd = domains[d]
            s, e = int(dd.offsets[i]), int(dd.offsets[i + 1])
            n = e - s
            ids[b, at : at + n] = dd.ids[s:e]
            pos[b, at : at + n] = np.arange(n)
            js = np.flatnonzero(dd.mask[s:e])
            # token j is predicted by the logits at j - 1 of the same example
            loss_pos.append(b * width + at + js - 1)
            targets.append(dd.ids[s:e][js])
            weights.append(np.full(len(js), loss_weights.get(d, 1.0), np.float32))
            dom.append(np.full(len(js), domain_index[d], np.int64))
            if kd:
                ks, ke = int(dd.kd_offsets[i]), int(dd.kd_offsets[i + 1])
                kd_ids.append(dd.kd_ids[ks:ke])
                kd_lp.append(dd.kd_lp[ks:ke])
            segments.append(n)
            at += n
        step = (max_segment or width) if flat else width
        for p in range(at, width, step):  # padding: segments of its own
            pos[b, p : p + step] = np.arange(min(step, width - p))
            segments.append(min(step, width - p))
    out = {
        "input_ids": ids,
        "position_ids": pos,
        "loss_pos": np.concatenate(loss_pos).astype(np.int64),
        "targets": np.concatenate(targets).astype(np.int64),
        "weights": np.concatenate(weights),
        "domain": np.concatenate(dom),
    }
    if flat:
        out["cu_seqlens"] = np.concatenate([[0], np.cumsum(segments)]).astype(np.int32)
    if kd:
        out["kd_ids"] = np.concatenate(kd_ids)
        out["kd_lp"] = np.concatenate(kd_lp)
    return out

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

from distill.chat.render import RENDER_VERSION, encode_texts, trace_texts
from distill.errors import UserError
from distill.files import short_hash
from distill.messages import decode_tools
from distill.models import tokenizer_fingerprint
from distill.shards import read_manifest, read_table
from teachers.base import short_prompt_at, shorten_prompt


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
        arrays, meta = _tokenize(domain, shard_dir, tokenizer, max_seq_len, kd, short_share)
        _save_cache(path, arrays, meta)
    return _load_cache(domain, path)


def _tokenize(domain, shard_dir, tokenizer, max_seq_len, kd, short_share=0.0):
    from distill.progress import progress

    table = read_table(shard_dir, verify=True)  # a shard changed in place fails here
    if table.num_rows == 0:
        raise UserError(f"{shard_dir}: no traces of domain {domain} to train on (empty shards)")
    ids, masks, lens, kd_rows, kd_counts = [], [], [], [], []
    dropped = 0
    kd_counts_by = {"realigned": 0, "unaligned": 0}
    cols = ["id", "messages", "tools"] + (["topk"] if kd else [])
    with progress(transient=True) as bar:
        task = bar.add_task(f"tokenize {domain}", total=table.num_rows, unit="traces")
        seen = 0
        for batch in table.select(cols).to_batches(max_chunksize=256):
            rows = batch.to_pylist()
            if short_share:
                rows = [
                    shorten_prompt(row) if short_prompt_at(i, short_share) else row
                    for i, row in enumerate(rows, start=seen)
                ]
            seen += len(rows)
            texts = [_render_row(tokenizer, row, shard_dir) for row in rows]
            for row, exs in zip(rows, _encode_rows(tokenizer, rows, texts, shard_dir), strict=True):
                topk = _topk_for(row, exs, tokenizer, kd_counts_by) if kd else None
                start = 0
                for ex in exs:
                    n_loss = sum(ex.loss_mask)
                    if len(ex.input_ids) > max_seq_len:
                        dropped += 1
                    else:
                        ids.append(ex.input_ids)
                        masks.append(ex.loss_mask)
                        lens.append(len(ex.input_ids))
                        if kd:
                            kd_rows.extend(topk[start : start + n_loss])
                            kd_counts.append(n_loss)
                    start += n_loss
            bar.advance(task, batch.num_rows)
    if not lens:
        raise UserError(
            f"{shard_dir}: no trace of domain {domain} renders to at most max_length={max_seq_len} tokens"
        )
    arrays = {
        "ids": np.fromiter((t for x in ids for t in x), np.int32),
        "mask": np.fromiter((t for x in masks for t in x), np.uint8),
        "offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
    }
    if kd:
        arrays.update(_kd_arrays(kd_rows, kd_counts))
    if kd_counts_by["unaligned"]:
        from distill.progress import console

        console.print(
            f"warning: {kd_counts_by['unaligned']} {domain} traces train without logit KD: "
            "their teacher tokens could not be aligned with the student's rendering"
        )
    meta = {"dropped": dropped, "examples": len(lens)}
    meta.update({f"kd_{k}": v for k, v in kd_counts_by.items()})
    return arrays, meta


def _render_row(tokenizer, row: dict, shard_dir: Path) -> list:
    """A row's rendered examples (text, spans); a bad row is an error naming the trace
    and its shards."""
    try:
        tools = decode_tools(row["tools"]) or None
        return trace_texts(tokenizer, row["messages"], tools)
    except (UserError, ValueError, TypeError) as e:
        raise UserError(f"{shard_dir}: trace {row['id']}: {e}") from None


def _encode_rows(tokenizer, rows: list[dict], texts: list, shard_dir: Path) -> list:
    """The batch tokenized at once; on a bad row, the error names it."""
    try:
        return encode_texts(tokenizer, texts)
    except UserError:
        for row, t in zip(rows, texts, strict=True):
            try:
                encode_texts(tokenizer, [t])
            except UserError as e:
                raise UserError(f"{shard_dir}: trace {row['id']}: {e}") from None
        raise


def _topk_for(row, examples, tokenizer, counts: dict[str, int]) -> list[dict]:
    """The trace's top-k entries, one per assistant loss token. A teacher that sampled a
    token sequence the tokenizer would merge differently (``}`` ``}`` where the render
    has ``}}``) gave entries that do not match the loss tokens one to one: they are
    aligned by their text (:func:`align_topk`), and a trace that cannot be aligned trains
    without the KL term (never stopping the run); ``counts`` counts both."""
    topk = row.get("topk")
    loss_ids = [t for ex in examples for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m]
    if topk is None:
        raise UserError(
            f"trace {row['id']}: train.kd is on but the trace has no teacher top-k logprobs"
        )
    if len(topk) != len(loss_ids):
        aligned = align_topk(tokenizer, loss_ids, topk)
        counts["realigned" if aligned is not None else "unaligned"] += 1
        topk = aligned if aligned is not None else [_NO_ENTRY] * len(loss_ids)
    vocab = len(tokenizer)
    for e in topk:
        if e["ids"] and max(e["ids"]) >= vocab:
            raise UserError(
                f"trace {row['id']}: teacher top-k id {max(e['ids'])} is outside the student vocabulary ({vocab})"
            )
    return topk


_NO_ENTRY = {"ids": [], "logprobs": []}  # a loss token without a KD target (KL term 0)
ALIGN_WORK = 200_000  # text positions an alignment may visit (repetitive text): then none


def align_topk(tokenizer, student_ids: list[int], topk: list[dict]) -> list[dict] | None:
    """Teacher entries re-indexed to the student's loss tokens, or None.

    The teacher's own tokens are recovered from its entries: a sequence, one token of
    each entry's top-k ids, whose text is the student's loss text (a search over text
    positions). A student token whose text span is exactly one teacher token's gets that
    entry (same text before it, same token boundary after it); the others (the merged
    ``}}``) get none."""
    pieces = tokenizer.convert_ids_to_tokens(list(student_ids))
    text = "".join(pieces)
    reach: list[dict[int, tuple[int, int]]] = [{0: (-1, -1)}]  # position -> (previous, id)
    work = 0
    for entry in topk:
        nxt: dict[int, tuple[int, int]] = {}
        cands = entry["ids"]
        strs = tokenizer.convert_ids_to_tokens(list(cands))
        for p in reach[-1]:
            for tid, piece in zip(cands, strs, strict=True):
                if piece and text.startswith(piece, p):
                    nxt.setdefault(p + len(piece), (p, tid))
        work += len(nxt)
        if not nxt or work > ALIGN_WORK:
            return None
        reach.append(nxt)
    if len(text) not in reach[-1]:
        return None
    starts, p = [], len(text)  # each teacher token's text span, walked back from the end
    for j in range(len(topk), 0, -1):
        prev = reach[j][p][0]
        starts.append((prev, p))
        p = prev
    span_of = {span: j for j, span in enumerate(reversed(starts))}
    out, at = [], 0
    for piece in pieces:
        j = span_of.get((at, at + len(piece)))
        out.append(topk[j] if j is not None else _NO_ENTRY)
        at += len(piece)
    return out


def _kd_arrays(rows: list[dict], counts: list[int]) -> dict[str, np.ndarray]:
    k = max((len(r["ids"]) for r in rows), default=1) or 1
    kd_ids = np.full((len(rows), k), -1, np.int32)
    kd_lp = np.full((len(rows), k), -np.inf, np.float32)
    for i, r in enumerate(rows):
        kd_ids[i, : len(r["ids"])] = r["ids"]
        kd_lp[i, : len(r["logprobs"])] = r["logprobs"]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return {"kd_ids": kd_ids, "kd_lp": kd_lp, "kd_offsets": offsets}


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

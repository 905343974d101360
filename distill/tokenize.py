"""Traces to training examples: render each clean trace with the chat template, encode
it, keep the loss mask (and, with KD, the teacher's top-k entries aligned to the student's
tokens), as flat arrays for the cache of :mod:`distill.train.data`.

Tokenizing is one thread of Python (rendering) and Rust (encoding): 12,000 of the agents
teacher's multi-turn traces took 8.4 s in one process on a 2-core CPU, and its 30,000 are
on the critical path of the GPU recipe's teachers stage (whose train call spent 33 s
outside its 150 s of steps on one H100 host, tokenizing among it). Large tables on many-core hosts go to spawned processes by contiguous chunks
(the parts are joined in row order, so the arrays are the ones a single process makes).
This module imports no torch: a worker starts in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.chat.render import encode_texts, trace_texts
from distill.errors import UserError
from distill.messages import decode_tools
from distill.shards import read_table
from teachers.base import short_prompt_at, shorten_prompt

PARALLEL_MIN_ROWS = 4096  # below this, starting workers costs more than they save


def tokenize_workers(rows: int) -> int:
    """Processes to tokenize ``rows`` traces with: ``DISTILL_TOKENIZE_WORKERS`` when set
    (``distill teachers`` sets it per teacher, so teachers training at once share the
    cores), else one per two cores on hosts of 8 or more (at most 8), else 1. Small
    domains and small machines (the 2-core demo) keep the single process."""
    from distill.launch import MANY_CORES, env_count, usable_cores

    n = env_count("DISTILL_TOKENIZE_WORKERS")
    if n is None:
        cores = usable_cores()
        n = min(8, cores // 2) if cores >= MANY_CORES else 1
    return max(1, n) if rows >= PARALLEL_MIN_ROWS else 1


def tokenize_table(domain, shard_dir, tokenizer, max_seq_len, kd, short_share=0.0):
    """Every trace of ``shard_dir`` rendered and encoded: flat arrays (ids, mask, offsets;
    KD entries with ``kd``) and the counts the cache's meta.json keeps."""
    from distill.progress import progress

    table = read_table(shard_dir, verify=True)  # a shard changed in place fails here
    if table.num_rows == 0:
        raise UserError(f"{shard_dir}: no traces of domain {domain} to train on (empty shards)")
    args = (domain, str(shard_dir), max_seq_len, kd, short_share)
    workers = tokenize_workers(table.num_rows)
    with progress(transient=True) as bar:
        task = bar.add_task(f"tokenize {domain}", total=table.num_rows, unit="traces")
        if workers == 1:
            parts = [_tokenize_rows(table, tokenizer, *args, 0, table.num_rows,
                                    lambda n: bar.advance(task, n))]  # fmt: skip
        else:
            parts = _tokenize_parallel(table.num_rows, tokenizer, args, workers,
                                       lambda n: bar.advance(task, n))  # fmt: skip
    lens = np.concatenate([p["lens"] for p in parts])
    if not len(lens):
        raise UserError(
            f"{shard_dir}: no trace of domain {domain} renders to at most max_length={max_seq_len} tokens"
        )
    arrays = {
        "ids": np.concatenate([p["ids"] for p in parts]),
        "mask": np.concatenate([p["mask"] for p in parts]),
        "offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
    }
    kd_counts_by = {k: sum(p["kd_by"][k] for p in parts) for k in ("realigned", "unaligned")}
    if kd:
        arrays.update(_kd_arrays([r for p in parts for r in p["kd_rows"]],
                                 [c for p in parts for c in p["kd_counts"]]))  # fmt: skip
    if kd_counts_by["unaligned"]:
        from distill.progress import console

        console.print(
            f"warning: {kd_counts_by['unaligned']} {domain} traces train without logit KD: "
            "their teacher tokens could not be aligned with the student's rendering"
        )
    meta = {"dropped": sum(p["dropped"] for p in parts), "examples": len(lens)}
    meta.update({f"kd_{k}": v for k, v in kd_counts_by.items()})
    return arrays, meta


def _tokenize_parallel(n_rows, tokenizer, args, workers, advance) -> list[dict]:
    """Rows ``[0, n_rows)`` in contiguous chunks over ``workers`` spawned processes; the
    parts come back in row order, so the cache is the one a single process writes. The
    tokenizer goes to each worker once, with its start, not with every chunk."""
    from distill.launch import spawn_pool

    chunk = -(-n_rows // (workers * 4))  # 4 chunks a worker: the bar moves, the load evens
    bounds = [(lo, min(lo + chunk, n_rows)) for lo in range(0, n_rows, chunk)]
    with spawn_pool(workers, _worker_init, (tokenizer,)) as pool:
        jobs = [pool.submit(_tokenize_chunk, args, lo, hi) for lo, hi in bounds]
        parts = []
        for job, (lo, hi) in zip(jobs, bounds, strict=True):
            try:
                parts.append(job.result())
            except UserError:  # names its trace, as in one process
                raise
            except Exception as e:  # a worker that died (memory, a signal) says so
                raise UserError(
                    f"{args[1]}: tokenizing domain {args[0]} failed in a worker process ({e!r}); "
                    "DISTILL_TOKENIZE_WORKERS=1 tokenizes in this one"
                ) from None
            advance(hi - lo)
    return parts


_WORKER: dict[str, object] = {}  # a worker's tokenizer and memory-mapped tables


def _worker_init(tokenizer) -> None:
    _WORKER["tokenizer"] = tokenizer


def _tokenize_chunk(args, lo: int, hi: int) -> dict:
    shard_dir = args[1]
    if shard_dir not in _WORKER:
        _WORKER[shard_dir] = read_table(shard_dir)  # verified by the parent; read once
    tok = _WORKER["tokenizer"]
    return _tokenize_rows(_WORKER[shard_dir], tok, *args, lo, hi, lambda n: None)


def _tokenize_rows(
    table, tokenizer, domain, shard_dir, max_seq_len, kd, short_share, lo, hi, advance
) -> dict:
    """Rows ``[lo, hi)`` of ``table`` as flat arrays (ids, mask, lens) and KD rows."""
    shard_dir = Path(shard_dir)
    ids, masks, lens, kd_rows, kd_counts = [], [], [], [], []
    dropped = 0
    kd_counts_by = {"realigned": 0, "unaligned": 0}
    cols = ["id", "messages", "tools"] + (["topk"] if kd else [])
    seen = lo
    for batch in table.slice(lo, hi - lo).select(cols).to_batches(max_chunksize=256):
        rows = batch.to_pylist()
        if short_share:  # by the row's place in the whole table: the same in any chunking
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
        advance(batch.num_rows)
    return {
        "ids": np.fromiter((t for x in ids for t in x), np.int32),
        "mask": np.fromiter((t for x in masks for t in x), np.uint8),
        "lens": np.asarray(lens, np.int64),
        "kd_rows": kd_rows,
        "kd_counts": kd_counts,
        "dropped": dropped,
        "kd_by": kd_counts_by,
    }


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

"""Benchmark of the filter stage's steps (the stage's own ``filter_traces``), and of
near-duplicate detection against datasketch's MinHash LSH on the same texts.

    .venv/bin/python bench/filter.py [--rows 100000]

Synthetic traces: math tasks (the real generator and verifier), 4 samples per task, each
an oracle trace whose reasoning is padded with 250 random words; planted 2% exact
duplicates, 2% near duplicates (one word of ~280 changed: Jaccard about 0.96 on word
5-shingles), 1% truncated, 5% wrong answers, and 200 eval tasks copied into the training
rows. Prints rows/s per step (verify uses every core) and, for near-duplicate detection,
docs/s and recall on the planted near duplicates for ours and for datasketch
(MinHash.bulk + MinHashLSH, with its default weights and with ours).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from itertools import pairwise

import numpy as np

from distill.filter.decontam import NgramIndex, eval_texts
from distill.filter.dedup import minhash, near_duplicates_from_signatures
from distill.filter.stage import filter_traces
from distill.filter.steps import assistant_text
from distill.messages import Trace
from distill.recipe.schema import FilterConfig
from teachers.base import get_domain, task_from_trace, trace_from_task

THRESHOLD, NUM_PERM, SHINGLE = 0.9, 128, 5


def make_traces(rows: int, seed: int = 0) -> tuple[list[Trace], list, list[tuple[int, int]]]:
    """Traces with planted cases; eval tasks; (original, near copy) index pairs."""
    rng = random.Random(seed)
    math = get_domain("math")
    vocab = [f"t{i}" for i in range(20000)]
    evals = list(math.tasks("eval", 200, seed, 2))
    rows -= len(evals)
    tasks = list(math.tasks("train", rows // 4 + 1, seed, 2))
    traces: list[Trace] = []
    near: list[tuple[int, int]] = []
    for i in range(rows):
        task = tasks[i // 4]
        msgs = math.oracle(task)
        ans = dict(msgs[-1])
        ans["reasoning_content"] += "\n" + " ".join(rng.choices(vocab, k=250))
        finish = "stop"
        roll = rng.random()
        if roll < 0.05:
            ans["content"] = "\\boxed{-1}"
        elif roll < 0.06:
            finish = "length"
        elif roll < 0.08 and traces:
            ans = dict(traces[-1].messages[-1])  # exact copy of the previous sample
        elif roll < 0.10 and traces:
            words = (traces[-1].messages[-1]["reasoning_content"] or "").split(" ")
            words[len(words) // 2] = "changed"
            ans = {**traces[-1].messages[-1], "reasoning_content": " ".join(words)}
            near.append((len(traces) - 1, len(traces)))
        toks = len(ans["reasoning_content"].split()) + 5
        row = trace_from_task(
            task, f"r{i}", [*msgs[:-1], ans], finish_reason=finish, completion_tokens=toks
        )
        traces.append(row)
    for j, task in enumerate(evals):  # contaminated rows: eval tasks in the training data
        leak = trace_from_task(
            task, f"leak{j}", math.oracle(task), finish_reason="stop", completion_tokens=20
        )
        traces.append(leak)
    return traces, evals, near


def rate(label: str, n: int, dt: float) -> None:
    print(f"{label:<28} {n:>8} rows {dt:8.2f} s {n / dt:>12,.0f} rows/s", flush=True)


def timed(label: str, n: int, fn):
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    rate(label, n, dt)
    return out, dt


def bench_steps(traces: list[Trace], evals: list) -> None:
    from distill.verify import verify_many

    items = [(task_from_trace(t), t.messages) for t in traces]
    verdicts, _ = timed(
        f"verify ({os.cpu_count()} workers)", len(traces), lambda: verify_many("math", items)
    )
    for t, v in zip(traces, verdicts, strict=True):
        t.verdict = v
    index, _ = timed(
        "decontam index (eval)", len(evals), lambda: NgramIndex(eval_texts(evals, "math"))
    )
    cfg = FilterConfig(
        near_threshold=THRESHOLD, num_perm=NUM_PERM, shingle_size=SHINGLE, max_per_task=2
    )
    starts: list[float] = []  # the stage calls on_step as each step starts
    _, funnel, _ = filter_traces(
        "math", traces, cfg, index, on_step=lambda name: starts.append(time.perf_counter())
    )
    starts.append(time.perf_counter())
    for step, (t0, t1) in zip(funnel.steps[1:], pairwise(starts), strict=True):  # [0]: verify
        rate(step["step"], step["in"], t1 - t0)
        dropped = ", ".join(f"{r} {n}" for r, n in step["dropped"].items()) or "-"
        print(f"{'':<28} dropped {dropped}")


def ours(texts: list[str]) -> np.ndarray:
    sig = minhash(texts, NUM_PERM, SHINGLE)
    return near_duplicates_from_signatures(sig, THRESHOLD)


def datasketch_lsh(texts: list[str], weights=(0.5, 0.5)) -> list[set[int]]:
    """What a user would write with datasketch: bulk MinHash, LSH insert, query each."""
    from datasketch import MinHash, MinHashLSH

    def shingles(t: str) -> set[bytes]:
        w = t.lower().split()
        return {" ".join(w[i : i + SHINGLE]).encode() for i in range(max(1, len(w) - SHINGLE + 1))}

    sigs = MinHash.bulk([shingles(t) for t in texts], num_perm=NUM_PERM)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, weights=weights)
    with lsh.insertion_session() as session:
        for i, m in enumerate(sigs):
            session.insert(i, m)
    return [set(lsh.query(m)) - {i} for i, m in enumerate(sigs)]


def bench_near(traces: list[Trace], near: list[tuple[int, int]]) -> None:
    texts = [assistant_text(t) for t in traces]
    # exact copies removed first, as the stage does, so both see the same near-dup task
    rep, dt = timed("near dup: ours", len(texts), lambda: ours(texts))
    recall_ours = np.mean([rep[b] == rep[a] for a, b in near])
    flagged = int((rep != np.arange(len(rep))).sum())
    print(
        f"near dup: ours {len(texts) / dt:,.0f} docs/s, recall {recall_ours:.3f} "
        f"({len(near)} planted, {flagged} rows flagged incl. exact copies)"
    )
    for label, weights in (("default weights", (0.5, 0.5)), ("our weights", (0.05, 0.95))):
        found, dt_ds = timed(
            f"near dup: datasketch {label}", len(texts), lambda w=weights: datasketch_lsh(texts, w)
        )
        recall = np.mean([a in found[b] for a, b in near])
        pairs = sum(map(len, found)) // 2
        print(
            f"near dup: datasketch ({label}) {len(texts) / dt_ds:,.0f} docs/s, recall "
            f"{recall:.3f}, {pairs} candidate pairs; ours is {dt_ds / dt:.2f}x faster"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    t = time.perf_counter()
    traces, evals, near = make_traces(args.rows)
    print(
        f"{args.rows} synthetic traces built in {time.perf_counter() - t:.1f} s "
        f"on {os.cpu_count()} cores",
        flush=True,
    )
    bench_near(traces, near)
    bench_steps(traces, evals)
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()

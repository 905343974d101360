"""Shard store vs jsonlines vs plain Parquet: write, full read, random access, memory.

    python bench/shards.py                 # 200k rows (~2.9 KB each as JSON), sizes N/4 and N
    python bench/shards.py --rows 20000    # quicker

Every measurement runs in a fresh subprocess (the fastest of ``--repeat`` runs counts,
since other load on the machine only adds time) so peak memory is its own: "peak MB" is
the process's peak resident set (ru_maxrss) minus its resident set after imports,
input generation and a warm-up (Arrow loads its compute kernels on first use), so it
counts Python objects, Arrow buffers and the pages of memory-mapped files it touched.
All three stores read files that were just written (warm page cache). Rows come from the
same generator for every store; they are generated before the clock starts (their
generation rate is reported alone). What each figure measures:

- write: rows/s from Python dicts to files on disk (ours: ShardWriter, bounded shards,
  sha256, fsync per shard, manifest; jsonlines: ``jsonlines.Writer.write``; Parquet:
  ``Table.from_pylist`` per 2,000 rows + ``ParquetWriter.write_table``, snappy).
- full read (Arrow): rows/s to load every row as a columnar table and compute the UTF-8
  length of every message content and reasoning (touches every text byte). jsonlines
  has no columnar form: its figure is the full parse (the same number as the next line).
- full read (Python): rows/s to get every row as a Python dict and sum the same lengths.
- random access: 1,000 random rows as Python dicts (ours: ``shards.take`` on the
  memory-mapped shards; jsonlines: one streaming pass keeping the wanted lines, the best
  one can do without an index; Parquet: read only the row groups holding the rows, one at
  a time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to in is that for it as with was on be by this are or from at an which "
    "have not has but were all their can more one two three four five equation solve "
    "function return value list tool call answer check therefore because step sum total"
).split()
STORES = ("ours", "jsonlines", "parquet")
N_RANDOM = 1000


# --------------------------------------------------------------------------- rows


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def row_pool(size: int = 1000) -> list[dict]:
    """Distinct realistic trace rows (multi-turn, a tool call; ~2.9 KB as a JSON line)."""
    rng = random.Random(0)
    pool = []
    for i in range(size):
        pool.append(
            {
                "task_id": f"math-{i:08x}",
                "domain": ["math", "code", "logic", "agents"][i % 4],
                "split": "train",
                "teacher": "teacher-math",
                "messages": [
                    {
                        "role": "system",
                        "content": "You are a careful assistant. Think, then answer.",
                    },
                    {"role": "user", "content": _text(rng, rng.randint(40, 80))},
                    {
                        "role": "assistant",
                        "reasoning_content": _text(rng, rng.randint(150, 300)),
                        "content": None,
                        "tool_calls": [
                            {
                                "id": f"call_{i}",
                                "type": "function",
                                "function": {
                                    "name": "calc",
                                    "arguments": json.dumps({"expr": f"{i} * 7 + 3"}),
                                },
                            }
                        ],
                    },
                    {"role": "tool", "content": str(i * 7 + 3), "tool_call_id": f"call_{i}"},
                    {
                        "role": "assistant",
                        "reasoning_content": _text(rng, rng.randint(60, 150)),
                        "content": "Answer: " + _text(rng, 20),
                    },
                ],
                "reference": json.dumps({"answer": i * 7 + 3}),
                "finish_reason": "stop",
                "prompt_tokens": rng.randint(50, 120),
                "completion_tokens": rng.randint(300, 700),
                "verdict": {
                    "passed": bool(i % 3),
                    "score": float(i % 3 > 0),
                    "reason": "correct" if i % 3 else "wrong answer",
                },
                "lineage": {
                    "teacher_model": "tiny-llama",
                    "sampling": '{"temperature": 0.7}',
                    "verifier": "math-verify",
                    "verifier_version": "1",
                    "recipe_fingerprint": "0123456789abcdef",
                },
            }
        )
    return pool


def rows(n: int):
    """``n`` distinct rows: pool rows with a unique id and a row-specific suffix, so no
    store can profit from repeated values."""
    pool = row_pool()
    for i in range(n):
        r = dict(pool[i % len(pool)])
        msgs = [dict(m) for m in r["messages"]]
        msgs[1]["content"] += f" (variant {i})"
        msgs[4]["content"] += f" #{i}"
        r["id"] = f"row-{i:08d}"
        r["messages"] = msgs
        yield r


def text_len(r: dict) -> int:
    return sum(
        len(m.get("content") or "") + len(m.get("reasoning_content") or "") for m in r["messages"]
    )


# --------------------------------------------------------------------------- one measurement


def op_generate(path: Path, n: int) -> int:
    return sum(1 for _ in rows(n))


def op_write(store: str, path: Path, n: int, data: list[dict]) -> int:
    if store == "ours":
        from distill.shards import ShardWriter

        with ShardWriter(path, max_rows=2000) as w:
            w.write(data)
    elif store == "jsonlines":
        import jsonlines

        with jsonlines.open(path, "w") as w:
            for r in data:
                w.write(r)
    else:
        import pyarrow.parquet as pq

        from distill.messages import TRACE_SCHEMA, rows_table

        with pq.ParquetWriter(str(path), TRACE_SCHEMA) as w:
            buf = []
            for r in data:
                buf.append(r)
                if len(buf) == 2000:
                    w.write_table(rows_table(buf))
                    buf = []
            if buf:
                w.write_table(rows_table(buf))
    return n


def _arrow_text_len(table) -> int:
    import pyarrow.compute as pc

    flat = pc.list_flatten(table.column("messages"))
    return sum(
        pc.sum(pc.utf8_length(pc.struct_field(flat, f))).as_py() or 0
        for f in ("content", "reasoning_content")
    )


def _table(store: str, path: Path):
    if store == "ours":
        from distill.shards import read_table

        return read_table(path)
    import pyarrow.parquet as pq

    return pq.read_table(path, memory_map=True)


def op_read_arrow(store: str, path: Path, n: int) -> int:
    if store == "jsonlines":
        return op_read_python(store, path, n)
    return _arrow_text_len(_table(store, path))


def op_read_python(store: str, path: Path, n: int) -> int:
    total = 0
    if store == "jsonlines":
        import jsonlines

        with jsonlines.open(path) as f:
            for r in f:
                total += text_len(r)
        return total
    for batch in _table(store, path).to_batches():
        for r in batch.to_pylist():
            total += text_len(r)
    return total


def op_random(store: str, path: Path, n: int) -> int:
    idx = sorted(random.Random(1).sample(range(n), min(N_RANDOM, n)))
    if store == "ours":
        from distill.shards import take

        got = take(path, idx).to_pylist()
    elif store == "jsonlines":
        wanted, got = set(idx), []
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                if i in wanted:
                    got.append(json.loads(line))
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path, memory_map=True)
        starts, s = [], 0
        for g in range(pf.metadata.num_row_groups):
            starts.append(s)
            s += pf.metadata.row_group(g).num_rows
        got, j = [], 0
        for g, start in enumerate(starts):
            end = start + pf.metadata.row_group(g).num_rows
            local = []
            while j < len(idx) and idx[j] < end:
                local.append(idx[j] - start)
                j += 1
            if local:
                got += pf.read_row_group(g).take(local).to_pylist()
    assert [r["id"] for r in got] == [f"row-{i:08d}" for i in idx]
    return sum(text_len(r) for r in got)


OPS = {
    "generate": op_generate,
    "write": op_write,
    "read_arrow": op_read_arrow,
    "read_python": op_read_python,
    "random": op_random,
}


def warm_up() -> None:
    """Load what every store needs once per process (Arrow's compute kernels live in a
    library loaded on first use: ~1 s and ~50 MB of code the first time)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from distill.messages import rows_table

    table = rows_table(list(rows(2)))
    table.take([1, 0]).to_pylist()
    _arrow_text_len(table)
    pc.sum(pa.array([1]))
    json.loads(json.dumps(table.to_pylist()))


def child(op: str, store: str, path: str, n: int) -> None:
    import jsonlines  # noqa: F401
    import psutil
    import pyarrow.parquet  # noqa: F401

    import distill.shards  # noqa: F401  (imports are not part of the measurement)

    data = list(rows(n)) if op == "write" else None  # input rows are not part of it either
    warm_up()
    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if op == "generate":
        result = op_generate(Path(path), n)
    elif op == "write":
        result = op_write(store, Path(path), n, data)
    else:
        result = OPS[op](store, Path(path), n)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_mb": max(0, peak - base) / 1e6, "result": result}))


# --------------------------------------------------------------------------- driver


def measure(op: str, store: str, path: Path, n: int, repeat: int = 1) -> dict:
    """The fastest of ``repeat`` fresh-process runs (other load only ever adds time)."""
    runs = []
    for _ in range(repeat):
        if op == "write":  # every run writes from scratch (the shard writer would resume)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", op, store, str(path), str(n)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["seconds"])


def size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def store_path(work: Path, store: str, n: int) -> Path:
    return (
        work
        / {"ours": f"ours-{n}", "jsonlines": f"rows-{n}.jsonl", "parquet": f"rows-{n}.parquet"}[
            store
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--workdir", default=None, help="Scratch directory (default: a temp dir).")
    ap.add_argument("--repeat", type=int, default=3, help="Runs per figure; the fastest counts.")
    args = ap.parse_args()
    from rich.console import Console

    console = Console()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-shards-"))
    work.mkdir(parents=True, exist_ok=True)
    n, small = args.rows, args.rows // 4
    res: dict = {}
    try:
        load_before = os.getloadavg()  # other jobs on the machine skew every figure
        res["generate"] = measure("generate", "-", work, n)
        plan = [(small, ("write", "random")), (n, ("write", "read_arrow", "read_python", "random"))]
        for size, ops in plan:
            # repetitions interleave the stores, so a burst of other load hits all of them
            for rep in range(args.repeat):
                for store in STORES:
                    path = store_path(work, store, size)
                    for op in ops:
                        r = measure(op, store, path, size)
                        best = res.get((store, size, op))
                        if best is None or r["seconds"] < best["seconds"]:
                            res[(store, size, op)] = r
                        console.print(
                            f"run {rep + 1} {store:9s} n={size:>7,} {op:11s} {r['seconds']:7.2f} s  peak {r['peak_mb']:7.1f} MB"
                        )
                    res[(store, size, "disk_mb")] = size_on_disk(path) / 1e6
            if size == small:
                for store in STORES:  # the small copies are only for the memory comparison
                    p = store_path(work, store, size)
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        sums = {res[(s, n, "read_python")]["result"] for s in STORES} | {
            res[(s, n, "read_arrow")]["result"] for s in STORES
        }
        if len(sums) != 1:
            raise SystemExit(f"stores disagree on the data read back: {sums}")
        console.print(report(res, n, small))
        loads = (
            " ".join(f"{x:.2f}" for x in load_before),
            " ".join(f"{x:.2f}" for x in os.getloadavg()),
        )
        console.print(f"Load average (1, 5, 15 min): {loads[0]} at start, {loads[1]} at end.")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def report(res: dict, n: int, small: int) -> str:
    """The results as a Markdown table (pasted into BENCHMARKS.md)."""

    def cell(store: str, op: str) -> str:
        r, j = res[(store, n, op)], res[("jsonlines", n, op)]
        return (
            f"{n / r['seconds']:,.0f} ({j['seconds'] / r['seconds']:.1f}x), {r['peak_mb']:,.0f} MB"
        )

    lines = [
        f"| store | write rows/s | full read, Arrow | full read, Python dicts | disk MB | random 1k rows @ {small:,} | random 1k rows @ {n:,} |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in STORES:
        rnd = [res[(s, size, "random")] for size in (small, n)]
        lines.append(
            f"| {s} | {cell(s, 'write')} | {cell(s, 'read_arrow')} | {cell(s, 'read_python')} | "
            f"{res[(s, n, 'disk_mb')]:,.0f} | "
            + " | ".join(f"{r['seconds'] * 1000:,.0f} ms, {r['peak_mb']:,.0f} MB" for r in rnd)
            + " |"
        )
    lines.append("")
    lines.append(
        f"Row generation alone (not in any figure): {n / res['generate']['seconds']:,.0f} rows/s."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()

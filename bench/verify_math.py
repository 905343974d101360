"""Math (and logic) verification throughput: `distill.verify.verify_many` against the
loop a user would otherwise write with math-verify (`verify(parse(gold), parse(answer))`
per sample, one process), on the same completions, side by side.

    .venv/bin/python bench/verify_math.py [--n 2000] [--workers N]

Completions are oracle answers of difficulties 1-5, every other one corrupted (last
integer + 1), so half should pass. Prints samples per second and the agreement of the
two judgements.
"""

from __future__ import annotations

import argparse
import os
import re
import time

from math_verify import parse, verify

from distill.verify import verify_many
from teachers.base import get_domain


def corrupt(answer: str) -> str:
    m = list(re.finditer(r"\d+", answer))[-1]
    return answer[: m.start()] + str(int(m.group()) + 1) + answer[m.end() :]


def math_items(n: int) -> list:
    dom, items = get_domain("math"), []
    for d in range(1, 6):
        for i, task in enumerate(dom.tasks("eval", n // 5, seed=11, difficulty=d)):
            answer = task.reference["answer"]
            content = f"So the result is \\boxed{{{corrupt(answer) if i % 2 else answer}}}."
            items.append((task, [*task.messages, {"role": "assistant", "content": content}]))
    return items


def logic_items(n: int) -> list:
    dom = get_domain("logic")
    return [(t, dom.oracle(t)) for d in range(1, 6) for t in dom.tasks("eval", n // 5, 11, d)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    items = math_items(args.n)
    verify(parse("$1$"), parse("$1$"))  # warm both sides' parser caches equally

    t = time.perf_counter()
    baseline = [
        verify(parse(f"${task.reference['answer']}$"), parse(msgs[-1]["content"]))
        for task, msgs in items
    ]
    t_base = time.perf_counter() - t

    t = time.perf_counter()
    serial = verify_many("math", items, workers=1)
    t_serial = time.perf_counter() - t

    t = time.perf_counter()
    ours = verify_many("math", items, workers=args.workers)
    t_ours = time.perf_counter() - t
    assert [v.passed for v in serial] == [v.passed for v in ours]

    agree = sum(a == b.passed for a, b in zip(baseline, ours, strict=True)) / len(items)
    workers = args.workers or os.cpu_count()
    print(f"math: {len(items)} samples, {sum(v.passed for v in ours)} passed")
    print(f"  math-verify loop (1 process):        {len(items) / t_base:8.0f} samples/s")
    print(f"  distill verify_many (1 process):     {len(items) / t_serial:8.0f} samples/s")
    print(f"  distill verify_many ({workers} workers):     {len(items) / t_ours:8.0f} samples/s")
    print(f"  ratio {t_base / t_ours:.1f}x, agreement {agree:.1%} (process start included)")
    print(f"  load average during the run: {os.getloadavg()[0]:.1f}")

    items = logic_items(args.n)
    t = time.perf_counter()
    verdicts = verify_many("logic", items, workers=args.workers)
    t_logic = time.perf_counter() - t
    assert all(v.passed for v in verdicts)
    print(
        f"logic: {len(items)} oracle samples, {len(items) / t_logic:.0f} samples/s ({workers} workers)"
    )


if __name__ == "__main__":
    main()

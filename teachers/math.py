r"""The math domain: arithmetic and algebra problems with exact answers.

Tasks: see :mod:`teachers.math_tasks` (difficulty 1 = column-wise addition, up to 5 =
systems of equations, polynomial expansion, percentages). The oracle's final answer is
``\boxed{...}`` in ``content``.

Verifier ``math-equiv`` judges the last assistant turn's ``content``: the answer is the
last ``\boxed{...}``, else an ``Answer: ...`` line, else ``#### ...``, else the last
number. It is equivalent to ``reference["answer"]`` when exact integers match, else when
math-verify says so (LaTeX, fractions vs decimals, ``x = 3`` vs ``3``, thousands
separators, sets, intervals, expressions), else, only when math-verify cannot parse one
side, when both are equal as exact fractions or as normalised strings. Answers sympy
could not evaluate in bounded time (power towers, huge exponents or factorials) are
compared as normalised strings only.

Real records: GSM8K (``question``, ``answer`` ending in ``#### N``) and MATH
(``problem`` with ``answer``, or ``solution`` holding a ``\boxed{}`` answer).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

from distill.errors import UserError
from distill.messages import Verdict
from teachers import math_tasks
from teachers.base import Task, self_check, task_id
from teachers.common import final_answer, generate_tasks, load_split, read_answer, split_key

VERIFIER_NAME = "math-equiv"
VERIFIER_VERSION = "1"
MAX_ANSWER_CHARS = 300  # longer "answers" are not answers, and slow to parse
PARSE_TIMEOUT_S = 3

# A power tower or a huge exponent/factorial: sympy may run for ages evaluating it, and
# math-verify's timeout cannot stop it outside the main thread.
_EXPLOSIVE = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\{?\s*\d{4,}|\d{4,}\s*!|\\uparrow")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_INT = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")


def extract_answer(content: str | None) -> str | None:
    """The final answer of a completion (boxed, ``Answer:``, ``####``, last number)."""
    if not content:
        return None
    found = final_answer(content)
    if found is not None:
        return _drop_units(found)
    numbers = _NUMBER.findall(content)
    return numbers[-1].rstrip(",") if numbers else None


# "18 dollars", "$18", "5 cm.": a number followed by words of two letters or more
_UNITS = re.compile(
    r"\\?\$?\s*(-?\d[\d,]*(?:\.\d+)?)\s+([a-zA-Z]{2,}(?:\s+[a-zA-Z]+)*)\.?|\\?\$\s*(-?\d[\d,]*(?:\.\d+)?)"
)
_MATH_WORDS = {"pi", "sqrt", "inf", "infinity", "and", "or"}


def _drop_units(answer: str) -> str:
    """The number of an answer written with a currency sign or units; else unchanged."""
    m = _UNITS.fullmatch(answer.strip())
    if not m or (m.group(2) and set(m.group(2).lower().split()) & _MATH_WORDS):
        return answer
    return m.group(1) or m.group(3)


def _strip(s: str) -> str:
    s = s.strip().strip("$").strip().rstrip(".").strip()
    s = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    return re.sub(r"\s+", "", s)


_RATIONAL = re.compile(
    r"(?:([a-zA-Z])=)?(-?)(?:(\d{1,3}(?:,\d{3})+|\d+)(?:/(\d+))?|\\[dt]?frac\{(\d+)\}\{(\d+)\})"
)


def _rational(s: str) -> tuple[str | None, Fraction] | None:
    """(variable, value) of ``12``, ``-1,000``, ``3/4``, ``-\\frac{3}{4}``, ``x=-3``
    (whitespace already removed); None for anything else, decimals included."""
    m = _RATIONAL.fullmatch(s)
    if not m:
        return None
    var, sign, num, den, fnum, fden = m.groups()
    num, den = (num, den or "1") if num is not None else (fnum, fden)
    if int(den) == 0:
        return None
    value = Fraction(int(num.replace(",", "")), int(den))
    return var, -value if sign else value


def _solution(s: str) -> dict[str | None, Fraction] | None:
    """``x=3,y=-2`` (two or more named rational values) as a dict; else None."""
    parts = [_rational(x) for x in s.split(",")] if s.count("=") > 1 else []
    if not parts or any(x is None or x[0] is None for x in parts):
        return None
    return dict(parts) if len({x[0] for x in parts}) == len(parts) else None


def _rational_tuple(s: str) -> list[Fraction] | None:
    """``(3,-2)`` as a list of values; else None."""
    if not (s.startswith("(") and s.endswith(")")):
        return None
    parts = [_rational(x) for x in s[1:-1].split(",")]
    if len(parts) < 2 or any(x is None or x[0] is not None for x in parts):
        return None
    return [x[1] for x in parts]


def _as_fraction(s: str) -> Fraction | None:
    s = s.replace(",", "") if _INT.fullmatch(s) else s
    m = re.fullmatch(r"(-?)\\d?frac\{(-?\d+)\}\{(\d+)\}", s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify(gold: str, pred: str) -> bool | None:
    """math-verify's judgement, or None when it cannot parse one side. Its timeouts use
    SIGALRM, which only works in the main thread: elsewhere they are off (answers are
    short, capped by MAX_ANSWER_CHARS, so parsing stays fast)."""
    from math_verify import parse, verify

    t = PARSE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    g = parse(f"${gold.strip().strip('$')}$", parsing_timeout=t)
    p = parse(f"${pred.strip().strip('$')}$", parsing_timeout=t)
    if not any(not isinstance(x, str) for x in g) or not any(not isinstance(x, str) for x in p):
        return None
    return bool(verify(g, p, timeout_seconds=t))


def answers_match(gold: str, pred: str) -> bool:
    """Whether ``pred`` is mathematically the same answer as ``gold`` (pure)."""
    g, p = _strip(gold), _strip(pred)
    if g == p:
        return True
    rg, rp = _rational(g), _rational(p)
    if rg is not None and rp is not None:  # exact, and much faster than sympy
        return rg[1] == rp[1] and (rg[0] == rp[0] or None in (rg[0], rp[0]))
    solution = _solution(g)
    if solution is not None:  # several unknowns: math-verify takes (-2, 3) for x=3, y=-2
        named, ordered = _solution(p), _rational_tuple(p)
        if named is not None or ordered is not None:
            return named == solution or ordered == list(solution.values())
    if _EXPLOSIVE.search(g) or _EXPLOSIVE.search(p):
        return g.lower() == p.lower()
    judged = _math_verify(gold, pred)
    if judged is not None:
        return judged
    fg, fp = _as_fraction(g), _as_fraction(p)
    if fg is not None and fp is not None:
        return fg == fp
    return g.lower() == p.lower()


def verify_answer(reference: dict[str, Any], messages: list[dict[str, Any]]) -> Verdict:
    """Verdict of the last assistant turn against ``reference["answer"]``."""
    expected = str(reference["answer"])
    got = read_answer(messages, MAX_ANSWER_CHARS, extract_answer)
    if isinstance(got, Verdict):
        return got
    if answers_match(expected, got):
        return Verdict.ok()
    return Verdict.fail(f"wrong answer: got {got}, expected {expected}")


# One record of each real format, with a right answer (``distill verify`` input); the
# contract test (tests/test_domains.py) loads and verifies them.
RECORD_EXAMPLES = [
    {
        "question": "Tom has 3 boxes of 12 eggs and eats 5. How many eggs are left?",
        "answer": "3*12=<<3*12=36>>36 eggs\n36-5=<<36-5=31>>31\n#### 31",
        "completion": "3 boxes of 12 is 36 eggs; 36 - 5 = 31.\n#### 31",
    },
    {
        "problem": "Compute $\\frac12+\\frac14$.",
        "solution": "Sum: $\\boxed{\\frac{3}{4}}$.",
        "completion": "\\boxed{0.75}",
    },
    {"problem": "Solve $2x=8$.", "answer": "4", "completion": "Answer: x = 4"},
]


class MathDomain:
    """Generated arithmetic/algebra tasks, oracle traces and the ``math-equiv`` verifier."""

    name = "math"
    verifier_name = VERIFIER_NAME
    verifier_version = VERIFIER_VERSION
    record_examples = RECORD_EXAMPLES

    def tasks(self, split: str, n: int, seed: int, difficulty: int = 1) -> Iterator[Task]:
        return generate_tasks(self.name, math_tasks.make, split, n, seed, difficulty)

    def oracle(self, task: Task, check: bool = False) -> list[dict[str, Any]]:
        steps = task.meta.get("steps")
        reasoning = "\n".join(steps) if steps else task.meta.get("solution") or ""
        if check and steps:
            reasoning += "\n" + self_check(steps)
        answer = {"role": "assistant", "reasoning_content": reasoning}
        answer["content"] = f"\\boxed{{{task.reference['answer']}}}"
        return [*task.messages, answer]

    def verify(self, task: Task, messages: list[dict[str, Any]]) -> Verdict:
        return verify_answer(task.reference, messages)

    def environment(self, task: Task) -> None:
        return None

    def from_record(self, record: dict[str, Any], index: int = 0) -> Task:
        """A GSM8K record (``question``, ``answer`` with ``#### N``) or a MATH record
        (``problem`` with ``answer`` or a ``solution`` containing ``\\boxed{}``)."""
        problem = record.get("problem") or record.get("question")
        if not isinstance(problem, str) or not problem.strip():
            raise UserError("math record needs a 'question' (GSM8K) or 'problem' (MATH) field")
        answer, solution = _record_answer(record)
        identity = f"record:{problem.strip()}"
        return Task(
            id=task_id(self.name, identity),
            domain=self.name,
            messages=[{"role": "user", "content": problem.strip()}],
            reference={"answer": answer},
            meta={"source": "record", "index": index, "solution": solution, **split_key(identity)},
        )

    def load_records(self, path: str, split: str = "eval") -> Iterator[Task]:
        return load_split(path, split, self.from_record)


def _record_answer(record: dict[str, Any]) -> tuple[str, str | None]:
    """(answer, worked solution) of a GSM8K or MATH record."""
    from teachers.common import last_boxed

    solution = record.get("solution")
    answer = record.get("answer")
    if isinstance(answer, (int, float)):
        return str(answer), solution
    if isinstance(answer, str) and "####" in answer:  # GSM8K: work, then "#### N"
        work, _, final = answer.rpartition("####")
        work = re.sub(r"<<[^>]*>>", "", work).strip()  # calculator annotations
        return final.strip().replace(",", ""), work or None
    if isinstance(answer, str) and answer.strip():
        return answer.strip(), solution
    if isinstance(solution, str) and last_boxed(solution) is not None:
        return last_boxed(solution), solution
    raise UserError("math record needs an 'answer' or a 'solution' with a \\boxed{} answer")


DOMAIN = MathDomain()

"""The logic domain: puzzles with answers a solver checks.

Tasks (see :mod:`teachers.logic_puzzles`), two kinds per difficulty:
1 evaluate a formula with 2-3 operators, or order 3 people from 2 constraints;
2 formulas with 4-5 operators, or 4 people; 3 satisfy a 3-variable CNF, or 5 people;
4 knights and knaves with 3 islanders, or a 4-variable CNF; 5 four islanders, or 5 variables.

The final answer is an ``Answer: ...`` line (or ``\\boxed{...}``) in ``content``:
``Answer: T`` (bool), ``Answer: Ann, Ben, Cal`` (order, first to last),
``Answer: A=T, B=F, C=T`` (sat), ``Answer: Ann=knight, Ben=knave`` (knights).

Verifier ``logic-constraints`` checks the answer against the puzzle's constraints, not
one string: any order meeting every before/after constraint, any assignment satisfying
every clause, any knight/knave assignment under which exactly the knights tell the truth.

Real records (JSONL, one object per line): ``question`` (the prompt) and ``answer``
(the expected answer text, compared case- and whitespace-insensitively, and for comma
lists item by item), optionally ``reference`` (an object in the form of the generated
kinds above, e.g. ``{"kind": "sat", "vars": [...], "clauses": [[["A", true], ...]]}``),
in which case the answer is checked against the constraints instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from distill.errors import UserError
from distill.messages import Verdict
from teachers import logic_puzzles as lp
from teachers.base import Task, self_check, task_id
from teachers.common import generate_tasks, load_split, read_answer, split_key

VERIFIER_NAME = "logic-constraints"
VERIFIER_VERSION = "1"
MAX_ANSWER_CHARS = 500

_TRUTH = {"t": True, "true": True, "1": True, "f": False, "false": False, "0": False}
_ROLE = {"knight": True, "knave": False}


def _items(answer: str) -> list[str]:
    return [x.strip() for x in re.split(r"[,;]|\s+then\s+", answer.strip().strip(".")) if x.strip()]


class _Unreadable(ValueError):
    """An answer a check cannot read; its text is the failed verdict's reason."""


def _assignment(
    answer: str, values: dict[str, bool], names: list[str], verb: str
) -> dict[str, bool]:
    """``X=v, Y=w`` parsed with ``values`` mapping words to booleans, giving exactly
    ``names`` (``verb``: what the answer does with them, for the error text)."""
    out: dict[str, bool] = {}
    for part in _items(answer):
        m = re.fullmatch(r"(\w+)\s*(?:=|:|is an?|is)\s*(\w+)", part, re.IGNORECASE)
        if not m or m.group(2).lower() not in values:
            raise _Unreadable(f"cannot read assignment {part!r}")
        name = m.group(1)
        value = values[m.group(2).lower()]
        if out.get(name, value) != value:
            raise _Unreadable(f"{name} assigned twice")
        out[name] = value
    if set(out) != set(names):
        raise _Unreadable(f"assignment must {verb} exactly {', '.join(names)}")
    return out


def check_bool(ref: dict[str, Any], answer: str) -> Verdict:
    got = _TRUTH.get(answer.strip().strip(".").lower())
    if got is None:
        return Verdict.fail(f"cannot read truth value {answer!r}")
    expected = ref["value"]
    return (
        Verdict.ok()
        if lp.tf(got) == expected
        else Verdict.fail(f"wrong answer: got {lp.tf(got)}, expected {expected}")
    )


def check_order(ref: dict[str, Any], answer: str) -> Verdict:
    order = _items(answer)
    if sorted(order) != sorted(ref["items"]):
        return Verdict.fail(f"not an order of {', '.join(ref['items'])}: got {answer}")
    pos = {x: i for i, x in enumerate(order)}
    for a, b in ref["before"]:
        if pos[a] > pos[b]:
            return Verdict.fail(f"constraint broken: {a} must be before {b}")
    return Verdict.ok()


def check_sat(ref: dict[str, Any], answer: str) -> Verdict:
    assign = _assignment(answer, _TRUTH, ref["vars"], "give")
    for clause in ref["clauses"]:
        if not any(assign[v] == p for v, p in clause):
            return Verdict.fail(f"clause {lp.clause_text(clause)} is false")
    return Verdict.ok()


def check_knights(ref: dict[str, Any], answer: str) -> Verdict:
    assign = _assignment(answer, _ROLE, ref["people"], "name")
    why = lp.consistent(ref["people"], ref["says"], assign)
    return Verdict.fail(f"inconsistent: {why}") if why else Verdict.ok()


def check_text(ref: dict[str, Any], answer: str) -> Verdict:
    """Real records without constraints: the expected text, item by item."""
    norm = lambda s: [re.sub(r"\s+", " ", x).lower() for x in _items(s)]  # noqa: E731
    if norm(answer) == norm(str(ref["answer"])):
        return Verdict.ok()
    return Verdict.fail(f"wrong answer: got {answer}, expected {ref['answer']}")


CHECKS = {
    "bool": check_bool,
    "order": check_order,
    "sat": check_sat,
    "knights": check_knights,
    "text": check_text,
}


def verify_answer(reference: dict[str, Any], messages: list[dict[str, Any]]) -> Verdict:
    """Verdict of the last assistant turn against the puzzle in ``reference``."""
    answer = read_answer(messages, MAX_ANSWER_CHARS)
    if isinstance(answer, Verdict):
        return answer
    try:
        return CHECKS[reference["kind"]](reference, answer)
    except _Unreadable as e:
        return Verdict.fail(str(e))


# Both real-record forms, with a right answer (``distill verify`` input); the contract
# test (tests/test_domains.py) loads and verifies them.
RECORD_EXAMPLES = [
    {"question": "Is (T and F) true?", "answer": "F", "completion": "Answer: F"},
    {
        "question": "Give A and B with (A or B) and (not A or not B) and A.",
        "reference": {
            "kind": "sat",
            "vars": ["A", "B"],
            "clauses": [[["A", True], ["B", True]], [["A", False], ["B", False]], [["A", True]]],
        },
        "completion": "Answer: A=T, B=F",
    },
]


class LogicDomain:
    """Generated logic puzzles, solver traces and the ``logic-constraints`` verifier."""

    name = "logic"
    verifier_name = VERIFIER_NAME
    verifier_version = VERIFIER_VERSION
    record_examples = RECORD_EXAMPLES

    def tasks(self, split: str, n: int, seed: int, difficulty: int = 1) -> Iterator[Task]:
        return generate_tasks(self.name, lp.make, split, n, seed, difficulty)

    def oracle(self, task: Task, check: bool = False) -> list[dict[str, Any]]:
        steps = task.meta.get("steps") or []
        answer = task.meta.get("answer") or task.reference.get("answer")
        reasoning = "\n".join(steps)
        if check and steps:
            reasoning += "\n" + self_check(steps)
        turn = {
            "role": "assistant",
            "reasoning_content": reasoning,
            "content": f"Answer: {answer}",
        }
        return [*task.messages, turn]

    def verify(self, task: Task, messages: list[dict[str, Any]]) -> Verdict:
        return verify_answer(task.reference, messages)

    def environment(self, task: Task) -> None:
        return None

    def from_record(self, record: dict[str, Any], index: int = 0) -> Task:
        """A ``question``/``answer`` record, optionally with a constraint ``reference``."""
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise UserError("logic record needs a 'question' field")
        reference = record.get("reference")
        if reference is not None:
            if not isinstance(reference, dict) or reference.get("kind") not in CHECKS:
                raise UserError(
                    f"logic record 'reference' must be an object with kind in {sorted(CHECKS)}"
                )
        elif answer is None or not str(answer).strip():
            raise UserError("logic record needs an 'answer' (or a constraint 'reference')")
        else:
            reference = {"kind": "text", "answer": str(answer).strip()}
        identity = f"record:{question.strip()}"
        meta = {"source": "record", "index": index, **split_key(identity)}
        if answer is not None:
            meta["answer"] = str(answer).strip()
        return Task(
            id=task_id(self.name, identity),
            domain=self.name,
            messages=[{"role": "user", "content": question.strip()}],
            reference=reference,
            meta=meta,
        )

    def load_records(self, path: str, split: str = "eval") -> Iterator[Task]:
        return load_split(path, split, self.from_record)


DOMAIN = LogicDomain()

"""The logic domain: puzzles, solver traces, the logic-constraints verifier, records."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from distill.errors import UserError
from teachers.base import get_domain
from teachers.logic_puzzles import consistent, dpll

LOGIC = get_domain("logic")


def answer(task, text: str):
    return LOGIC.verify(task, [*task.messages, {"role": "assistant", "content": text}])


def corrupted(task) -> str:
    """An answer that breaks the puzzle: the oracle's answer with one value flipped or
    two neighbours swapped."""
    ref, good = task.reference, task.meta["answer"]
    if ref["kind"] == "bool":
        return "F" if good == "T" else "T"
    if ref["kind"] == "order":
        items = good.split(", ")
        a, b = ref["before"][0]  # swapping a constrained pair breaks that constraint
        i, j = items.index(a), items.index(b)
        items[i], items[j] = items[j], items[i]
        return ", ".join(items)
    if ref["kind"] == "knights":  # the solution is unique, so any flip is wrong
        return good.replace("knight", "X").replace("knave", "knight").replace("X", "knave")
    # sat: a full assignment that falsifies the first clause
    values = {v: True for v in ref["vars"]}
    values.update({v: not p for v, p in ref["clauses"][0]})
    return ", ".join(f"{v}={'T' if values[v] else 'F'}" for v in ref["vars"])


# (the contract every domain meets, oracle traces that pass included: test_domains.py)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_a_broken_constraint_fails(difficulty):
    for task in LOGIC.tasks("eval", 60, seed=difficulty, difficulty=difficulty):
        assert not answer(task, f"Answer: {corrupted(task)}").passed


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_thousands_of_distinct_tasks(difficulty):
    n = 2000 if difficulty < 4 else 1000  # knights puzzles take longer to make unique
    train = list(LOGIC.tasks("train", n, seed=0, difficulty=difficulty))
    assert len({t.messages[-1]["content"] for t in train}) == n


def test_difficulty_one_is_short_and_regular():
    for task in LOGIC.tasks("train", 300, seed=2, difficulty=1):
        trace = LOGIC.oracle(task)
        steps = trace[-1]["reasoning_content"].split("\n")
        assert len(task.messages[-1]["content"]) <= 90
        assert len(steps) <= 7 and len(trace[-1]["reasoning_content"]) <= 200
        assert re.fullmatch(r"Answer: (T|F|\w+, \w+, \w+)", trace[-1]["content"])
        if task.reference["kind"] == "bool":  # each line rewrites one operation
            assert steps[-1] == task.reference["value"]
            assert all(len(b) < len(a) for a, b in zip(steps, steps[1:], strict=False))
        else:  # constraints as "X < Y", then the order
            assert steps[-1] == trace[-1]["content"][len("Answer: ") :].replace(", ", " < ")


def test_sat_accepts_every_satisfying_assignment():
    # several assignments satisfy most formulas: each one must pass, each other fail
    task = next(
        t for t in LOGIC.tasks("train", 50, seed=0, difficulty=5) if t.reference["kind"] == "sat"
    )
    names, clauses = task.reference["vars"], task.reference["clauses"]
    passed = 0
    for bits in itertools.product([True, False], repeat=len(names)):
        values = dict(zip(names, bits, strict=True))
        good = all(any(values[v] == p for v, p in c) for c in clauses)
        text = ", ".join(f"{v}={'true' if values[v] else 'false'}" for v in names)
        assert answer(task, f"Answer: {text}").passed == good
        passed += good
    assert passed >= 1
    assert dpll(names, clauses)[0] is not None


def test_bad_answers_get_reasons():
    task = next(
        t for t in LOGIC.tasks("train", 50, seed=0, difficulty=1) if t.reference["kind"] == "order"
    )
    items = task.reference["items"]
    assert "not an order" in answer(task, f"Answer: {items[0]}, {items[0]}, {items[1]}").reason
    assert answer(task, "I am not sure").reason == "no final answer"
    assert answer(task, f"\\boxed{{{task.meta['answer']}}}").passed
    sat = next(
        t for t in LOGIC.tasks("train", 50, seed=0, difficulty=3) if t.reference["kind"] == "sat"
    )
    assert "exactly" in answer(sat, "Answer: A=T").reason
    assert "cannot read" in answer(sat, "Answer: A=maybe, B=T, C=T").reason


def test_knights_are_unique_and_checked_by_statements():
    task = next(
        t
        for t in LOGIC.tasks("train", 50, seed=0, difficulty=5)
        if t.reference["kind"] == "knights"
    )
    people, says = task.reference["people"], task.reference["says"]
    worlds = [
        dict(zip(people, b, strict=True))
        for b in itertools.product([True, False], repeat=len(people))
    ]
    assert sum(consistent(people, says, w) is None for w in worlds) == 1
    spoken = ", ".join(f"{p} is a {r}" for p, r in re.findall(r"(\w+)=(\w+)", task.meta["answer"]))
    assert answer(task, f"Answer: {spoken}").passed


def test_records(tmp_path):
    sat = next(
        t for t in LOGIC.tasks("train", 50, seed=0, difficulty=3) if t.reference["kind"] == "sat"
    )
    records = [
        {"question": "Is (T and F) true?", "answer": "F"},
        {"question": "Order Ann, Ben.", "answer": "Ben, Ann"},
        {"question": sat.messages[-1]["content"], "reference": sat.reference},
    ]
    path = tmp_path / "logic.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    tasks = list(LOGIC.load_records(str(path), split="all"))
    assert answer(tasks[0], "answer: f").passed
    assert answer(tasks[1], "Answer: ben,  ann").passed
    assert not answer(tasks[1], "Answer: Ann, Ben").passed
    assert answer(tasks[2], f"Answer: {sat.meta['answer']}").passed
    assert LOGIC.verify(tasks[1], LOGIC.oracle(tasks[1])).passed
    path.write_text(json.dumps({"question": "q", "reference": {"kind": "chess"}}) + "\n")
    with pytest.raises(UserError, match=r"logic.jsonl:1: .*reference"):
        list(LOGIC.load_records(str(path), split="all"))


def test_sat_puzzles_that_need_a_backtrack_are_their_own_kind():
    """The eval's per-kind counts show the SAT puzzles whose solution needs a backtrack
    apart: the ones a model that answers before checking its last assignment gets wrong."""
    sats = [
        t for t in LOGIC.tasks("eval", 400, seed=0, difficulty=3) if t.reference["kind"] == "sat"
    ]
    kinds = {t.meta["kind"] for t in sats}
    assert kinds == {"sat", "sat-backtrack"}
    for t in sats:
        backtracks = any("backtrack" in s for s in t.meta["steps"])
        assert (t.meta["kind"] == "sat-backtrack") == backtracks

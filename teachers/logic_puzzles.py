"""Logic puzzle generators and their solvers. Each generator returns a candidate task
whose ``steps`` are the solver's deduction steps (the oracle's reasoning) and whose
reference holds the puzzle's constraints, so the verifier checks any valid answer.

Kinds: ``bool`` (evaluate a formula), ``order`` (order items from before/after
constraints), ``sat`` (a satisfying assignment of a CNF formula), ``knights`` (knights
always tell the truth, knaves always lie).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from teachers.common import Candidate

NAMES = ["Ann", "Ben", "Cal", "Dee", "Eve", "Fox", "Gil", "Hal", "Ivy", "Jo", "Kai", "Lu"]
LETTERS = "ABCDEFGH"


def tf(v: bool) -> str:
    return "T" if v else "F"


# --------------------------------------------------------------------------- bool


def _bool_tree(rng: random.Random, ops: int) -> Any:
    """A random formula: ("val", v), ("not", ("val", v)) or (op, left, right)."""
    if ops == 0:
        leaf = ("val", rng.random() < 0.5)
        return ("not", leaf) if rng.random() < 0.3 else leaf
    left = rng.randint(0, ops - 1)
    return (rng.choice(("and", "or")), _bool_tree(rng, left), _bool_tree(rng, ops - 1 - left))


def _render(node: Any, top: bool = True) -> str:
    if node[0] == "val":
        return tf(node[1])
    if node[0] == "not":
        return "not " + _render(node[1], False)
    text = f"{_render(node[1], False)} {node[0]} {_render(node[2], False)}"
    return text if top else f"({text})"


def _reduce(node: Any) -> Any:
    """The formula with its leftmost innermost operation replaced by its value."""
    if node[0] == "not":
        child = node[1]
        return ("val", not child[1]) if child[0] == "val" else ("not", _reduce(child))
    op, left, right = node
    if left[0] == "val" and right[0] == "val":
        return ("val", (left[1] and right[1]) if op == "and" else (left[1] or right[1]))
    return (op, _reduce(left), right) if left[0] != "val" else (op, left, _reduce(right))


def boolean(rng: random.Random, ops: int) -> Candidate:
    """Evaluate a formula by rewriting it, one operation per line, until one value is
    left: each line is the previous one with a single local change (easy to learn)."""
    tree = _bool_tree(rng, ops)
    formula, steps = _render(tree), []
    while tree[0] != "val":
        tree = _reduce(tree)
        steps.append(_render(tree))
    value = tf(tree[1])
    meta = {"kind": "bool", "steps": steps, "answer": value}
    return f"bool:{formula}", f"Evaluate: {formula}", {"kind": "bool", "value": value}, meta


# --------------------------------------------------------------------------- order


def topo_order(items: list[str], before: list[list[str]]) -> tuple[list[str], list[str]]:
    """Kahn's algorithm, taking items in the order given; returns (order, steps)."""
    order, steps, left = [], [], list(items)
    while left:
        x = next(i for i in left if not any(b == i and a in left for a, b in before))
        preds = [a for a, b in before if b == x]
        steps.append(f"{x}: after {', '.join(preds)}" if preds else f"{x}: no one before {x}")
        order.append(x)
        left.remove(x)
    return order, steps


def ordering(rng: random.Random, n: int, extra: int) -> Candidate:
    """``n`` people in a hidden order; the chain of neighbours plus ``extra`` further
    true constraints, each phrased as "before" or "after"."""
    people = rng.sample(NAMES, n)
    pairs = [[people[i], people[i + 1]] for i in range(n - 1)]
    others = [[people[i], people[j]] for i in range(n) for j in range(i + 2, n)]
    pairs += rng.sample(others, min(extra, len(others)))
    rng.shuffle(pairs)
    clauses = [
        f"{a} is before {b}." if rng.random() < 0.5 else f"{b} is after {a}." for a, b in pairs
    ]
    shown = sorted(people)
    prompt = f"Order {', '.join(shown)} from first to last. " + " ".join(clauses)
    # first every constraint as "X < Y" (one phrasing instead of two), then the order
    order, kahn = topo_order(shown, pairs)
    steps = [f"{a} < {b}" for a, b in pairs] + (kahn if n > 3 else []) + [" < ".join(order)]
    answer = ", ".join(order)
    reference = {"kind": "order", "items": shown, "before": pairs}
    return f"order:{prompt}", prompt, reference, {"kind": "order", "steps": steps, "answer": answer}


# --------------------------------------------------------------------------- sat


def _lit(name: str, positive: bool) -> str:
    return name if positive else f"not {name}"


def clause_text(clause: list[list[Any]]) -> str:
    return "(" + " or ".join(_lit(v, p) for v, p in clause) + ")"


def dpll(
    variables: list[str], clauses: list[list[list[Any]]]
) -> tuple[dict[str, bool] | None, list[str]]:
    """A DPLL solver (unit propagation, then branching T before F in variable order),
    logging its deductions."""
    steps: list[str] = []

    def solve(assign: dict[str, bool]) -> dict[str, bool] | None:
        assign = dict(assign)
        while True:
            unit = None
            for c in clauses:
                if any(assign.get(v) == p for v, p in c):
                    continue
                free = [(v, p) for v, p in c if v not in assign]
                if not free:
                    steps.append(f"{clause_text(c)} is false: backtrack")
                    return None
                if len(free) == 1:
                    unit = (c, free[0])
                    break
            if unit is None:
                break
            (c, (v, p)) = unit
            assign[v] = p
            steps.append(f"{clause_text(c)} forces {v}={tf(p)}")
        free_vars = [v for v in variables if v not in assign]
        if not free_vars:
            return assign
        v = free_vars[0]
        for value in (True, False):
            steps.append(f"try {v}={tf(value)}")
            found = solve({**assign, v: value})
            if found is not None:
                return found
        return None

    return solve({}), steps


def sat(rng: random.Random, nvars: int, nclauses: int) -> Candidate:
    """A satisfiable CNF formula: every clause agrees with a planted assignment."""
    variables = list(LETTERS[:nvars])
    planted = {v: rng.random() < 0.5 for v in variables}
    clauses: list[list[list[Any]]] = []
    while len(clauses) < nclauses:
        chosen = sorted(rng.sample(variables, rng.choice((2, 3)) if nvars > 2 else 2))
        clause = [[v, rng.random() < 0.5] for v in chosen]
        if any(planted[v] == p for v, p in clause) and clause not in clauses:
            clauses.append(clause)
    solution, steps = dpll(variables, clauses)
    assert solution is not None
    answer = ", ".join(f"{v}={tf(solution.get(v, True))}" for v in variables)
    text = ", ".join(clause_text(c) for c in clauses)
    prompt = f"Find T/F values for {', '.join(variables)} that make every clause true: {text}"
    reference = {"kind": "sat", "vars": variables, "clauses": clauses}
    # the report counts the puzzles whose solution needs a backtrack apart: there the model
    # must notice a false clause before answering, the step a length reward taught the GPU
    # student to skip (BENCHMARKS.md, runs H and I), unseen in the SAT total
    kind = "sat-backtrack" if any(s.endswith("backtrack") for s in steps) else "sat"
    return f"sat:{text}", prompt, reference, {"kind": kind, "steps": steps, "answer": answer}


# --------------------------------------------------------------------------- knights


def statement_true(s: list[Any], knight: dict[str, bool]) -> bool:
    """Truth of a statement: ["is", X, role], ["same", X, Y], ["and"|"or", X, r1, Y, r2]."""
    if s[0] == "is":
        return knight[s[1]] == (s[2] == "knight")
    if s[0] == "same":
        return knight[s[1]] == knight[s[2]]
    a, b = knight[s[1]] == (s[2] == "knight"), knight[s[3]] == (s[4] == "knight")
    return (a and b) if s[0] == "and" else (a or b)


def statement_text(s: list[Any]) -> str:
    if s[0] == "is":
        return f"{s[1]} is a {s[2]}"
    if s[0] == "same":
        return f"{s[1]} and {s[2]} are the same kind"
    return f"{s[1]} is a {s[2]} {s[0]} {s[3]} is a {s[4]}"


def consistent(people: list[str], says: list[list[Any]], knight: dict[str, bool]) -> str | None:
    """None when every speaker's statement is true exactly when the speaker is a
    knight; else the first contradiction."""
    for speaker, s in says:
        if statement_true(s, knight) != knight[speaker]:
            role = "knight" if knight[speaker] else "knave"
            return (
                f"{speaker} is a {role} but says a {'false' if knight[speaker] else 'true'} thing"
            )
    return None


def _statement(rng: random.Random, speaker: str, people: list[str]) -> list[Any]:
    others = [p for p in people if p != speaker]
    role = lambda: rng.choice(("knight", "knave"))  # noqa: E731
    kind = rng.choice(("is", "is", "same", "and", "or"))
    if kind == "is":
        return ["is", rng.choice(people), role()]
    x, y = rng.sample(others, 2) if len(others) > 1 else (others[0], speaker)
    return ["same", x, y] if kind == "same" else [kind, x, role(), y, role()]


def knights(rng: random.Random, n: int) -> Candidate:
    """``n`` islanders, one statement each, with exactly one consistent assignment; the
    solver checks every assignment in turn."""
    people = sorted(rng.sample(NAMES, n))
    while True:
        says = [[p, _statement(rng, p, people)] for p in people]
        worlds = [
            dict(zip(people, bits, strict=True))
            for bits in itertools.product((True, False), repeat=n)
        ]
        good = [w for w in worlds if consistent(people, says, w) is None]
        if len(good) == 1:
            break
    steps = []
    for w in worlds:
        label = ", ".join(f"{p}={'knight' if w[p] else 'knave'}" for p in people)
        why = consistent(people, says, w)
        steps.append(f"{label}: {why or 'consistent'}")
    answer = ", ".join(f"{p}={'knight' if good[0][p] else 'knave'}" for p in people)
    lines = " ".join(f'{p} says: "{statement_text(s)}."' for p, s in says)
    prompt = f"Knights always tell the truth and knaves always lie. {lines} Who is a knight and who is a knave?"
    reference = {"kind": "knights", "people": people, "says": says}
    return (
        f"knights:{prompt}",
        prompt,
        reference,
        {"kind": "knights", "steps": steps, "answer": answer},
    )


def make(rng: random.Random, difficulty: int) -> Candidate:
    """One candidate puzzle of ``difficulty`` (1-5); two kinds per level."""
    first = rng.random() < 0.5
    if difficulty <= 1:
        return boolean(rng, rng.randint(2, 3)) if first else ordering(rng, 3, 0)
    if difficulty == 2:
        return boolean(rng, rng.randint(4, 5)) if first else ordering(rng, 4, 1)
    if difficulty == 3:
        return sat(rng, 3, 4) if first else ordering(rng, 5, 2)
    if difficulty == 4:
        return knights(rng, 3) if first else sat(rng, 4, 6)
    return knights(rng, 4) if first else sat(rng, 5, 9)

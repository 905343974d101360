"""Task generation for the agents domain: the user requests a bank task can make, the
oracle scripts that fulfil them (executing every call for real), and the difficulty
levels that compose them into one- to three-turn tasks of 1 to 5 tool calls."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distill.errors import UserError
from distill.messages import tool_call
from teachers.toolenv import BankEnv

SYSTEM_PROMPT = "Use the tools. End with 'Answer: <value>'."
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
         "ivan", "judy", "mike", "nina", "oscar", "peggy", "sam", "trent")  # fmt: skip


class Script:
    """Writes an oracle trajectory while really executing its calls against ``env``."""

    def __init__(self, env: BankEnv, messages: list[dict[str, Any]], check: bool = False):
        self.env, self.messages, self.n_calls = env, messages, 0
        self.check = check  # read every account the turn touched again before answering
        self.touched: list[str] = []  # accounts named in this turn's calls, in order

    def call(self, reasoning: str, *calls: tuple[str, dict[str, Any]]) -> list[str]:
        """One assistant message with ``calls``, then their tool results."""
        made = []
        for name, args in calls:
            for key in ("account", "from", "to"):
                if args.get(key) and args[key] not in self.touched:
                    self.touched.append(args[key])
            self.n_calls += 1
            made.append(tool_call(f"call_{self.n_calls}", name, json.dumps(args)))
        self.messages.append(
            {"role": "assistant", "reasoning_content": reasoning, "tool_calls": made}
        )
        results = []
        for c in made:
            results.append(self.env.execute(c["function"]["name"], c["function"]["arguments"]))
            self.messages.append({"role": "tool", "tool_call_id": c["id"], "content": results[-1]})
        return results

    def answer(self, reasoning: str, value: Any) -> str:
        if self.check and self.touched:
            names = self.touched
            self.call(f"Check {' and '.join(names)} again.", *[_look(a) for a in names])
        self.touched = []
        self.messages.append(
            {"role": "assistant", "reasoning_content": reasoning, "content": f"Answer: {value}"}
        )
        return str(value)

    def bal(self, account: str) -> int:
        return self.env.accounts[account]


def _send(a: str, b: str, x: int) -> tuple[str, dict[str, Any]]:
    return ("transfer", {"from": a, "to": b, "amount": x})


def _look(a: str) -> tuple[str, dict[str, Any]]:
    return ("balance", {"account": a})


# --- the operations a user turn can ask for -------------------------------------------
# pick(rng, accounts, previous spec) -> parameters or None when not applicable now.


def _pick_two(rng, acc, prev):
    a, b = rng.sample(sorted(acc), 2)
    return {"a": a, "b": b}


def _pick_transfer(rng, acc, prev):
    a, b = rng.sample(sorted(acc), 2)
    return {"a": a, "b": b, "x": rng.randint(1, min(acc[a], 50))} if acc[a] > 0 else None


def _pick_richer(rng, acc, prev):
    p = _pick_two(rng, acc, prev)
    return p if acc[p["a"]] != acc[p["b"]] else None


def _pick_move_all(rng, acc, prev):
    p = _pick_two(rng, acc, prev)
    return p if acc[p["a"]] > 0 else None


def _pick_two_transfers(rng, acc, prev):
    a, b, c = rng.sample(sorted(acc), 3)
    if acc[a] < 1:
        return None
    x = rng.randint(1, min(acc[a], 50))
    return {"a": a, "b": b, "c": c, "x": x, "y": rng.randint(1, min(acc[b] + x, 50))}


def _pick_half(rng, acc, prev):
    a = prev["a"]
    b = rng.choice([n for n in sorted(acc) if n != a])
    return {"a": a, "b": b, "x": acc[a] // 2} if acc[a] >= 2 else None


def compare_steps(x: int, y: int) -> str:
    """``x`` against ``y`` written out digit by digit (digits are single tokens): the digit
    counts when they differ, else the leading digits up to the first that differs, e.g.
    ``74 vs 79: 7 = 7, 4 < 9``. Said in one step ("ivan has more") the comparison of two
    numbers was what the GPU student and the demo's agents teacher got wrong most (the
    student 42-46 of 55-58 such tasks against its teacher's 53-55 on one H100, runs H and
    I; the demo's teacher 11 of 36 on the 2-core CPU, BENCHMARKS.md): one digit pair at a
    time is what a small model can learn."""
    sx, sy = str(x), str(y)
    if len(sx) != len(sy):
        sign = ">" if len(sx) > len(sy) else "<"
        return f"{x} vs {y}: {_digits(len(sx))} {sign} {_digits(len(sy))}"
    parts = []
    for dx, dy in zip(sx, sy, strict=True):
        parts.append(f"{dx} {'=' if dx == dy else '>' if dx > dy else '<'} {dy}")
        if dx != dy:
            break
    return f"{x} vs {y}: " + ", ".join(parts)


def _digits(n: int) -> str:
    return f"{n} digit" if n == 1 else f"{n} digits"


def _run_richer(s: Script, a: str, b: str) -> str:
    x, y = map(int, s.call(f"Check {a} and {b}.", _look(a), _look(b)))
    w = a if x > y else b
    return s.answer(f"{a} has {x}, {b} has {y}. {compare_steps(x, y)}. {w} has more.", w)


def _run_total(s: Script, a: str, b: str) -> str:
    x, y = map(int, s.call(f"Check {a} and {b}.", _look(a), _look(b)))
    return s.answer(f"{a} has {x}, {b} has {y}. {x}+{y}={x + y}.", x + y)


def _run_move_all(s: Script, a: str, b: str) -> str:
    x = int(s.call(f"Check {a}'s balance first.", _look(a))[0])
    s.call(f"{a} has {x}. Send {x} to {b}.", _send(a, b, x))
    return s.answer(f"{b} now has {s.bal(b)}.", s.bal(b))


def _run_two(s: Script, a: str, b: str, c: str, x: int, y: int) -> str:
    s.call(f"First send {x} from {a} to {b}.", _send(a, b, x))
    s.call(f"Then send {y} from {b} to {c}.", _send(b, c, y))
    return s.answer(f"{b} now has {s.bal(b)}.", s.bal(b))


def _run_half(s: Script, a: str, b: str, x: int) -> str:
    s.call(f"{a} has {s.bal(a)}. Half is {x}. Send {x} to {b}.", _send(a, b, x))
    return s.answer(f"{a} has {s.bal(a)} left.", s.bal(a))


def _run_undo(s: Script, a: str, b: str, x: int) -> str:
    s.call(f"The last transfer sent {x} from {a} to {b}. Send it back.", _send(b, a, x))
    return s.answer(f"{a} now has {s.bal(a)}.", s.bal(a))


def _run_transfer(s: Script, a: str, b: str, x: int) -> str:
    s.call(f"Send {x} from {a} to {b}.", _send(a, b, x))
    return s.answer(f"{a} has {s.bal(a)} left.", s.bal(a))


def _run_deposit(s: Script, a: str, x: int) -> str:
    s.call(f"Deposit {x} to {a}.", ("deposit", {"account": a, "amount": x}))
    return s.answer(f"{a} now has {s.bal(a)}.", s.bal(a))


def _run_balance(s: Script, a: str) -> str:
    x = s.call(f"Check {a}'s balance.", _look(a))[0]
    return s.answer(f"{a} has {x}.", x)


@dataclass(frozen=True)
class Op:
    calls: int
    pick: Callable[[random.Random, dict[str, int], dict | None], dict | None]
    text: Callable[..., str]
    run: Callable[..., str]
    after: str | None = None  # a follow-up: only right after this op


OPS: dict[str, Op] = {
    "balance": Op(1, lambda r, acc, p: {"a": r.choice(sorted(acc))},
                  lambda a: f"What is {a}'s balance?", _run_balance),
    "transfer": Op(1, _pick_transfer,
                   lambda a, b, x: f"Send {x} from {a} to {b}. How much does {a} have left?",
                   _run_transfer),
    "deposit": Op(1, lambda r, acc, p: {"a": r.choice(sorted(acc)), "x": r.randint(1, 50)},
                  lambda a, x: f"Deposit {x} to {a}. What is the new balance?", _run_deposit),
    "richer": Op(2, _pick_richer, lambda a, b: f"Who has more money, {a} or {b}?", _run_richer),
    "move_all": Op(2, _pick_move_all,
                   lambda a, b: f"Move all of {a}'s money to {b}. How much does {b} have now?",
                   _run_move_all),
    "total": Op(2, _pick_two, lambda a, b: f"How much do {a} and {b} have together?", _run_total),
    "two_transfers": Op(2, _pick_two_transfers,
                        lambda a, b, c, x, y: f"Send {x} from {a} to {b}, then {y} from {b} to {c}. How much does {b} have now?",
                        _run_two),
    "send_half": Op(1, _pick_half, lambda a, b, x: f"Send half of it to {b}. How much is left?",
                    _run_half, after="balance"),
    "what_about": Op(1, lambda r, acc, p: {"a": p["a"], "b": r.choice([n for n in sorted(acc) if n != p["a"]])},
                     lambda a, b: f"What about {b}?", lambda s, a, b: _run_balance(s, b),
                     after="balance"),
    "undo": Op(1, lambda r, acc, p: {k: p[k] for k in "abx"} if acc[p["b"]] >= p["x"] else None,
               lambda a, b, x: f"Undo that transfer. How much does {a} have now?",
               _run_undo, after="transfer"),
}  # fmt: skip


# The accounts whose current balance each answer rests on: the verifier checks that the
# model read them (a right number from a wrong lookup is a guess, not an answer).
NEEDS = {"balance": "a", "transfer": "a", "deposit": "a", "richer": "ab", "total": "ab",
         "move_all": "b", "two_transfers": "b", "send_half": "a", "undo": "a", "what_about": "b"}  # fmt: skip


@dataclass(frozen=True)
class Level:
    turns: tuple[int, int]
    calls: tuple[int, int]
    ops: tuple[str, ...]


_BASIC = ("balance", "transfer", "deposit", "richer", "move_all")
LEVELS = {
    1: Level((1, 1), (1, 2), _BASIC),
    2: Level((1, 2), (2, 3), _BASIC + ("total", "two_transfers")),
    3: Level((2, 3), (3, 5), tuple(OPS)),
}


def _choose(rng: random.Random, level: Level, budget: int, acc: dict, prev: dict | None):
    """The next user turn's spec, or None when no operation fits."""
    fits = [k for k in level.ops if OPS[k].calls <= budget]
    fits = [k for k in fits if OPS[k].after is None or (prev and prev["op"] == OPS[k].after)]
    follow = [k for k in fits if OPS[k].after]
    if follow and rng.random() < 0.6:  # make turns that lean on earlier ones common
        fits = follow
    rng.shuffle(fits)
    for k in fits:
        params = OPS[k].pick(rng, acc, prev)
        if params is not None:
            return {"op": k, **params}
    return None


def play(
    env: BankEnv, specs: list[dict], messages: list[dict], turns: list[str], check: bool = False
) -> list[str]:
    """Run ``specs`` as the oracle would; appends to ``messages``; returns the answers.
    ``messages`` already holds the first user turn. ``check``: re-read the accounts of each
    turn before its answer (the oracle's redundant self-check)."""
    script, answers = Script(env, messages, check), []
    for i, spec in enumerate(specs):
        if i > 0:
            messages.append({"role": "user", "content": turns[i]})
        params = {k: v for k, v in spec.items() if k != "op"}
        answers.append(OPS[spec["op"]].run(script, **params))
    return answers


def make_candidate(rng: random.Random, difficulty: int) -> tuple[str, str, dict, dict]:
    """One candidate task (identity, first prompt, reference, meta) at ``difficulty``
    (1: one turn, 1-2 calls; 2: 1-2 turns, 2-3 calls; 3 and above: 2-3 turns, 3-5)."""
    if difficulty < 1:
        raise UserError(f"agents: difficulty must be >= 1, got {difficulty}")
    level = LEVELS[min(difficulty, 3)]
    while True:
        accounts = {n: rng.randint(10, 99) for n in sorted(rng.sample(NAMES, 3))}
        env = BankEnv({"accounts": accounts})
        n_turns, used, specs, turns = rng.randint(*level.turns), 0, [], []
        for t in range(n_turns):
            budget = level.calls[1] - used - (n_turns - t - 1)
            spec = _choose(rng, level, budget, env.accounts, specs[-1] if specs else None)
            if spec is None:
                break
            specs.append(spec)
            turns.append(OPS[spec["op"]].text(**{k: v for k, v in spec.items() if k != "op"}))
            used += OPS[spec["op"]].calls
            # play turn by turn: the next turn's parameters depend on this turn's state
            play(env, [spec], [], turns[-1:])
        if len(specs) == n_turns and used >= level.calls[0]:
            break
    env = BankEnv({"accounts": accounts})
    answers = play(env, specs, [{"role": "user", "content": turns[0]}], turns)
    reference = {
        "env": {"accounts": accounts},
        "turns": turns,
        "answers": answers,
        "needs": [[s[k] for k in NEEDS[s["op"]]] for s in specs],
        "final_state": env.state(),
    }
    identity = json.dumps({"env": reference["env"], "turns": turns}, sort_keys=True)
    return identity, turns[0], reference, {"ops": specs, "calls": used}

"""The agents domain: multi-turn tool use against a tiny deterministic bank.

A task is a seeded bank (:mod:`teachers.toolenv`) and one to three user turns, each
asking for something that takes one or two tool calls (1 to 5 in all). Later turns may
refer to earlier ones ("Send half of it to bob."), so the model must read the tool
results and answers of earlier turns whose reasoning the thinking-retention rule has
dropped. Every user turn ends with an assistant message ``Answer: <value>``.

The verifier replays the trajectory's tool calls against a fresh bank (tool results
written in the trace are never trusted), then checks the user turns, one final answer
per turn and the final state. It depends only on ``task.reference`` and ``task.tools``.

Real records are JSONL (or Parquet) lines::

    {"id": "r1", "env": {"accounts": {"alice": 40, "bob": 10}},
     "turns": ["Send 5 from alice to bob. How much does alice have left?"],
     "expected_answers": ["35"], "expected_state": {"accounts": {"alice": 35, "bob": 15}},
     "tools": [...optional OpenAI tool schemas, a subset of the bank's...],
     "system": "...optional system prompt...",
     "messages": [...for `distill verify`: the full conversation to judge...]}

``distill verify agents`` also takes a ``completion`` string instead of ``messages`` (one
final assistant message after the prompt: enough for turns that need no tool call).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

from distill.errors import UserError
from distill.messages import Verdict, from_openai
from teachers.agents_tasks import SYSTEM_PROMPT, make_candidate, play
from teachers.base import Task, task_id
from teachers.common import final_answer, generate_tasks, load_split, split_key
from teachers.toolenv import TOOLS, BankEnv, normalize_tools

MAX_CALLS = 20  # a trajectory that needs more is looping, not working


# --- the verifier ------------------------------------------------------------------------

VERIFIER_NAME = "agents-replay"
VERIFIER_VERSION = "1"


def _norm(text: Any) -> str:
    return str(text).strip().strip("*`'\"").rstrip(".").strip().lower()


def same_answer(got: str, expected: str) -> bool:
    """Case-insensitive text match, or numeric equality (``$1,000.0`` equals ``1000``)."""
    a, b = _norm(got), _norm(expected)
    if a == b:
        return True
    try:
        return float(a.replace(",", "").lstrip("$")) == float(b.replace(",", "").lstrip("$"))
    except ValueError:
        return False


class _Replay:
    """Walks a conversation turn by turn, executing its calls on a fresh bank."""

    def __init__(self, env: BankEnv, reference: dict[str, Any]):
        self.env, self.answers = env, list(reference["answers"])
        self.needs, self.multi = reference.get("needs"), len(reference["turns"]) > 1
        self.seen: dict[str, int] = {}  # balances the (recomputed) tool results showed
        self.turn, self.calls, self.pending = -1, 0, set()
        self.last: dict | None = None
        self.wrong: str | None = None  # first answer problem; the state check goes first

    def where(self, reason: str) -> str:
        return f"turn {self.turn + 1}: {reason}" if self.multi else reason

    def assistant(self, m: dict) -> str | None:
        if self.pending:
            return self.unanswered()
        for c in m.get("tool_calls") or []:
            self.calls += 1
            if self.calls > MAX_CALLS:
                return f"too many tool calls (more than {MAX_CALLS})"
            fn = c["function"]
            result = self.env.call(str(fn.get("name")), fn.get("arguments"))
            if result.status == "invalid":
                return f"{result.content.removeprefix('error: ')[:160]} (call {self.calls})"
            self.pending.add(c.get("id"))
            for name in result.revealed:
                self.seen[name] = self.env.accounts[name]
        return None

    def unanswered(self) -> str:
        return f"tool call '{sorted(map(str, self.pending))[0]}' has no tool result"

    def tool(self, m: dict) -> str | None:
        if m.get("tool_call_id") not in self.pending:
            return f"tool result for unknown call '{m.get('tool_call_id')}'"
        self.pending.discard(m.get("tool_call_id"))
        return None

    def close_turn(self) -> str | None:
        """Check the answer of the turn that just ended."""
        if self.turn < 0:
            return None
        if self.pending:
            return self.unanswered()
        last = self.last or {}
        content = last.get("content")
        final = last.get("role") == "assistant" and not last.get("tool_calls")
        got = final_answer(content) if final and isinstance(content, str) else None
        if got is None:
            return self.where("no final answer")
        for name in self.needs[self.turn] if self.needs else []:
            if self.wrong is None and self.seen.get(name) != self.env.accounts.get(name):
                self.wrong = self.where(f"answer not grounded: {name}'s balance was not read")
        expected = self.answers[self.turn]
        if self.wrong is None and expected is not None and not same_answer(got, str(expected)):
            self.wrong = self.where(f"wrong answer: got {got[:80]}, expected {expected}")
        return None


def verify_trajectory(
    reference: dict[str, Any], tools: list | None, messages: list[dict]
) -> Verdict:
    """Replay ``messages`` against a fresh bank built from ``reference`` and judge them:
    user turns as the task's, valid calls, one final answer per turn, the final state."""
    try:
        env = BankEnv(reference["env"], tools)
        turns = list(reference["turns"])
        if len(reference["answers"]) != len(turns):
            raise ValueError("needs one answer per turn")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"agents: malformed task reference ({type(e).__name__}: {e})") from None
    try:  # the OpenAI form; dict arguments of records become JSON text
        messages = from_openai(messages)
    except (ValueError, TypeError, AttributeError) as e:
        return Verdict.fail(f"malformed conversation: {e}")
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    for i, expected in enumerate(turns):
        if i >= len(users):
            return Verdict.fail(f"missing user turn {i + 1} of {len(turns)}")
        if users[i] != expected:
            return Verdict.fail(f"user turn {i + 1} is not the task's")
    if len(users) > len(turns):
        return Verdict.fail(f"unexpected user turn {len(turns) + 1}")
    replay = _Replay(env, reference)
    for m in messages:
        role, err = m.get("role"), None
        if role == "user":
            err = replay.close_turn()
            replay.turn, replay.last = replay.turn + 1, None
        elif role in ("assistant", "tool") and replay.turn < 0:
            err = f"{role} message before the first user turn"
        elif role == "assistant":
            err = replay.assistant(m)
        elif role == "tool":
            err = replay.tool(m)
        if err:
            return Verdict.fail(err)
        if role in ("assistant", "tool"):
            replay.last = m
    err = replay.close_turn()
    if err:
        return Verdict.fail(err)
    expected_state = reference.get("final_state")
    if expected_state is not None:
        want, have = expected_state["accounts"], env.accounts
        for name in sorted(set(want) | set(have)):
            if have.get(name) != want.get(name):
                return Verdict.fail(
                    f"final state wrong: balance of {name} is {have.get(name)}, expected {want.get(name)}"
                )
    return Verdict.fail(replay.wrong) if replay.wrong else Verdict.ok()


# --- real records --------------------------------------------------------------------------


def _field(record: dict[str, Any], key: str) -> Any:
    """A record field, decoded when Parquet/Arrow stored it as a JSON string."""
    value = record.get(key)
    if isinstance(value, str) and key in ("env", "expected_state", "tools"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"agents record: '{key}' is not valid JSON") from None
    return value


def _state(value: Any, key: str) -> dict[str, Any]:
    accounts = value.get("accounts") if isinstance(value, dict) else None
    if not isinstance(accounts, dict):
        raise UserError(f"agents record: '{key}' must be {{\"accounts\": {{name: balance}}}}")
    # Arrow stores records' account maps as one struct: absent names come back as null
    accounts = {k: v for k, v in accounts.items() if v is not None}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in accounts.values()):
        raise UserError(f"agents record: '{key}' balances must be integers")
    return {"accounts": accounts}


def task_from_record(record: dict[str, Any], index: int = 0) -> Task:
    """A task from one real record (format in the module docstring)."""
    missing = [k for k in ("env", "expected_answers") if record.get(k) is None]
    turns = record.get("turns") or ([record["prompt"]] if record.get("prompt") else None)
    if turns is None:
        missing.append("turns")
    if missing:
        raise UserError(f"agents record: missing field(s) {', '.join(missing)}")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise UserError("agents record: 'turns' must be a list of strings")
    answers = record["expected_answers"]
    if not isinstance(answers, list) or len(answers) != len(turns):
        raise UserError("agents record: 'expected_answers' needs one entry per turn")
    try:
        tools = normalize_tools(_field(record, "tools"))
    except ValueError as e:
        raise UserError(f"agents record: {e}") from None
    env = _state(_field(record, "env"), "env")
    final = _field(record, "expected_state")
    reference = {
        "env": env,
        "turns": turns,
        "answers": [None if a is None else str(a) for a in answers],
        "final_state": None if final is None else _state(final, "expected_state"),
    }
    identity = json.dumps({"env": env, "turns": turns}, sort_keys=True)
    system = record.get("system") or SYSTEM_PROMPT
    return Task(
        id=str(record["id"]) if record.get("id") is not None else task_id("agents", identity),
        domain="agents",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": turns[0]}],
        reference=reference,
        meta={"index": index, **split_key(identity)},
        tools=tools,
        followups=turns[1:],
    )


# --- the domain -----------------------------------------------------------------------------


_CALL = {"name": "transfer", "arguments": '{"from": "alice", "to": "bob", "amount": 5}'}
# A real record with a right conversation (``distill verify`` input); the contract test
# (tests/test_domains.py) loads and verifies it.
RECORD_EXAMPLES = [
    {
        "id": "bank-1",
        "env": {"accounts": {"alice": 40, "bob": 10}},
        "turns": ["Send 5 from alice to bob. How much does alice have left?"],
        "expected_answers": ["35"],
        "expected_state": {"accounts": {"alice": 35, "bob": 15}},
        "messages": [
            {"role": "user", "content": "Send 5 from alice to bob. How much does alice have left?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "c1", "type": "function", "function": _CALL}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok: alice 35, bob 15"},
            {"role": "assistant", "content": "Answer: 35"},
        ],
    }
]


class AgentsDomain:
    """The agents domain on the protocol of :mod:`teachers.base`."""

    name = "agents"
    verifier_name = VERIFIER_NAME
    verifier_version = VERIFIER_VERSION
    record_examples = RECORD_EXAMPLES

    def tasks(self, split: str, n: int, seed: int, difficulty: int = 1) -> Iterator[Task]:
        for task in generate_tasks(
            self.name, make_candidate, split, n, seed, difficulty, SYSTEM_PROMPT
        ):
            turns = task.reference["turns"]
            yield dataclasses.replace(task, tools=TOOLS, followups=turns[1:])

    def oracle(self, task: Task, check: bool = False) -> list[dict[str, Any]]:
        if "ops" not in task.meta:
            raise UserError(f"agents: task {task.id} has no oracle (not made by tasks())")
        messages = [dict(m) for m in task.messages]
        env = self.environment(task)
        play(env, task.meta["ops"], messages, task.reference["turns"], check=check)
        return messages

    def verify(self, task: Task, messages: list[dict[str, Any]]) -> Verdict:
        return verify_trajectory(task.reference, task.tools, messages)

    def environment(self, task: Task) -> BankEnv:
        return BankEnv(task.reference["env"], task.tools)

    def from_record(self, record: dict[str, Any], index: int = 0) -> Task:
        return task_from_record(record, index)

    def load_records(self, path: str, split: str = "eval") -> Iterator[Task]:
        return load_split(path, split, self.from_record)


DOMAIN = AgentsDomain()

"""The code domain: write a Python function; hidden unit tests judge it in the sandbox.

The answer is the last fenced ```python block of the assistant's ``content`` (a bare
completion is accepted for HumanEval-style records, where it may continue the prompt).
Real records: HumanEval (``task_id``, ``prompt``, ``test``, ``entry_point``, optional
``canonical_solution``) and MBPP (``text``, ``test_list``, ``test_setup_code``, optional
``code``). The verifier depends only on ``task.reference``:
``{"entry_point", "tests", "setup", "prelude", "prefix"}``.
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Iterator, Sequence
from typing import Any

from distill.errors import UserError
from distill.messages import Verdict
from teachers import code_tasks
from teachers.base import Task, task_id
from teachers.common import generate_tasks, last_assistant_content, load_split, split_key
from teachers.sandbox import Limits, Program, RunResult, run, run_batch

VERIFIER_NAME = "code-sandbox-tests"
VERIFIER_VERSION = "1"
LIMITS = Limits(timeout_s=3.0, cpu_s=3.0)

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def code_blocks(content: str | None) -> list[str]:
    """The fenced ```python (or untagged) blocks, in order. An unclosed last fence (a
    truncated answer) still counts, up to the end."""
    if not content:
        return []
    found = _FENCE.findall(content)
    return [body for lang, body in found if lang.lower() in ("python", "py", "python3", "")]


def extract_code(content: str | None, entry_point: str | None = None) -> str | None:
    """The last code block that defines ``entry_point`` (a usage example may follow
    the solution), else the last code block; None when there is none."""
    blocks = code_blocks(content)
    if entry_point:
        defining = [b for b in blocks if _defines(b, entry_point)]
        blocks = defining or blocks
    return blocks[-1] if blocks else None


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def program_for(reference: dict[str, Any], content: str | None) -> Program | str:
    """The sandbox program for an answer, or why there is none (no code, syntax)."""
    tests = reference.get("tests") if isinstance(reference, dict) else None
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        return "malformed reference: 'tests' must be a list of strings"
    entry, prefix = reference.get("entry_point"), reference.get("prefix")
    if not isinstance(entry, str) or not entry.isidentifier():
        return "malformed reference: 'entry_point' must be a function name"
    code = extract_code(content, entry)
    if code is None and prefix is not None and content and content.strip():
        code = content  # a HumanEval completion written without a fence
    if code is None:
        return "no ```python code block in the answer"
    if prefix is not None and not _defines(code, entry):
        code = prefix + code  # the completion continues the prompt
    elif prefix is not None:
        code = prefix + "\n" + code  # a full function; the prompt keeps its imports
    try:
        compile(code, "<answer>", "exec", dont_inherit=True)  # compiles, never runs
    except SyntaxError as e:
        return f"syntax error at line {e.lineno}: {e.msg}"
    except (ValueError, RecursionError, MemoryError):
        return "the code cannot be parsed"
    return Program(
        code=code,
        tests=tests,
        setup=reference.get("setup") or "",
        prelude=reference.get("prelude") or "",
        entry_point=entry,
    )


def verdict_of(result: RunResult) -> Verdict:
    """A sandbox result as a verdict; the score is the share of tests passed."""
    if result.ok:
        return Verdict.ok(result.reason)
    score = result.passed / result.total if result.total else 0.0
    return Verdict.fail(result.reason, score=score)


def verify_code(
    reference: dict[str, Any], messages: list[dict[str, Any]], limits: Limits = LIMITS
) -> Verdict:
    """code-sandbox-tests v1: the last assistant turn's code passes every hidden test."""
    program = program_for(reference, last_assistant_content(messages))
    if isinstance(program, str):
        return Verdict.fail(program)
    return verdict_of(run(program, limits))


def verify_batch(
    tasks: Sequence[Task],
    conversations: Sequence[list[dict[str, Any]]],
    workers: int | None = None,
    limits: Limits = LIMITS,
    progress: bool = False,
) -> list[Verdict]:
    """:func:`verify_code` for many answers, through the sandbox pool."""
    verdicts: list[Verdict | None] = [None] * len(tasks)
    programs, where = [], []
    for i, (task, messages) in enumerate(zip(tasks, conversations, strict=True)):
        program = program_for(task.reference, last_assistant_content(messages))
        if isinstance(program, str):
            verdicts[i] = Verdict.fail(program)
        else:
            programs.append(program)
            where.append(i)
    for i, result in zip(where, run_batch(programs, workers, limits, progress), strict=True):
        verdicts[i] = verdict_of(result)
    return [v for v in verdicts if v is not None]


def fenced(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


# One HumanEval and one MBPP record, with a right answer (``distill verify`` input); the
# contract test (tests/test_domains.py) loads and verifies them.
RECORD_EXAMPLES = [
    {
        "task_id": "Example/0",
        "prompt": 'def double_all(xs: list) -> list:\n    """Every element of xs doubled."""\n',
        "canonical_solution": "    return [2 * x for x in xs]\n",
        "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n",
        "entry_point": "double_all",
        "completion": "    return [x + x for x in xs]\n",
    },
    {
        "task_id": 2,
        "text": "Write a function to find the shared elements of two lists.",
        "code": "def shared(a, b):\n    return set(a) & set(b)\n",
        "test_list": ["assert shared([1, 2], [2, 3]) == {2}", "assert shared([], [1]) == set()"],
        "test_setup_code": "",
        "completion": "```python\ndef shared(a, b):\n    return {x for x in a if x in b}\n```",
    },
]


class CodeDomain:
    name = "code"
    verifier_name = VERIFIER_NAME
    verifier_version = VERIFIER_VERSION
    record_examples = RECORD_EXAMPLES

    def tasks(self, split: str, n: int, seed: int, difficulty: int = 1) -> Iterator[Task]:
        return generate_tasks(self.name, code_tasks.make, split, n, seed, difficulty)

    def oracle(self, task: Task, check: bool = False) -> list[dict[str, Any]]:
        solution = task.meta.get("solution")
        if not solution:
            raise UserError(f"{task.id}: the record has no reference solution for an oracle")
        plan = task.meta.get("plan") or f"Write `{task.reference['entry_point']}` as asked."
        if check:  # a draft of the code in the reasoning, then the plan checked against it:
            # reasoning models' commonest redundancy on code (the answer written twice). The
            # plan alone restated was ~24 tokens on ~53: removing every check could save at
            # most 21%. A copy, not a computation: a test run in the head is one a tiny
            # teacher fails at (the demo's code teacher fell from 75% to 32% with one)
            plan += f"\nDraft:\n{solution}\nCheck: {plan} The draft does that."
        answer = {"role": "assistant", "reasoning_content": plan, "content": fenced(solution)}
        return [*task.messages, answer]

    def verify(self, task: Task, messages: list[dict[str, Any]]) -> Verdict:
        return verify_code(task.reference, messages)

    def environment(self, task: Task) -> None:
        return None

    def from_record(self, record: dict[str, Any], index: int = 0) -> Task:
        """A HumanEval record (``prompt``, ``test``, ``entry_point``) or an MBPP record
        (``text``, ``test_list``, optional ``test_setup_code``)."""
        if "prompt" in record and "entry_point" in record:
            return _humaneval(record, index)
        if "text" in record and "test_list" in record:
            return _mbpp(record, index)
        raise UserError(
            "code record needs HumanEval fields ('prompt', 'test', 'entry_point') "
            "or MBPP fields ('text', 'test_list')"
        )

    def load_records(self, path: str, split: str = "eval") -> Iterator[Task]:
        return load_split(path, split, self.from_record)


def _str_field(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"code record field {key!r} must be a non-empty string")
    return value


def _task(identity: str, prompt: str, reference: dict, index: int, solution: str | None) -> Task:
    return Task(
        id=task_id("code", identity),
        domain="code",
        messages=[{"role": "user", "content": prompt}],
        reference=reference,
        meta={"source": "record", "index": index, "solution": solution, **split_key(identity)},
    )


def _humaneval(record: dict[str, Any], index: int) -> Task:
    prompt, test = _str_field(record, "prompt"), _str_field(record, "test")
    entry = _str_field(record, "entry_point").strip()
    reference = {
        "entry_point": entry,
        "tests": [f"{test}\ncheck({entry})\n"],
        "setup": "",
        "prelude": prompt,  # helpers the tests call (e.g. HumanEval/32's poly)
        "prefix": prompt,
    }
    canonical = record.get("canonical_solution")
    solution = prompt + canonical if isinstance(canonical, str) and canonical.strip() else None
    text = f"Complete this Python function.\n```python\n{prompt.rstrip()}\n```"
    identity = f"humaneval:{record.get('task_id') or ''}:{prompt}"
    return _task(identity, text, reference, index, solution)


def _mbpp(record: dict[str, Any], index: int) -> Task:
    text = _str_field(record, "text")
    tests = record.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise UserError("code record field 'test_list' must be a non-empty list of strings")
    entry = _called_function(tests)
    setup = record.get("test_setup_code") or ""
    reference = {
        "entry_point": entry,
        "tests": tests,
        "setup": setup,
        "prelude": "",
        "prefix": None,
    }
    prompt = f"{text.strip()}\nYour code should pass this test:\n{tests[0].strip()}"
    code = record.get("code") if isinstance(record.get("code"), str) else None
    return _task(f"mbpp:{text}:{tests[0]}", prompt, reference, index, code)


def _called_function(tests: list[str]) -> str:
    """The first non-builtin function an MBPP test calls: the one to write."""
    for test in tests:
        try:
            tree = ast.parse(test)
        except SyntaxError:
            raise UserError(f"code record has a test that is not Python: {test[:60]!r}") from None
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if not hasattr(builtins, node.func.id):
                    return node.func.id
    raise UserError("code record's 'test_list' calls no function to write")


DOMAIN = CodeDomain()

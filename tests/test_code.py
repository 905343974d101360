"""The code domain: deterministic tasks, oracle traces that pass, corrupted and
cheating answers that fail, HumanEval and MBPP records."""

from __future__ import annotations

import json
import re

import pytest

from distill.errors import UserError
from teachers.base import split_of
from teachers.code import DOMAIN, extract_code, program_for, verify_batch
from teachers.code_tasks import LEVELS

# A HumanEval-style problem whose test calls a helper of the prompt (like HumanEval/32).
HUMANEVAL = {
    "task_id": "Demo/0",
    "prompt": (
        "def scale(xs: list, k: int) -> list:\n"
        "    return [x * k for x in xs]\n\n\n"
        "def double_all(xs: list) -> list:\n"
        '    """Return every element of xs doubled.\n'
        "    >>> double_all([1, 2])\n"
        "    [2, 4]\n"
        '    """\n'
    ),
    "canonical_solution": "    return scale(xs, 2)\n",
    "test": (
        "def check(candidate):\n"
        "    assert candidate([1, 2]) == [2, 4]\n"
        "    assert candidate([]) == []\n"
        "    assert candidate([-3]) == scale([-3], 2)\n"
    ),
    "entry_point": "double_all",
}
MBPP = {
    "task_id": 11,
    "text": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
    "test_list": [
        "assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
        "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == set((3, 4))",
        "assert set(similar_elements((11, 12, 14, 13), (17, 15, 14, 13))) == set((13, 14))",
    ],
    "test_setup_code": "import math",
}


def _answer(task, content, reasoning=None):
    return [
        *task.messages,
        {"role": "assistant", "content": content, "reasoning_content": reasoning},
    ]


def _corrupt(code: str) -> str:
    """Change the template's constant: the first number +1, else the first quoted letter."""
    body = code.split(":", 1)[1]
    m = re.search(r"(?<![\w.])(\d+)", body)
    if m:
        start = len(code) - len(body) + m.start(1)
        return code[:start] + str(int(m.group(1)) + 1) + code[start + len(m.group(1)) :]
    m = re.search(r"'(\w)", code)
    letter = "z" if m.group(1) != "z" else "y"
    return code[: m.start(1)] + letter + code[m.end(1) :]


# (the contract every domain meets, oracle traces that pass included: test_domains.py)


def test_thousands_of_distinct_tasks_split_by_prompt():
    train = list(DOMAIN.tasks("train", 3000, seed=0))
    evals = list(DOMAIN.tasks("eval", 500, seed=0))
    assert len({t.id for t in train}) == 3000
    assert all(split_of(t.messages[-1]["content"]) == "eval" for t in evals)
    assert len({t.meta["kind"] for t in train}) == len(LEVELS[1])  # every level-1 template


def test_difficulty_one_is_short_and_regular():
    for task in DOMAIN.tasks("train", 200, seed=1, difficulty=1):
        answer = DOMAIN.oracle(task)[-1]
        assert len(task.messages[-1]["content"]) < 110
        assert len(answer["reasoning_content"]) < 70
        assert answer["content"].count("\n") == 3  # fence, def, one line, fence
        assert json.loads(json.dumps(task.reference)) == task.reference


def test_oracle_passes_and_corrupted_code_fails():
    tasks = [t for d in (1, 2, 3) for t in DOMAIN.tasks("train", 70, seed=11, difficulty=d)]
    oracle = [DOMAIN.oracle(t) for t in tasks]
    corrupted = [
        _answer(t, f"```python\n{_corrupt(t.meta['solution'])}```", o[-1]["reasoning_content"])
        for t, o in zip(tasks, oracle, strict=True)
    ]
    verdicts = verify_batch(tasks * 2, oracle + corrupted, workers=4)
    good, bad = verdicts[: len(tasks)], verdicts[len(tasks) :]
    assert [v.reason for v in good if not v.passed] == []
    assert all(v.score == 1.0 for v in good)
    survivors = [t.meta["solution"] for t, v in zip(tasks, bad, strict=True) if v.passed]
    assert survivors == []


def test_answer_format_failures():
    (task,) = DOMAIN.tasks("train", 1, seed=2)
    name = task.reference["entry_point"]
    assert (
        DOMAIN.verify(task, _answer(task, "I am not sure.")).reason
        == "no ```python code block in the answer"
    )
    v = DOMAIN.verify(task, _answer(task, "```python\ndef broken(:\n```"))
    assert v.reason.startswith("syntax error at line 1")
    v = DOMAIN.verify(task, _answer(task, "```python\ndef other(x):\n    return x\n```"))
    assert v.reason == f"no function named {name!r}"
    assert not DOMAIN.verify(task, task.messages).passed  # no assistant turn at all


def test_cheating_answers_fail():
    (task,) = DOMAIN.tasks("train", 1, seed=8)
    name, arg = task.reference["entry_point"], task.meta["solution"].split("(")[1].split(")")[0]
    cheats = [
        f"import sys\nsys.exit(0)\ndef {name}({arg}):\n    pass",
        f"import os\ndef {name}({arg}):\n    os._exit(0)",
        f"def {name}({arg}):\n    raise SystemExit(0)",
        f"class Eq(list):\n    def __eq__(self, o):\n        return True\ndef {name}({arg}):\n    return Eq()",
        f"import builtins\nbuiltins.AssertionError = KeyError\ndef check(c):\n    pass\ndef {name}({arg}):\n    return None",
    ]
    verdicts = verify_batch(
        [task] * len(cheats), [_answer(task, f"```python\n{c}\n```") for c in cheats]
    )
    assert [v.passed for v in verdicts] == [False] * len(cheats)


def test_extract_code():
    assert extract_code("text\n```python\nx = 1\n```\nmore\n```py\ny = 2\n```") == "y = 2\n"
    assert extract_code("```\nz = 3\n```") == "z = 3\n"
    assert extract_code("```python\ntruncated = 1") == "truncated = 1"
    assert extract_code("```json\n{}\n```") is None
    assert extract_code(None) is None
    answer = "```python\ndef f(x):\n    return x\n```\nUsage:\n```python\nprint(f(1))\n```"
    assert extract_code(answer, "f") == "def f(x):\n    return x\n"
    assert extract_code(answer) == "print(f(1))\n"


def test_humaneval_record_completions():
    task = DOMAIN.from_record(HUMANEVAL)
    assert task.reference["entry_point"] == "double_all"
    body = HUMANEVAL["canonical_solution"]
    full = HUMANEVAL["prompt"] + body
    answers = {
        "oracle": DOMAIN.oracle(task),
        "continuation": _answer(task, body),
        "full function": _answer(task, "def double_all(xs):\n    return [2 * x for x in xs]\n"),
        "fenced": _answer(task, f"Here it is:\n```python\n{full}```"),
        "wrong": _answer(task, "    return xs\n"),
        "bad indent": _answer(task, "return xs\n"),
        "exit early": _answer(task, "    import sys\n    sys.exit(0)\n"),
        "patched check": _answer(task, "    return xs\n\ndef check(candidate):\n    pass\n"),
    }
    verdicts = {k: DOMAIN.verify(task, v) for k, v in answers.items()}
    assert {k for k, v in verdicts.items() if v.passed} == {
        "oracle",
        "continuation",
        "full function",
        "fenced",
    }
    assert verdicts["bad indent"].reason.startswith("syntax error")


def test_mbpp_record():
    task = DOMAIN.from_record(MBPP)
    assert task.reference["entry_point"] == "similar_elements"
    assert MBPP["test_list"][0] in task.messages[-1]["content"]
    assert DOMAIN.verify(task, DOMAIN.oracle(task)).passed
    half = "def similar_elements(a, b):\n    return (4, 5)\n"
    v = DOMAIN.verify(task, _answer(task, f"```python\n{half}```"))
    assert not v.passed and v.score == pytest.approx(1 / 3)


def test_bad_records_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="HumanEval fields"):
        DOMAIN.from_record({"question": "x"})
    with pytest.raises(UserError, match="'test'"):
        DOMAIN.from_record({**HUMANEVAL, "test": ""})
    with pytest.raises(UserError, match="test_list"):
        DOMAIN.from_record({"text": "x", "test_list": "assert f(1) == 1"})
    with pytest.raises(UserError, match="calls no function"):
        DOMAIN.from_record({"text": "x", "test_list": ["assert len([1]) == 1"]})
    path = tmp_path / "he.jsonl"
    path.write_text(json.dumps(HUMANEVAL) + "\n" + json.dumps(MBPP) + "\n")
    assert len(list(DOMAIN.load_records(str(path), split="all"))) == 2
    (tmp_path / "bad.jsonl").write_text(json.dumps({"nope": 1}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:1"):
        list(DOMAIN.load_records(str(tmp_path / "bad.jsonl"), split="all"))


def test_program_for_keeps_prompt_imports():
    record = {**HUMANEVAL, "prompt": "import math\n\n" + HUMANEVAL["prompt"]}
    task = DOMAIN.from_record(record)
    program = program_for(
        task.reference, "def double_all(xs):\n    return [int(math.pow(2, 1)) * x for x in xs]\n"
    )
    assert program.code.startswith("import math")
    assert DOMAIN.verify(task, _answer(task, program.code)).passed


@pytest.mark.slow
def test_oracle_passes_for_thousands_of_tasks():
    tasks = [t for d in (1, 2, 3, 4) for t in DOMAIN.tasks("train", 750, seed=99, difficulty=d)]
    verdicts = verify_batch(tasks, [DOMAIN.oracle(t) for t in tasks])
    assert [v.reason for v in verdicts if not v.passed] == []


def test_malformed_reference_fails_cleanly():
    (task,) = DOMAIN.tasks("train", 1, seed=2)
    answer = DOMAIN.oracle(task)
    bad = [
        {**task.reference, "tests": "assert True"},
        {**task.reference, "entry_point": "1x"},
        None,
    ]
    for reference in bad:
        assert program_for(reference, answer[-1]["content"]).startswith("malformed reference")

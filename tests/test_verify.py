"""Parallel verification (verify_many) and the `distill verify` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from distill.cli import app
from distill.messages import Verdict
from distill.verify import verify_many
from teachers.base import Task, get_domain

MATH, LOGIC = get_domain("math"), get_domain("logic")


class _Hostile:
    """A domain whose verifier raises or kills its process on request (reached by
    workers as ``test_verify:HOSTILE``)."""

    def verify(self, task: Task, messages: list[dict]) -> Verdict:
        if task.reference == "die":
            os._exit(3)
        if task.reference == "raise":
            raise RuntimeError("boom")
        return Verdict.ok()


HOSTILE = _Hostile()


def _items(n: int) -> list[tuple[Task, list[dict]]]:
    """Oracle traces, every third one with a wrong answer."""
    out = []
    for i, task in enumerate(MATH.tasks("train", n, seed=1, difficulty=2)):
        trace = MATH.oracle(task)
        if i % 3 == 0:
            trace = [*task.messages, {"role": "assistant", "content": "\\boxed{-1}"}]
        out.append((task, trace))
    return out


def test_parallel_matches_in_process_and_keeps_order():
    items = _items(60)
    serial = verify_many("math", items, workers=1)
    assert [v.passed for v in serial] == [i % 3 != 0 for i in range(60)]
    assert verify_many("math", items, workers=2) == serial


def test_verifier_errors_become_failed_verdicts():
    task = next(MATH.tasks("train", 1, seed=0))
    broken = Task(id="x", domain="math", messages=task.messages, reference={})
    items = [(task, MATH.oracle(task)), (broken, MATH.oracle(task)), (task, MATH.oracle(task))]
    for workers in (1, 2):
        verdicts = verify_many("math", items, workers=workers)
        assert [v.passed for v in verdicts] == [True, False, True]
        assert verdicts[1].reason.startswith("verifier error: KeyError")


def test_a_dying_worker_fails_only_its_item():
    refs = ["ok", "raise", "ok", "die", "ok", "ok", "ok", "ok"]
    items = [
        (Task(id=str(i), domain="t", messages=[], reference=r), []) for i, r in enumerate(refs)
    ]
    verdicts = verify_many("test_verify:HOSTILE", items, workers=2)
    assert [v.passed for v in verdicts] == [r == "ok" for r in refs]
    assert verdicts[1].reason == "verifier error: RuntimeError: boom"
    assert verdicts[3].reason == "verifier error: the verifier process died"


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_math_end_to_end(tmp_path):
    records = [
        {
            "question": "3 boxes of 12 eggs, 5 eaten?",
            "answer": "36-5=31\n#### 31",
            "completion": "#### 31",
        },
        {
            "id": "m2",
            "problem": "1/2+1/4?",
            "solution": "$\\boxed{\\frac34}$",
            "completion": "It is 0.75.",
        },
        {"problem": "2x=8?", "answer": "4", "completion": "\\boxed{x = 5}"},
        {
            "problem": "2x=8?",
            "answer": "4",
            "messages": [{"role": "assistant", "content": "Answer: 4"}],
        },
    ]
    src, out = _write(tmp_path / "in.jsonl", records), tmp_path / "verdicts.jsonl"
    result = CliRunner().invoke(
        app, ["verify", "math", str(src), "--out", str(out), "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and result.stderr.strip().splitlines()[-1] == "3 passed, 1 failed"
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert [v["passed"] for v in verdicts] == [True, True, False, True]
    assert verdicts[1]["id"] == "m2"
    assert verdicts[2]["reason"] == "wrong answer: got x = 5, expected 4"
    assert set(verdicts[0]) == {"id", "passed", "score", "reason"}


def test_cli_logic_to_stdout(tmp_path):
    task = next(
        t for t in LOGIC.tasks("eval", 20, seed=0, difficulty=3) if t.reference["kind"] == "sat"
    )
    records = [
        {
            "question": task.messages[-1]["content"],
            "reference": task.reference,
            "completion": f"Answer: {task.meta['answer']}",
        },
        {"question": "T and F?", "answer": "F", "completion": "Answer: T"},
    ]
    result = CliRunner().invoke(
        app, ["verify", "logic", str(_write(tmp_path / "l.jsonl", records)), "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()  # JSONL only: a program reads it as is
    assert [json.loads(x)["passed"] for x in lines] == [True, False]
    assert result.stderr.strip() == "1 passed, 1 failed"


def test_cli_bad_record_names_the_line(tmp_path):
    good = {"question": "q", "answer": "#### 1", "completion": "1"}
    src = _write(tmp_path / "bad.jsonl", [good, {"question": "q", "answer": "#### 1"}])
    run = subprocess.run(
        [sys.executable, "-m", "distill", "verify", "math", str(src)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {src}:2: needs a 'completion' string or a 'messages' list"
    assert "Traceback" not in run.stderr

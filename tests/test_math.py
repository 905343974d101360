"""The math domain: generated tasks, oracle traces, the math-equiv verifier, records."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from math_verify import parse, verify

from distill.errors import UserError
from teachers.base import get_domain, split_of
from teachers.math import answers_match, extract_answer, verify_answer

MATH = get_domain("math")


def reply(content: str) -> list[dict]:
    return [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]


def corrupt(answer: str) -> str:
    """The answer with its last integer increased by one."""
    m = list(re.finditer(r"\d+", answer))[-1]
    return answer[: m.start()] + str(int(m.group()) + 1) + answer[m.end() :]


# (the contract every domain meets, oracle traces that pass included: test_domains.py)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_an_answer_off_by_one_fails(difficulty):
    for task in MATH.tasks("eval", 40, seed=difficulty, difficulty=difficulty):
        wrong = corrupt(task.reference["answer"])
        verdict = MATH.verify(task, reply(f"\\boxed{{{wrong}}}"))
        assert not verdict.passed and verdict.reason.startswith("wrong answer: got ")


def test_verdict_reasons():
    ref = {"answer": "14"}
    assert (
        verify_answer(ref, reply("so it is \\boxed{12}")).reason
        == "wrong answer: got 12, expected 14"
    )
    assert verify_answer(ref, reply("I do not know")).reason == "no final answer"
    assert verify_answer(ref, [{"role": "user", "content": "q"}]).reason == "no assistant answer"
    assert not verify_answer(ref, reply("\\boxed{" + "1" * 400 + "}")).passed


@pytest.mark.parametrize(
    "content, expected",
    [
        ("work... \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("Answer: 579", "579"),
        ("The final answer is 42.", "42"),
        ("3+4=7\n#### 1,000", "1,000"),
        ("we get 3 apples and then 12 apples", "12"),
        ("nothing here", None),
        ("Answer: 18 dollars", "18"),
        ("#### $1,000", "1,000"),
        ("Answer: 5 cm.", "5"),
        ("Answer: 12 or 14", "12 or 14"),  # a hedge stays a hedge, and fails
        ("Answer: 3 x", "3 x"),
    ],
)
def test_extract_answer(content, expected):
    assert extract_answer(content) == expected


# (gold, prediction): equal by any sensible judgement, and by math-verify's own.
EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("1000", "1,000"),
    ("1234567", "1,234,567"),
    ("3", "x = 3"),
    ("x = -6", "-6"),
    ("\\frac{3}{4}", "3/4"),
    ("-\\frac{7}{12}", "-7/12"),
    ("43.2", "\\frac{216}{5}"),
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("[1, 2)", "[1, 2)"),
    ("(-\\infty, 3]", "(-\\infty, 3]"),
    ("6x^2 + 5x - 6", "(2x+3)(3x-2)"),
    ("x^2-1", "(x-1)(x+1)"),
    ("x = 3, y = -2", "(3, -2)"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("2\\pi", "\\pi \\cdot 2"),
]
DIFFERENT = [
    ("12", "14"),
    ("\\frac{1}{2}", "0.6"),
    ("\\frac{3}{4}", "\\frac{4}{3}"),
    ("1000", "100"),
    ("1,000", "1.000"),
    ("(1, 2]", "[1, 2]"),
    ("[1, 2)", "(1, 2)"),
    ("\\{1, 2\\}", "\\{1, 3\\}"),
    ("6x^2 + 5x - 6", "6x^2 - 5x - 6"),
    ("x = 3", "x = -3"),
    ("x = 3, y = -2", "x = -2, y = 3"),
    ("\\sqrt{2}", "1.4"),
]


@pytest.mark.parametrize("form", ["\\boxed{{{}}}", "Answer: {}", "So it is ${}$.\n#### {}"])
def test_agrees_with_math_verify(form):
    for label, table in ((True, EQUIVALENT), (False, DIFFERENT)):
        for gold, pred in table:
            theirs = verify(parse(f"${gold}$"), parse(f"${pred}$"))
            ours = verify_answer({"answer": gold}, reply(form.format(pred, pred))).passed
            assert theirs == label, (gold, pred)
            assert ours == theirs, (gold, pred, form)


@pytest.mark.parametrize(
    "gold, content",
    [
        ("14", "\\boxed{12, 14}"),
        ("14", "Answer: 12 or 14"),
        ("14", "\\boxed{14 \\pm 1}"),
        ("14", "\\boxed{x}"),
        ("x = 3", "\\boxed{y = 3}"),
        ("x = 3, y = -2", "\\boxed{x = 3}"),
    ],
)
def test_hedged_or_partial_answers_fail(gold, content):
    assert not verify_answer({"answer": gold}, reply(content)).passed


def test_solution_pairs_are_ordered():
    # math-verify accepts the swapped pair (read as an interval); the verifier must not
    assert answers_match("x = 3, y = -2", "(3, -2)")
    assert answers_match("x = 3, y = -2", "y = -2, x = 3")
    assert not answers_match("x = 3, y = -2", "(-2, 3)")
    assert not answers_match("x = 3, y = -2", "y = 3, x = -2")


def test_explosive_answers_fail_fast_even_in_a_thread():
    # no SIGALRM timeout protects a thread: such answers must never reach sympy
    content = "\\boxed{10^{10^{10}}} or \\boxed{2^{99999}}"
    with ThreadPoolExecutor(1) as pool:
        verdict = pool.submit(verify_answer, {"answer": "14"}, reply(content)).result(timeout=20)
    assert verdict.reason == "wrong answer: got 2^{99999}, expected 14"


def test_fallback_when_math_verify_cannot_parse():
    assert answers_match("\\text{blue}", "blue")
    assert not answers_match("\\text{blue}", "red")


def test_math_verify_outside_the_main_thread():
    # math-verify's SIGALRM timeouts raise in threads; the verifier must still judge
    with ThreadPoolExecutor(2) as pool:
        got = list(
            pool.map(lambda p: answers_match(*p), [("\\frac{1}{2}", "0.5"), ("x^2-1", "x^2+1")])
        )
    assert got == [True, False]
    assert threading.current_thread() is threading.main_thread()


def test_more_tasks_extend_the_list():
    a = [t.id for t in MATH.tasks("train", 50, seed=7, difficulty=3)]
    assert a == [t.id for t in MATH.tasks("train", 80, seed=7, difficulty=3)][:50]


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_thousands_of_distinct_tasks(difficulty):
    train = list(MATH.tasks("train", 2000, seed=0, difficulty=difficulty))
    assert len({t.id for t in train}) == len({t.messages[-1]["content"] for t in train}) == 2000


def test_difficulty_one_is_short_and_regular():
    for task in MATH.tasks("train", 200, seed=3, difficulty=1):
        trace = MATH.oracle(task)
        a, b = map(int, re.findall(r"\d+", task.messages[-1]["content"]))
        lines = trace[-1]["reasoning_content"].split("\n")
        assert lines[0] == f"{a:03d} + {b:03d}"
        assert all(re.fullmatch(r"\d\+\d\+[01]=\d\d", x) for x in lines[1:]) and len(lines) == 4
        # the answer is the last carry and the second digit of each column, in reverse
        digits = lines[3][-2] + lines[3][-1] + lines[2][-1] + lines[1][-1]
        assert int(digits) == a + b
        assert trace[-1]["content"] == f"\\boxed{{{a + b}}}"


GSM8K = {
    "question": "Tom has 3 boxes of 12 eggs and eats 5. How many eggs are left?",
    "answer": "3*12=<<3*12=36>>36 eggs\n36-5=<<36-5=31>>31\n#### 31",
}
MATH_RECORDS = [
    {"problem": "Compute $\\frac12+\\frac14$.", "solution": "Sum: $\\boxed{\\frac{3}{4}}$."},
    {"problem": "Solve $2x=8$.", "answer": "4"},
]


def test_gsm8k_and_math_records(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [GSM8K, *MATH_RECORDS]) + "\n")
    tasks = list(MATH.load_records(str(path), split="all"))
    assert [t.reference["answer"] for t in tasks] == ["31", "\\frac{3}{4}", "4"]
    assert "<<" not in tasks[0].meta["solution"]
    for task in tasks:
        assert MATH.verify(task, MATH.oracle(task)).passed
    assert MATH.verify(
        tasks[0], [*tasks[0].messages, {"role": "assistant", "content": "#### 31"}]
    ).passed
    assert MATH.verify(
        tasks[1], [*tasks[1].messages, {"role": "assistant", "content": "It is 0.75"}]
    ).passed
    # train and eval of one file split it by the hash of each problem
    train = list(MATH.load_records(str(path), split="train"))
    assert all(split_of("record:" + t.messages[0]["content"]) == "train" for t in train)


def test_parquet_records_and_bad_records(tmp_path):
    pq.write_table(pa.Table.from_pylist([GSM8K]), tmp_path / "gsm8k.parquet")
    [task] = MATH.load_records(str(tmp_path / "gsm8k.parquet"), split="all")
    assert task.reference == {"answer": "31"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GSM8K) + "\n" + json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: .*answer"):
        list(MATH.load_records(str(bad), split="all"))
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: invalid JSON"):
        list(MATH.load_records(str(bad), split="all"))

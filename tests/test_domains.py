"""The domain contract (teachers/base.py), checked on every registered domain: the
protocol, deterministic tasks, disjoint splits, oracle traces their verifier passes (also
rebuilt from a shard row, as the filter sees them), wrong answers it fails, and real
records that load and verify. A domain gets these checks from its registry line alone;
``DISTILL_DOMAINS=name=pkg.module:DOMAIN pytest tests/test_domains.py`` checks one kept
outside the repository. Last, a toy domain registered from a module on ``sys.path``
meets the contract, reaches spawned workers and runs the micro pipeline."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.messages import Trace, Verdict
from teachers.base import ENV, REGISTRY, Domain, Task, get_domain, register, task_from_trace
from teachers.common import last_assistant_content

DOMAINS = list(REGISTRY)
NO_ANSWER = "I am not sure."


def final_content(messages: list[dict], content: str | None) -> list[dict]:
    """``messages`` with the content of the last assistant turn replaced."""
    out = copy.deepcopy(messages)
    last = max(i for i, m in enumerate(out) if m.get("role") == "assistant")
    out[last]["content"] = content
    return out


def prompt_and_reference(task: Task) -> str:
    """Everything the model is told (the prompt and the later user turns) and what its
    answer is judged against: an eval task copied into train matches on both."""
    told = [[m.get("content") for m in task.messages], task.followups, task.tools]
    return json.dumps([told, task.reference], sort_keys=True)


def sample(dom: Domain, n: int = 8, difficulties=(1, 2, 3)) -> list[Task]:
    return [t for d in difficulties for t in dom.tasks("train", n, 17, d)]


# --- the checks (functions, so the toy domain below runs them too) -------------------


def check_protocol(name: str) -> None:
    dom = get_domain(name)
    assert isinstance(dom, Domain) and get_domain(name) is dom
    assert dom.name == name
    assert dom.verifier_name and isinstance(dom.verifier_name, str)
    assert dom.verifier_version and isinstance(dom.verifier_version, str)
    for task in dom.tasks("eval", 5, 0, 1):
        assert isinstance(task, Task) and task.domain == name
        assert task.messages and task.messages[-1]["role"] == "user"
        assert json.loads(json.dumps(task.reference)) == task.reference  # stored as JSON
        env = dom.environment(task)
        assert env is None or isinstance(env.execute("no_such_tool", "{}"), str)


def check_deterministic(name: str) -> None:
    dom = get_domain(name)
    for difficulty in (1, 3):
        a, b = (list(dom.tasks("train", 30, 5, difficulty)) for _ in range(2))
        assert [(t.id, t.messages, t.reference, t.tools, t.followups) for t in a] == [
            (t.id, t.messages, t.reference, t.tools, t.followups) for t in b
        ]
        assert len({t.id for t in a}) == len(a) == 30
        assert [dom.oracle(t) for t in a] == [dom.oracle(t) for t in b]
        assert [t.id for t in dom.tasks("train", 30, 6, difficulty)] != [t.id for t in a]


def check_splits_disjoint(name: str) -> None:
    """Disjoint ids, and no eval task again in train. The same words may ask over
    another hidden state (the agents' banks): decontamination, too, needs the same
    reference for a prompt match in the task's own domain (docs/filter.md)."""
    dom = get_domain(name)
    for difficulty in (1, 3):
        train = list(dom.tasks("train", 300, 0, difficulty))
        evals = list(dom.tasks("eval", 100, 1, difficulty))
        assert not {t.id for t in train} & {t.id for t in evals}
        assert not {prompt_and_reference(t) for t in train} & {
            prompt_and_reference(t) for t in evals
        }
        assert {t.meta.get("split", "eval") for t in evals} == {"eval"}


def check_oracle(name: str, seed: int, difficulty: int, split: str) -> None:
    dom = get_domain(name)
    for task in dom.tasks(split, 3, seed, difficulty):
        trace = dom.oracle(task)
        assert trace[: len(task.messages)] == task.messages
        answers = [m for m in trace[len(task.messages) :] if m["role"] == "assistant"]
        assert answers and any(m.get("reasoning_content") for m in answers)
        verdict = dom.verify(task, trace)
        assert isinstance(verdict, Verdict)
        assert verdict.passed and verdict.score == 1.0, verdict.reason
        # the filter verifies shard rows: the task rebuilt from its row must do
        row = Trace(
            id="t",
            task_id=task.id,
            domain=name,
            messages=trace,
            tools=task.tools,
            reference=task.reference,
        ).to_row()
        rebuilt = task_from_trace(Trace.from_row(json.loads(json.dumps(row))))
        assert dom.verify(rebuilt, trace).passed


def check_wrong_answers_fail(name: str) -> None:
    """No answer always fails; another task's answer fails nearly always (puzzles with
    several solutions may accept one, as a SAT assignment satisfying both formulas)."""
    dom = get_domain(name)
    tasks = sample(dom)
    oracles = [dom.oracle(t) for t in tasks]
    for task, trace in zip(tasks, oracles, strict=True):
        verdict = dom.verify(task, final_content(trace, NO_ANSWER))
        assert not verdict.passed and verdict.reason
    finals = [last_assistant_content(m) for m in oracles]
    swapped = [
        dom.verify(task, final_content(trace, finals[(i + 1) % len(tasks)])).passed
        for i, (task, trace) in enumerate(zip(tasks, oracles, strict=True))
        if finals[(i + 1) % len(tasks)] != finals[i]
    ]
    assert len(swapped) >= len(tasks) // 2 and sum(swapped) <= len(swapped) // 10


def check_records(name: str, tmp_path) -> None:
    """Real records (the domain's ``record_examples``, each with a right answer) load
    from JSONL as ``from_record`` reads them, split in two disjoint halves, and verify;
    with the answer taken away they fail."""
    from distill.verify import read_items

    dom = get_domain(name)
    examples = getattr(dom, "record_examples", None)
    if not examples:
        pytest.skip(f"{name} gives no record_examples")
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in examples))

    def key(t: Task):
        return t.id, t.messages, t.reference, t.tools, t.followups

    direct = [key(dom.from_record(json.loads(json.dumps(r)), i)) for i, r in enumerate(examples)]
    assert [key(t) for t in dom.load_records(str(path), "all")] == direct
    halves = [[t.id for t in dom.load_records(str(path), s)] for s in ("train", "eval")]
    assert sorted(halves[0] + halves[1]) == sorted(k[0] for k in direct)
    assert not set(halves[0]) & set(halves[1])
    for _, task, messages in read_items(name, path):  # as `distill verify` reads them
        assert task.domain == name
        assert dom.verify(task, messages).passed, (task.id, dom.verify(task, messages).reason)
        assert not dom.verify(task, final_content(messages, NO_ANSWER)).passed


# --- every registered domain ------------------------------------------------------------

each = pytest.mark.parametrize("name", DOMAINS)


@each
def test_satisfies_the_protocol(name):
    check_protocol(name)


@each
def test_tasks_are_deterministic(name):
    check_deterministic(name)


@each
def test_train_and_eval_are_disjoint(name):
    check_splits_disjoint(name)


@each
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10**9),
    difficulty=st.integers(1, 5),
    split=st.sampled_from(["train", "eval"]),
)
def test_oracle_passes_its_verifier(name, seed, difficulty, split):
    check_oracle(name, seed, difficulty, split)


@each
def test_wrong_answers_fail(name):
    check_wrong_answers_fail(name)


@each
def test_real_records_load_and_verify(name, tmp_path):
    check_records(name, tmp_path)


# --- a domain added from outside: one module and one register() call ---------------------

# A toy domain, "repeat the word": the example of docs/adding-a-domain.md, word for word.
ECHO = """
from distill.errors import UserError
from distill.messages import Verdict
from teachers.base import Task, task_id
from teachers.common import generate_tasks, load_split, read_answer, split_key


def make(rng, difficulty):
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2 + difficulty))
    return word, f"Repeat the word: {word}", {"answer": word}, {}


class EchoDomain:
    name, verifier_name, verifier_version = "echo", "echo-exact", "1"
    record_examples = [{"word": "kiwi", "completion": "Answer: kiwi"}]

    def tasks(self, split, n, seed, difficulty=1):
        return generate_tasks(self.name, make, split, n, seed, difficulty)

    def oracle(self, task):
        word = task.reference["answer"]
        turn = {"role": "assistant", "reasoning_content": f"Say {word}.", "content": f"Answer: {word}"}
        return [*task.messages, turn]

    def verify(self, task, messages):
        got, expected = read_answer(messages, 40), task.reference["answer"]
        if isinstance(got, Verdict):
            return got
        return Verdict.ok() if got == expected else Verdict.fail(f"wrong answer: {got}")

    def environment(self, task):
        return None

    def from_record(self, record, index=0):
        if not isinstance(record.get("word"), str):
            raise UserError("echo record needs a 'word' field")
        word, identity = record["word"], "record:" + record["word"]
        messages = [{"role": "user", "content": f"Repeat the word: {word}"}]
        meta = {"index": index, **split_key(identity)}
        return Task(task_id(self.name, identity), self.name, messages, {"answer": word}, meta)

    def load_records(self, path, split="eval"):
        return load_split(path, split, self.from_record)


DOMAIN = EchoDomain()
"""


@pytest.fixture
def echo(tmp_path, monkeypatch):
    """The toy domain, written to its own module on sys.path and registered."""
    (tmp_path / "echo_domain.py").write_text(ECHO)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ENV, raising=False)  # restored afterwards, as is REGISTRY below
    saved = dict(REGISTRY)
    yield register("echo", "echo_domain:DOMAIN")  # the one registry line
    REGISTRY.clear()
    REGISTRY.update(saved)
    sys.modules.pop("echo_domain", None)


def test_a_registered_domain_meets_the_contract(echo, tmp_path):
    assert get_domain("echo") is echo and os.environ[ENV] == "echo=echo_domain:DOMAIN"
    for check in (check_protocol, check_deterministic, check_splits_disjoint):
        check("echo")
    for seed in range(10):
        check_oracle("echo", seed, 1 + seed % 5, ("train", "eval")[seed % 2])
    check_wrong_answers_fail("echo")
    check_records("echo", tmp_path)


def test_the_docs_show_this_domain():
    doc = (Path(__file__).parents[1] / "docs" / "adding-a-domain.md").read_text()
    assert doc.split("```python\n")[1].split("```")[0].strip() == ECHO.strip()


def test_register_refuses_what_is_not_a_domain(echo, tmp_path):
    from distill.errors import UserError

    (tmp_path / "not_domain.py").write_text("DOMAIN = object()\nOTHER = 1\n")
    with pytest.raises(UserError, match="not a Domain named 'nope'"):
        register("nope", "not_domain:DOMAIN")
    with pytest.raises(UserError, match="not_domain has no MISSING"):
        register("nope", "not_domain:MISSING")
    with pytest.raises(UserError, match="cannot import no_such_module .*PYTHONPATH"):
        register("nope", "no_such_module:DOMAIN")
    with pytest.raises(UserError, match="not a Domain named 'other'"):
        register("other", "echo_domain:DOMAIN")  # its name is echo
    assert "nope" not in REGISTRY and "other" not in REGISTRY
    sys.modules.pop("not_domain", None)


def test_a_registered_domain_reaches_spawned_workers(echo):
    from distill.launch import spawn

    # a fresh interpreter, as the CPU ranks of generate and train start
    found = spawn(get_domain, "echo", procs=1, what="test")
    assert type(found).__module__ == "echo_domain" and found.name == "echo"


@pytest.mark.integration
def test_micro_pipeline_with_a_registered_domain(echo, tmp_path):
    from test_e2e import dataset_of, micro_recipe, run_stages, write_recipe

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "echo.yaml", micro_recipe(out, domains=["echo"]))
    ran = run_stages(recipe)
    stages = ("teachers", "generate", "filter", "train", "eval")
    assert all(ran[s]["status"] == "ran" for s in stages), ran
    for stage in ("raw", "clean"):
        rows = dataset_of(out / stage / "echo")
        assert len(rows) > 0 and set(rows["domain"]) == {"echo"}
        assert all(m[0]["content"].startswith("Repeat the word: ") for m in rows["messages"])
    report = json.loads((out / "eval" / "report.json").read_text())
    cells = {(s["model"], s["domain"]) for s in report["scores"]}
    assert {("teacher:echo", "echo"), ("student", "echo")} <= cells
    assert {d for _, d in cells} == {"echo"}
    assert set(report["recovery"]) == {"echo"}


def test_trace_from_task_carries_the_task_over_and_fields_replace_it():
    """The shard row every stage builds (generate's rollouts, the teachers' oracle): the
    task's id, domain, tools and reference carried over; a short prompt replaces tools."""
    from teachers.base import shorten_prompt, trace_from_task

    task = next(get_domain("agents").tasks("train", 1, 0))
    messages = get_domain("agents").oracle(task)
    tr = trace_from_task(task, "r0", messages, teacher="t", finish_reason="stop")
    assert (tr.id, tr.task_id, tr.domain, tr.teacher) == ("r0", task.id, "agents", "t")
    assert tr.tools == task.tools and tr.reference == task.reference and tr.messages == messages
    short = trace_from_task(
        task, "r1", **shorten_prompt({"messages": messages, "tools": task.tools})
    )
    assert short.tools is None and short.reference == task.reference
    assert [m["role"] for m in short.messages] == [m["role"] for m in messages][1:]
    rebuilt = task_from_trace(short)  # what verification reads back: no system, no tools
    assert rebuilt.tools is None and rebuilt.messages == [task.messages[1]]

"""Agent rollouts on a tiny real model taught one tool-using conversation by heart."""

import pytest
import torch
from gen_fixtures import AddDomain, add_task, taught_model_dir

from distill.backends import Sampling, make_backend
from distill.messages import rows_table
from distill.rollout import rollout
from teachers.base import Task, get_domain

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def backend():
    d = taught_model_dir()
    b = make_backend(path=d, batch_size=8)
    yield b
    b.close()


def test_multi_turn_tool_episode_with_followup(backend):
    dom = AddDomain()
    (tr,) = rollout(
        backend, dom, [add_task()], n=1, sampling=Sampling(temperature=0, max_new_tokens=48)
    )
    roles = [m["role"] for m in tr.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    call = tr.messages[1]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "add"
    assert tr.messages[2]["tool_call_id"] == call["id"]
    assert tr.messages[2]["content"] == "5"  # computed by the environment, not the model
    assert dom.envs[0].calls == [("add", call["function"]["arguments"])]
    assert tr.messages[-1]["content"] == "10"
    assert tr.finish_reason == "stop" and tr.id == "t0-s0"
    assert tr.completion_tokens > 20 and tr.prompt_tokens > 0
    assert tr.lineage.teacher_model == backend.name and tr.lineage.teacher_revision

    rows_table([tr.to_row()])  # the row fits the Arrow schema


def test_turn_limit_and_token_budget(backend):
    s = Sampling(temperature=0, max_new_tokens=48)
    (tr,) = rollout(backend, AddDomain(), [add_task()], n=1, sampling=s, max_turns=1)
    assert tr.finish_reason == "turn_limit" and [m["role"] for m in tr.messages][-1] == "tool"
    (tr,) = rollout(backend, AddDomain(), [add_task()], n=1, sampling=s, max_episode_tokens=50)
    assert (
        tr.finish_reason == "length"
        and len([m for m in tr.messages if m["role"] == "assistant"]) == 1
    )


def test_batched_episodes_of_different_lengths_and_samples(backend):
    # a task without tools or followups ends after one turn while agent episodes go on
    plain = Task(
        id="p",
        domain="agents",
        messages=[{"role": "user", "content": "the quick fox"}],
        reference=None,
    )
    s = Sampling(temperature=1.0, max_new_tokens=12, seed=3, topk_logprobs=3)
    traces = rollout(backend, AddDomain(), [add_task("a", ()), plain], n=3, sampling=s)
    assert [t.id for t in traces] == ["a-s0", "a-s1", "a-s2", "p-s0", "p-s1", "p-s2"]
    for t in traces:
        assert len(t.topk) == t.completion_tokens  # one top-k entry per generated token
        assert all(len(e["ids"]) == 3 for e in t.topk)
    # same seed -> same rows, whatever else is in the batch
    again = rollout(backend, AddDomain(), [plain], n=3, sampling=s)
    assert [t.messages for t in again] == [t.messages for t in traces[3:]]


def test_unparsable_tool_call_becomes_tool_error():
    """A random model's tool-call JSON is garbage: the episode gets an error message."""
    from distill.messages import tool_call
    from distill.rollout import _run_tool

    assert _run_tool(None, tool_call("call_0", None, "{oops")).startswith(
        "error: invalid tool call JSON"
    )
    assert "unknown tool" in _run_tool(
        AddDomain().environment(add_task()), tool_call("c", "mul", "{}")
    )


def test_agents_bank_environment_answers_the_oracle_calls():
    """The rollout's tool path against the real agents environment: the oracle's calls
    give the oracle's tool results; bad calls give error strings, not exceptions."""
    from distill.messages import tool_call
    from distill.rollout import _run_tool
    from teachers.base import get_domain

    dom = get_domain("agents")
    task = next(iter(dom.tasks("train", 1, 0)))
    env = dom.environment(task)
    oracle = dom.oracle(task)
    results = {m["tool_call_id"]: m["content"] for m in oracle if m["role"] == "tool"}
    for m in oracle:
        for call in m.get("tool_calls") or []:
            assert _run_tool(env, call) == results[call["id"]]
    assert _run_tool(env, tool_call("c", "balance", "{bad")).startswith("error")
    assert _run_tool(env, tool_call("c", None, "{bad")).startswith("error: invalid tool call JSON")


def test_turn_budget_warning_counts_the_tasks_a_turn_limit_cuts_short():
    from distill.rollout import turn_budget_warning

    dom = get_domain("agents")
    tasks = list(dom.tasks("eval", 100, 0, 3))
    turns = [sum(m["role"] == "assistant" for m in dom.oracle(t)) for t in tasks]
    limit = sorted(turns)[len(turns) // 2]
    over = sum(n > limit for n in turns)
    assert 0 < over < len(tasks)
    warning = turn_budget_warning(dom, tasks, limit)
    assert f"agents: {over} of 100 tasks need more than generate.max_turns={limit}" in warning
    assert f"up to {max(turns)})" in warning
    assert turn_budget_warning(dom, tasks, max(turns)) is None
    assert (
        turn_budget_warning(get_domain("math"), list(get_domain("math").tasks("eval", 5, 0)), 1)
        is None
    )

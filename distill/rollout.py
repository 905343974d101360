"""Episodes -> trace rows: single-turn answers and multi-turn agent loops, batched.

Every live episode of a batch steps together: one backend call generates the next
assistant turn of all of them; tool calls run in each episode's own environment; tool
results (or tool errors, for unparsable calls) are appended and the loop goes on until a
final answer, the turn limit or the token budget. A task's followup user messages are
injected, in order, after the model answers the previous one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from distill.backends import Backend, Completion, Sampling, mix_seed
from distill.messages import Lineage, Trace
from teachers.base import Domain, Task, ToolEnv, trace_from_task


@dataclass
class Episode:
    """One sampled conversation in progress (task ``task``, sample ``j``)."""

    task: Task
    j: int
    seed: int
    env: ToolEnv | None
    messages: list[dict[str, Any]]
    followups: list[str]
    turns: int = 0
    calls: int = 0  # tool calls so far: ids stay unique across turns
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    context_tokens: int = 0
    finish_reason: str | None = None
    topk: list[dict] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)  # with sampler_logprobs


def episode_seed(seed: int, task_id: str, j: int) -> int:
    """The seed of sample ``j`` of a task: a rerun regenerates exactly the same row."""
    return mix_seed(seed, task_id, j)


def rollout(
    backend: Backend,
    domain: Domain,
    tasks: list[Task],
    *,
    n: int,
    sampling: Sampling,
    max_turns: int = 8,
    max_episode_tokens: int = 2048,
    teacher: str = "",
    split: str = "train",
) -> list[Trace]:
    """``n`` traces per task (ids ``f"{task.id}-s{j}"``), each the full conversation,
    in task order then sample order; verdicts are left to the filter."""
    pairs = [(t, j) for t in tasks for j in range(n)]
    return rollout_pairs(
        backend, domain, pairs, sampling=sampling, max_turns=max_turns,
        max_episode_tokens=max_episode_tokens, teacher=teacher, split=split,
    )  # fmt: skip


def rollout_pairs(
    backend: Backend,
    domain: Domain,
    pairs: list[tuple[Task, int]],
    *,
    sampling: Sampling,
    teacher: str = "",
    split: str = "train",
    **limits: int,
) -> list[Trace]:
    """Traces of the given (task, sample index) pairs, in that order (resume rolls out
    only the samples still missing). ``limits``: :func:`run_episodes`' turn and token
    budgets."""
    episodes = run_episodes(backend, domain, pairs, sampling=sampling, **limits)
    lineage = json.dumps(sampling.to_json(), sort_keys=True)
    return [_trace(e, backend, teacher, split, lineage, sampling) for e in episodes]


def run_episodes(
    backend: Backend,
    domain: Domain,
    pairs: list[tuple[Task, int]],
    *,
    sampling: Sampling,
    max_turns: int = 8,
    max_episode_tokens: int = 2048,
) -> list[Episode]:
    """The episodes of (task, sample index) pairs, played to their end, in that order.
    With ``sampling.sampler_logprobs`` each keeps its turns' completions (prompt and
    generated ids, the sampler's log-probabilities and kept sets): what RL trains on."""
    episodes = [
        Episode(
            task=t,
            j=j,
            seed=episode_seed(sampling.seed, t.id, j),
            env=domain.environment(t),
            messages=[dict(m) for m in t.messages],
            followups=list(t.followups),
        )  # fmt: skip
        for t, j in pairs
    ]
    live = list(episodes)
    while live:
        completions = backend.complete(
            [e.messages for e in live],
            [e.task.tools for e in live],
            sampling,
            n=1,
            seeds=[mix_seed(e.seed, e.turns) for e in live],
        )
        for e, (c,) in zip(live, completions, strict=True):
            if sampling.sampler_logprobs:
                e.completions.append(c)
            _advance(e, c, max_turns, max_episode_tokens)
        live = [e for e in live if e.finish_reason is None]
    return episodes


def _advance(e: Episode, c: Completion, max_turns: int, max_tokens: int) -> None:
    """Append one generated turn (and its tool results or the next user message)."""
    msg = dict(c.message)
    if msg.get("tool_calls"):  # ids unique over the episode, tool results refer to them
        msg["tool_calls"] = [
            {**call, "id": f"call_{e.calls + k}"} for k, call in enumerate(msg["tool_calls"])
        ]
        e.calls += len(msg["tool_calls"])
    e.messages.append(msg)
    e.turns += 1
    e.prompt_tokens = c.prompt_tokens if e.prompt_tokens is None else e.prompt_tokens
    e.completion_tokens += c.completion_tokens
    e.context_tokens = c.prompt_tokens + c.completion_tokens
    if c.topk:
        e.topk.extend({"ids": t["ids"], "logprobs": t["logprobs"]} for t in c.topk)
    if c.finish_reason == "length":
        e.finish_reason = "length"
        return
    if msg.get("tool_calls"):
        for call in msg["tool_calls"]:
            e.messages.append(
                {"role": "tool", "tool_call_id": call["id"], "content": _run_tool(e.env, call)}
            )
    elif e.followups:
        e.messages.append({"role": "user", "content": e.followups.pop(0)})
    else:
        e.finish_reason = "stop"
        return
    if e.context_tokens >= max_tokens:
        e.finish_reason = "length"
    elif e.turns >= max_turns:
        e.finish_reason = "turn_limit"


def turn_budget_warning(domain: Domain, tasks: list[Task], max_turns: int) -> str | None:
    """A warning when some tasks need more assistant turns than ``max_turns`` allows (as
    the domain's oracle solves them): such episodes are cut before their final answer, so
    neither a teacher nor the student can pass them. None when all fit or nothing is known."""
    need = []
    for t in tasks:
        if not t.tools:
            continue
        try:
            msgs = domain.oracle(t)
        except Exception:  # real records without an oracle: nothing to check
            continue
        need.append(sum(1 for m in msgs if m.get("role") == "assistant"))
    over = sum(1 for n in need if n > max_turns)
    if not over:
        return None
    return (
        f"{domain.name}: {over} of {len(need)} tasks need more than generate.max_turns="
        f"{max_turns} assistant turns (the oracle uses up to {max(need)}); those episodes "
        "end before their answer"
    )


def _run_tool(env: ToolEnv | None, call: dict[str, Any]) -> str:
    """The tool message content for one call; every failure is a string the model sees."""
    fn = call["function"]
    if fn.get("name") is None:
        return f"error: invalid tool call JSON: {str(fn.get('arguments'))[:200]}"
    if env is None:
        return "error: no tools are available in this task"
    try:
        return str(env.execute(fn["name"], fn.get("arguments") or "{}"))
    except Exception as e:  # an environment should not raise; the episode must not die
        return f"error: tool {fn['name']!r} failed: {type(e).__name__}: {e}"


def _trace(
    e: Episode, backend: Backend, teacher: str, split: str, sampling_json: str, sampling: Sampling
) -> Trace:
    return trace_from_task(
        e.task,
        f"{e.task.id}-s{e.j}",
        e.messages,
        split=split,
        teacher=teacher or backend.name,
        finish_reason=e.finish_reason,
        prompt_tokens=e.prompt_tokens,
        completion_tokens=e.completion_tokens,
        topk=e.topk if sampling.topk_logprobs else None,
        lineage=Lineage(
            teacher_model=backend.name,
            teacher_revision=backend.revision,
            sampling=sampling_json,
        ),
    )

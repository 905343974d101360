"""The filter's steps as pure functions over lists of traces.

Each step takes the traces that reached it and returns ``(kept, dropped)`` where
``dropped`` maps a reason to the traces dropped for it; the stage counts them into the
funnel. Input order is kept, so every step is deterministic. Each rule that scores a
trace is a named, versioned function: a change bumps ``FILTER_VERSION``, which the rows'
lineage records.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from distill.filter.decontam import NgramIndex, canonical
from distill.filter.dedup import exact_duplicates, minhash, near_duplicates
from distill.messages import Trace

FILTER_VERSION = "1"
Dropped = dict[str, list[Trace]]


def assistant_text(trace: Trace) -> str:
    """Everything the model wrote: reasoning, content and tool calls of assistant turns."""
    parts = []
    for m in trace.messages:
        if m.get("role") != "assistant":
            continue
        parts += [m.get("reasoning_content") or "", m.get("content") or ""]
        calls = [c["function"] for c in m.get("tool_calls") or []]
        parts += [f"{f.get('name')} {f.get('arguments')}" for f in calls]
    return "\n".join(p for p in parts if p)


def prompt_text(trace: Trace) -> str:
    """The user turns of a trace (what decontamination compares with eval prompts)."""
    return "\n".join(m.get("content") or "" for m in trace.messages if m.get("role") == "user")


def final_answer(trace: Trace) -> str:
    """Content of the last assistant turn ('' when there is none)."""
    last = next((m for m in reversed(trace.messages) if m.get("role") == "assistant"), None)
    return (last or {}).get("content") or ""


def trace_tokens(trace: Trace) -> int:
    """Completion tokens as generated, or a whitespace-word count when not recorded."""
    if trace.completion_tokens is not None:
        return int(trace.completion_tokens)
    return len(assistant_text(trace).split())


def malformed_reason(trace: Trace, require_reasoning: bool = True) -> str | None:
    """Why a trace is malformed (``truncated``, ``bad_tool_call``, ``no_answer``,
    ``no_reasoning``), or None when it is well formed. Version: ``FILTER_VERSION``."""
    if trace.finish_reason == "length":
        return "truncated"
    turns = [m for m in trace.messages if m.get("role") == "assistant"]
    for m in turns:
        for call in m.get("tool_calls") or []:
            fn = call["function"]
            if not fn.get("name"):
                return "bad_tool_call"
            try:
                json.loads(fn.get("arguments") or "")
            except (json.JSONDecodeError, TypeError):
                return "bad_tool_call"
    if not turns or not (turns[-1].get("content") or "").strip():
        return "no_answer"
    if require_reasoning and any(not (m.get("reasoning_content") or "").strip() for m in turns):
        return "no_reasoning"
    return None


def _split(traces: list[Trace], reasons: Iterable[str | None]) -> tuple[list[Trace], Dropped]:
    kept, dropped = [], defaultdict(list)
    for t, r in zip(traces, reasons, strict=True):
        if r is None:
            kept.append(t)
        else:
            dropped[r].append(t)
    return kept, dict(dropped)


def drop_malformed(
    traces: list[Trace], require_reasoning: bool = True
) -> tuple[list[Trace], Dropped]:
    return _split(traces, (malformed_reason(t, require_reasoning) for t in traces))


def drop_failed(traces: list[Trace], keep_failed: bool = False) -> tuple[list[Trace], Dropped]:
    """Drop traces whose verdict failed (kept, still flagged by the verdict, on request)."""
    if keep_failed:
        return list(traces), {}
    return _split(traces, (None if t.verdict and t.verdict.passed else "failed" for t in traces))


def _passed_first(traces: list[Trace]) -> list[Trace]:
    """Correct traces before failed ones (stable): a duplicate group keeps a correct one."""
    return sorted(traces, key=lambda t: not (t.verdict and t.verdict.passed))


def _restore_order(kept: list[Trace], original: list[Trace]) -> list[Trace]:
    keep = {id(t) for t in kept}
    return [t for t in original if id(t) in keep]


def dedup_text(trace: Trace, with_prompt: bool = True) -> str:
    """What deduplication compares: the assistant output, after the user turns when
    ``with_prompt`` (distinct tasks whose answers happen to coincide are not duplicates)."""
    if not with_prompt:
        return assistant_text(trace)
    return prompt_text(trace) + "\n" + assistant_text(trace)


def dedup_exact(traces: list[Trace], with_prompt: bool = True) -> tuple[list[Trace], Dropped]:
    """Drop traces whose normalised text (:func:`dedup_text`) repeats an earlier one."""
    order = _passed_first(traces)
    rep = exact_duplicates([dedup_text(t, with_prompt) for t in order])
    kept, dropped = _split(
        order, (None if r == i else "exact_duplicate" for i, r in enumerate(rep))
    )
    return _restore_order(kept, traces), dropped


def dedup_near(
    traces: list[Trace],
    threshold: float,
    num_perm: int,
    shingle_size: int,
    with_prompt: bool = True,
) -> tuple[list[Trace], Dropped]:
    """Drop traces whose text (:func:`dedup_text`) is a near duplicate (MinHash LSH) of an
    earlier one."""
    order = _passed_first(traces)
    texts = [dedup_text(t, with_prompt) for t in order]
    rep = near_duplicates(texts, threshold, num_perm, shingle_size)
    kept, dropped = _split(order, (None if r == i else "near_duplicate" for i, r in enumerate(rep)))
    return _restore_order(kept, traces), dropped


def decontaminate(traces: list[Trace], index: NgramIndex) -> tuple[list[Trace], Dropped]:
    """Drop traces whose prompt or final answer overlaps an eval task's text (see
    :mod:`distill.filter.decontam`); the reason names which text matched and the eval task's
    domain (``prompt:math``)."""
    refs = [canonical(t.reference) for t in traces]
    domains = [t.domain for t in traces]
    by_prompt = index.contaminated([prompt_text(t) for t in traces], refs, domains)
    by_answer = index.contaminated([final_answer(t) for t in traces])

    def reason(i: int) -> str | None:
        if by_prompt[i] >= 0:
            return f"prompt:{index.evals[by_prompt[i]].domain}"
        if by_answer[i] >= 0:
            return f"answer:{index.evals[by_answer[i]].domain}"
        return None

    return _split(traces, (reason(i) for i in range(len(traces))))


def pass_rates(traces: Iterable[Trace]) -> dict[str, float]:
    """Teacher pass rate per task: passed samples / all samples (verdicts required)."""
    total, passed = defaultdict(int), defaultdict(int)
    for t in traces:
        total[t.task_id] += 1
        passed[t.task_id] += bool(t.verdict and t.verdict.passed)
    return {k: passed[k] / total[k] for k in total}


def _diverse_order(group: list[Trace], signatures: dict[int, np.ndarray]) -> list[Trace]:
    """Farthest-first: start from the shortest, then repeatedly the trace least similar
    (MinHash Jaccard) to those already taken; ties go to the shorter."""
    group = sorted(group, key=trace_tokens)
    sig = np.stack([signatures[id(t)] for t in group])
    taken, rest = [0], list(range(1, len(group)))
    closest = (sig == sig[0]).mean(axis=1)
    while rest:
        j = min(rest, key=lambda i: (closest[i], i))
        taken.append(j)
        rest.remove(j)
        closest = np.maximum(closest, (sig == sig[j]).mean(axis=1))
    return [group[i] for i in taken]


def select(
    traces: list[Trace],
    rates: dict[str, float],
    *,
    max_per_task: int | None,
    prefer: str = "shortest",
    pass_rate_min: float = 0.0,
    pass_rate_max: float = 1.0,
    max_per_domain: int | None = None,
    num_perm: int = 128,
    shingle_size: int = 5,
) -> tuple[list[Trace], Dropped]:
    """Per task: the pass-rate window, then at most ``max_per_task`` correct traces
    (shortest or most diverse first; flagged failed traces are not counted); then the
    domain cap, taken round-robin over tasks so every task keeps its best traces first."""
    rank: dict[int, int] = {}
    reasons: dict[int, str] = {}
    groups: dict[str, list[Trace]] = defaultdict(list)
    for t in traces:
        groups[t.task_id].append(t)
    signatures: dict[int, np.ndarray] = {}
    if prefer == "diverse":  # one vectorised pass over the domain, not one per task
        sig = minhash([assistant_text(t) for t in traces], num_perm, shingle_size)
        signatures = {id(t): row for t, row in zip(traces, sig, strict=True)}
    for task, group in groups.items():
        if not pass_rate_min <= rates.get(task, 0.0) <= pass_rate_max:
            reasons.update({id(t): "pass_rate" for t in group})
            continue
        correct = [t for t in group if t.verdict and t.verdict.passed]
        ordered = (
            _diverse_order(correct, signatures)
            if prefer == "diverse" and len(correct) > 1
            else sorted(correct, key=trace_tokens)
        )
        for r, t in enumerate(ordered):
            rank[id(t)] = r
            if max_per_task is not None and r >= max_per_task:
                reasons[id(t)] = "max_per_task"
        for t in group:
            rank.setdefault(id(t), 0)
    if max_per_domain is not None:
        alive = [t for t in traces if id(t) not in reasons]
        alive.sort(key=lambda t: (rank[id(t)], trace_tokens(t), t.id))
        reasons.update({id(t): "max_per_domain" for t in alive[max_per_domain:]})
    return _split(traces, (reasons.get(id(t)) for t in traces))

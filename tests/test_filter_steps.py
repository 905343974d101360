"""The filter's pure steps on hand-made traces and verdicts (distill.filter.steps)."""

from __future__ import annotations

import random

from distill.filter.steps import (
    dedup_exact,
    dedup_near,
    drop_failed,
    malformed_reason,
    pass_rates,
    select,
    trace_tokens,
)
from distill.messages import Trace, Verdict, tool_call


def _t(id_, task="a", reasoning="think", content="\\boxed{1}", passed=True, tokens=None, **kw):
    msg = {"role": "assistant", "reasoning_content": reasoning, "content": content, **kw}
    return Trace(
        id=id_,
        task_id=task,
        domain="math",
        messages=[{"role": "user", "content": "q"}, msg],
        verdict=Verdict(passed, float(passed), "ok" if passed else "wrong"),
        completion_tokens=tokens,
    )


def _ids(traces):
    return [t.id for t in traces]


def test_malformed_reasons():
    assert malformed_reason(_t("x")) is None
    assert malformed_reason(_t("x", finish_reason="length")) is None  # a message key, not the row's
    t = _t("x")
    t.finish_reason = "length"
    assert malformed_reason(t) == "truncated"
    assert malformed_reason(_t("x", content="  ")) == "no_answer"
    assert malformed_reason(_t("x", reasoning="")) == "no_reasoning"
    assert malformed_reason(_t("x", reasoning=""), require_reasoning=False) is None
    bad = [tool_call("c", "f", "{not json")]
    assert malformed_reason(_t("x", tool_calls=bad)) == "bad_tool_call"
    nameless = [tool_call("c", "", "{}")]
    assert malformed_reason(_t("x", tool_calls=nameless)) == "bad_tool_call"
    good = [tool_call("c", "f", '{"a": 1}')]
    assert malformed_reason(_t("x", tool_calls=good)) is None
    no_turn = Trace(id="x", task_id="a", domain="math", messages=[{"role": "user", "content": "q"}])
    assert malformed_reason(no_turn) == "no_answer"


def test_drop_failed_or_keep_flagged():
    ts = [_t("a"), _t("b", passed=False)]
    kept, dropped = drop_failed(ts)
    assert _ids(kept) == ["a"] and _ids(dropped["failed"]) == ["b"]
    kept, dropped = drop_failed(ts, keep_failed=True)
    assert _ids(kept) == ["a", "b"] and dropped == {}


def test_dedup_keeps_a_correct_copy_and_input_order():
    ts = [
        _t("bad", passed=False, reasoning="Same text"),
        _t("x", reasoning="other"),
        _t("good", reasoning="same  TEXT"),
    ]
    kept, dropped = dedup_exact(ts)
    assert _ids(kept) == ["x", "good"] and _ids(dropped["exact_duplicate"]) == ["bad"]
    rng = random.Random(0)
    words = [f"w{rng.randrange(10**6)}" for _ in range(300)]
    near = list(words)
    near[150] = "edit"
    ts = [_t("p", reasoning=" ".join(words)), _t("q", reasoning=" ".join(near))]
    kept, dropped = dedup_near(ts, 0.9, 128, 5)
    assert _ids(kept) == ["p"] and _ids(dropped["near_duplicate"]) == ["q"]


def test_select_shortest_per_task_and_pass_rate_window():
    ts = [
        _t("a1", tokens=30),
        _t("a2", tokens=10),
        _t("a3", tokens=20),
        _t("a4", passed=False),
        _t("b1", task="b", tokens=5),
        _t("b2", task="b", passed=False),
        _t("c1", task="c", tokens=5),
    ]
    rates = pass_rates(ts)
    assert rates == {"a": 0.75, "b": 0.5, "c": 1.0}
    kept, dropped = select(ts, rates, max_per_task=2)
    assert _ids(kept) == ["a2", "a3", "a4", "b1", "b2", "c1"]  # flagged failed are not counted
    assert _ids(dropped["max_per_task"]) == ["a1"]
    kept, dropped = select(ts, rates, max_per_task=None, pass_rate_min=0.6, pass_rate_max=0.9)
    assert {t.task_id for t in kept} == {"a"}
    assert _ids(dropped["pass_rate"]) == ["b1", "b2", "c1"]


def test_select_domain_cap_round_robin_over_tasks():
    ts = [_t(f"{k}{i}", task=k, tokens=10 * i + 1) for k in "abc" for i in range(3)]
    kept, dropped = select(ts, pass_rates(ts), max_per_task=None, max_per_domain=4)
    # every task keeps its shortest before any task keeps a second one
    assert _ids(kept) == ["a0", "a1", "b0", "c0"]
    assert len(dropped["max_per_domain"]) == 5


def test_select_diverse_prefers_different_traces():
    rng = random.Random(1)
    base = [f"w{rng.randrange(10**6)}" for _ in range(60)]
    other = [f"v{rng.randrange(10**6)}" for _ in range(80)]
    ts = [
        _t("short", reasoning=" ".join(base)),
        _t("similar", reasoning=" ".join(base + ["x"])),
        _t("different", reasoning=" ".join(other)),
    ]
    kept, _ = select(ts, pass_rates(ts), max_per_task=2, prefer="diverse")
    assert _ids(kept) == ["short", "different"]
    kept, _ = select(ts, pass_rates(ts), max_per_task=2, prefer="shortest")
    assert _ids(kept) == ["short", "similar"]
    assert trace_tokens(ts[0]) == 60 + 1  # word proxy: reasoning + content


def test_dedup_key_includes_the_prompt_unless_told_otherwise():
    a, b = _t("a", task="t1"), _t("b", task="t2")
    b.messages[0] = {"role": "user", "content": "another question"}
    assert _ids(dedup_exact([a, b])[0]) == ["a", "b"]  # same answer, other task: kept
    assert _ids(dedup_exact([a, b], with_prompt=False)[0]) == ["a"]

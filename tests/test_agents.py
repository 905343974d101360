"""The agents domain: the bank environment, seeded tasks, oracle trajectories and the
replay verifier (real calls against a fresh bank; tool results in the trace are ignored)."""

import copy
import json
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.errors import UserError
from distill.messages import Trace, to_openai
from teachers.agents import DOMAIN, same_answer
from teachers.base import split_of, task_from_trace
from teachers.toolenv import TOOLS, BankEnv


def tasks(n=20, seed=0, difficulty=1, split="train"):
    return list(DOMAIN.tasks(split, n, seed, difficulty))


def first(pred, difficulty=1, seed=0):
    return next(t for t in DOMAIN.tasks("train", 500, seed, difficulty) if pred(t))


def ops(task):
    return [s["op"] for s in task.meta["ops"]]


def calls(messages):
    return [c for m in messages for c in m.get("tool_calls") or []]


# --- environment ---------------------------------------------------------------------------


def bank():
    return BankEnv({"accounts": {"alice": 40, "bob": 10}})


def test_tools_work_and_change_state():
    env = bank()
    assert env.execute("balance", '{"account": "alice"}') == "40"
    assert (
        env.execute("transfer", '{"from": "alice", "to": "bob", "amount": 15}')
        == "ok: alice 25, bob 25"
    )
    assert env.execute("deposit", '{"account": "bob", "amount": 5}') == "ok: bob 30"
    assert env.state() == {"accounts": {"alice": 25, "bob": 30}}


@pytest.mark.parametrize(
    "name, arguments, expected",
    [
        ("balance", '{"account": ', "error: invalid JSON arguments"),
        ("steal", '{"account": "alice"}', "error: unknown tool 'steal'"),
        ("balance", "{}", "error: missing required argument 'account'"),
        ("transfer", '{"from": "alice", "to": "bob", "amount": "5"}', "error: argument 'amount' must be integer, got string"),
        ("transfer", '{"from": "alice", "to": "bob", "amount": true}', "error: argument 'amount' must be integer, got boolean"),
        ("balance", '{"account": "alice", "pin": 1}', "error: unknown argument 'pin'"),
        ("balance", "[1, 2]", "error: arguments must be object, got array"),
        ("balance", '{"account": "zed"}', "error: no account 'zed'"),
        ("transfer", '{"from": "bob", "to": "alice", "amount": 11}', "error: insufficient funds: bob has 10"),
        ("deposit", '{"account": "bob", "amount": -3}', "error: amount must be positive"),
    ],
)  # fmt: skip
def test_bad_calls_come_back_as_error_strings(name, arguments, expected):
    env = bank()
    assert env.execute(name, arguments).startswith(expected)
    assert env.state() == {"accounts": {"alice": 40, "bob": 10}}  # nothing changed


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(["balance", "transfer", "deposit", "x"]), arguments=st.text(max_size=40)
)
def test_environment_never_raises(name, arguments):
    assert isinstance(bank().execute(name, arguments), str)


@settings(max_examples=100, deadline=None)
@given(args=st.dictionaries(st.sampled_from(["account", "from", "to", "amount", "x"]),
                            st.one_of(st.integers(-5, 60), st.text(max_size=5), st.none(), st.floats())))  # fmt: skip
def test_environment_never_raises_on_json_objects(args):
    env = bank()
    for name in ("balance", "transfer", "deposit"):
        assert isinstance(env.execute(name, json.dumps(args)), str)
    assert sum(env.accounts.values()) >= 50  # money is never destroyed


# --- tasks -----------------------------------------------------------------------------------


# (the contract every domain meets, oracle traces that pass included: test_domains.py)


def test_tasks_carry_the_bank_tools():
    assert all(t.tools == TOOLS for t in tasks(5))


def test_more_tasks_extend_the_list():
    a = tasks(50, seed=3, difficulty=3)
    assert [t.id for t in tasks(80, seed=3, difficulty=3)][:50] == [t.id for t in a]


def test_thousands_distinct_split_by_bank_and_turns():
    train = {t.id: t for t in tasks(2000)}
    evals = {t.id: t for t in tasks(500, split="eval")}
    assert len(train) == 2000 and len(evals) == 500
    ident = json.dumps({"env": evals[next(iter(evals))].reference["env"],
                        "turns": evals[next(iter(evals))].reference["turns"]}, sort_keys=True)  # fmt: skip
    assert split_of(ident) == "eval"


@pytest.mark.parametrize(
    "difficulty, turns, n_calls", [(1, {1}, {1, 2}), (2, {1, 2}, {2, 3}), (3, {2, 3}, {3, 4, 5})]
)
def test_difficulty_sets_turns_and_calls(difficulty, turns, n_calls):
    ts = tasks(300, difficulty=difficulty)
    seen_turns, seen_calls = set(), set()
    for t in ts:
        msgs = DOMAIN.oracle(t)
        seen_turns.add(sum(m["role"] == "user" for m in msgs))
        seen_calls.add(len(calls(msgs)))
        assert len(t.followups) == len(t.reference["turns"]) - 1
    assert seen_turns == turns and seen_calls == n_calls


def test_later_turns_lean_on_earlier_ones():
    follow = [
        t for t in tasks(300, difficulty=3) if {"send_half", "undo", "what_about"} & set(ops(t))
    ]
    assert len(follow) > 30
    t = first(lambda t: ops(t)[:2] == ["balance", "send_half"], difficulty=3)
    assert t.followups[0].startswith("Send half of it to")


# --- oracle and verifier ---------------------------------------------------------------------


def test_oracle_tool_results_are_what_a_fresh_environment_returns():
    for t in tasks(100, difficulty=3):
        env, msgs = DOMAIN.environment(t), DOMAIN.oracle(t)
        results = {m["tool_call_id"]: m["content"] for m in msgs if m["role"] == "tool"}
        for c in calls(msgs):
            fn = c["function"]
            assert env.execute(fn["name"], fn["arguments"]) == results[c["id"]]
        assert env.state() == t.reference["final_state"]


def mutate_call(msgs, **change):
    msgs = copy.deepcopy(msgs)
    calls(msgs)[0]["function"].update(change)
    return msgs


def test_wrong_argument_fails_on_the_final_state():
    t = first(lambda t: ops(t) == ["transfer"])
    msgs = DOMAIN.oracle(t)
    args = json.loads(calls(msgs)[0]["function"]["arguments"])
    args["amount"] -= 1
    v = DOMAIN.verify(t, mutate_call(msgs, arguments=json.dumps(args)))
    assert not v.passed and v.reason.startswith(f"final state wrong: balance of {args['from']} is")


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"name": "foo"}, "unknown tool 'foo' (call 1)"),
        ({"arguments": '{"account": "alice"'}, "invalid JSON arguments"),
        ({"arguments": '{"acct": "alice"}'}, "missing required argument 'account'"),
    ],
)
def test_invalid_calls_fail(change, reason):
    t = first(lambda t: ops(t) == ["balance"])
    v = DOMAIN.verify(t, mutate_call(DOMAIN.oracle(t), **change))
    assert not v.passed and reason in v.reason


def test_right_number_from_a_wrong_lookup_fails():
    t = first(lambda t: ops(t) == ["balance"])
    asked = t.meta["ops"][0]["a"]
    other = next(n for n in t.reference["env"]["accounts"] if n != asked)
    v = DOMAIN.verify(t, mutate_call(DOMAIN.oracle(t), arguments=json.dumps({"account": other})))
    assert not v.passed and v.reason == f"answer not grounded: {asked}'s balance was not read"


def test_wrong_and_missing_final_answers_fail():
    t = first(lambda t: ops(t) == ["deposit"])
    msgs, expected = DOMAIN.oracle(t), t.reference["answers"][0]
    wrong = copy.deepcopy(msgs)
    wrong[-1]["content"] = f"Answer: {int(expected) + 1}"
    assert (
        DOMAIN.verify(t, wrong).reason
        == f"wrong answer: got {int(expected) + 1}, expected {expected}"
    )
    assert DOMAIN.verify(t, msgs[:-1]).reason == "no final answer"
    blank = copy.deepcopy(msgs)
    blank[-1]["content"] = "done"
    assert DOMAIN.verify(t, blank).reason == "no final answer"


def test_multi_turn_missing_or_changed_turn_fails():
    t = first(lambda t: len(t.reference["turns"]) == 3, difficulty=3)
    msgs = DOMAIN.oracle(t)
    second_user = [i for i, m in enumerate(msgs) if m["role"] == "user"][1]
    assert DOMAIN.verify(t, msgs[:second_user]).reason == "missing user turn 2 of 3"
    changed = copy.deepcopy(msgs)
    changed[second_user]["content"] += " Please."
    assert DOMAIN.verify(t, changed).reason == "user turn 2 is not the task's"
    # the answer to turn 1 missing: its last assistant message dropped
    no_answer = msgs[: second_user - 1] + msgs[second_user:]
    assert DOMAIN.verify(t, no_answer).reason == "turn 1: no final answer"


def test_extra_mutating_call_and_missing_tool_result_fail():
    t = first(lambda t: ops(t) == ["balance"])
    msgs = DOMAIN.oracle(t)
    a = t.meta["ops"][0]["a"]
    extra = copy.deepcopy(msgs)
    fn = calls(extra)[0]["function"]
    fn["name"], fn["arguments"] = (
        "deposit",
        json.dumps({"account": a, "amount": 1}),
    )
    assert DOMAIN.verify(t, extra).reason.startswith(f"final state wrong: balance of {a} is")
    dropped = [m for m in msgs if m["role"] != "tool"]
    assert "has no tool result" in DOMAIN.verify(t, dropped).reason


def test_doctored_tool_results_with_correct_calls_pass():
    for t in tasks(30, difficulty=3):
        msgs = copy.deepcopy(DOMAIN.oracle(t))
        for m in msgs:
            if m["role"] == "tool":
                m["content"] = "error: bank closed"
        assert DOMAIN.verify(t, msgs).passed


def test_verifier_reads_openai_form_and_shard_rows():
    for t in tasks(20, difficulty=3):
        msgs = DOMAIN.oracle(t)
        assert DOMAIN.verify(t, to_openai(msgs)).passed
        trace = Trace(
            id="x",
            task_id=t.id,
            domain="agents",
            messages=msgs,
            tools=t.tools,
            reference=t.reference,
        )
        back = Trace.from_row(json.loads(json.dumps(trace.to_row())))
        rebuilt = task_from_trace(back)  # no followups: the verifier takes turns from reference
        assert rebuilt.followups == [] and DOMAIN.verify(rebuilt, back.messages).passed


def test_same_answer():
    assert same_answer("$1,000.0", "1000") and same_answer("Bob.", "bob")
    assert not same_answer("41", "40") and not same_answer("alice", "bob")


# --- rendering -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers.utils.chat_template_utils import render_jinja_template

    from distill.chat.template import CHAT_TEMPLATE, train_tokenizer

    texts = []
    for t in tasks(300, seed=11):
        rendered, _ = render_jinja_template(
            [DOMAIN.oracle(t)], tools=t.tools, chat_template=CHAT_TEMPLATE
        )
        texts.append(rendered[0])
    return train_tokenizer(texts, 512, tmp_path_factory.mktemp("tok"))


def test_render_with_chat_template_and_token_length(tokenizer):
    lengths = []
    for t in tasks(100, split="eval"):
        text = tokenizer.apply_chat_template(
            to_openai(DOMAIN.oracle(t)), tools=t.tools, tokenize=False
        )
        assert text.startswith("<|system|>tools: balance(account: string) Read a balance.; ")
        assert "transfer(from: string, to: string, amount: integer)" in text
        assert text.endswith("<|end|>")
        assert '<tool_call>{"name": "' in text and "Answer: " in text
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    print(f"difficulty-1 trace tokens: mean {statistics.mean(lengths):.0f}, max {max(lengths)}")
    assert max(lengths) < 400


def test_render_drops_reasoning_of_earlier_turns(tokenizer):
    t = first(lambda t: len(t.reference["turns"]) == 3, difficulty=3)
    msgs = DOMAIN.oracle(t)
    text = tokenizer.apply_chat_template(to_openai(msgs), tools=t.tools, tokenize=False)
    reasoning = [m["reasoning_content"] for m in msgs if m.get("reasoning_content")]
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    kept = [m["reasoning_content"] for m in msgs[last_user:] if m.get("reasoning_content")]
    assert all(f"<think>{r}</think>" in text for r in kept)
    assert text.count("<think>") == len(kept) < len(reasoning)
    assert text.count("<tool_call>") == len(calls(msgs))  # calls of every turn stay


# --- real records ------------------------------------------------------------------------------


def as_record(t, **extra):
    ref = t.reference
    return {"id": t.id, "env": ref["env"], "turns": ref["turns"], "expected_answers": ref["answers"],
            "expected_state": ref["final_state"], **extra}  # fmt: skip


def test_records_round_trip_through_distill_verify(tmp_path):
    from distill.verify import run

    ts = tasks(6, difficulty=3)
    good = [as_record(t, messages=to_openai(DOMAIN.oracle(t))) for t in ts]
    bad = copy.deepcopy(good[0])
    bad["id"] = "bad"
    bad["messages"][-1]["content"] = "Answer: -1"
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*good, bad]))
    assert run("agents", path, out, workers=1) == (6, 1)
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert verdicts[-1]["id"] == "bad" and "wrong answer: got -1" in verdicts[-1]["reason"]
    assert len(list(DOMAIN.load_records(str(path), "all"))) == 7


def test_record_with_a_tool_subset_and_bad_records():
    rec = {"env": {"accounts": {"alice": 40, "bob": 10}}, "turns": ["What is alice's balance?"],
           "expected_answers": [40], "tools": [TOOLS[0]["function"]]}  # fmt: skip
    t = DOMAIN.from_record(rec)
    assert [x["function"]["name"] for x in t.tools] == ["balance"] and t.reference[
        "final_state"
    ] is None
    msgs = [*t.messages, {"role": "assistant", "tool_calls": [{"id": "c", "name": "deposit", "arguments": '{"account": "alice", "amount": 1}'}]}]  # fmt: skip
    assert DOMAIN.verify(t, msgs).reason == "unknown tool 'deposit' (call 1)"
    with pytest.raises(UserError, match="missing field.*expected_answers"):
        DOMAIN.from_record({k: v for k, v in rec.items() if k != "expected_answers"})
    with pytest.raises(UserError, match="tool 'shell' is not provided"):
        DOMAIN.from_record({**rec, "tools": [{"name": "shell"}]})
    with pytest.raises(UserError, match="one entry per turn"):
        DOMAIN.from_record({**rec, "expected_answers": [1, 2]})


def test_parquet_records_keep_each_bank(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ts = tasks(5, difficulty=3)
    # one Arrow struct holds every record's accounts: absent names come back as nulls
    pq.write_table(pa.Table.from_pylist([as_record(t) for t in ts]), tmp_path / "r.parquet")
    loaded = list(DOMAIN.load_records(str(tmp_path / "r.parquet"), "all"))
    assert [t.reference["env"] for t in loaded] == [t.reference["env"] for t in ts]
    assert all(DOMAIN.verify(r, DOMAIN.oracle(t)).passed for r, t in zip(loaded, ts, strict=True))


def test_record_schema_is_enforced_and_never_crashes():
    schema = {"name": "balance", "parameters": {"type": "object", "properties": {"account": {"type": "string", "enum": ["alice"]}}, "required": ["account"]}}  # fmt: skip
    rec = {
        "env": {"accounts": {"alice": 4, "bob": 1}},
        "turns": ["?"],
        "expected_answers": [4],
        "tools": [schema],
    }
    env = DOMAIN.environment(DOMAIN.from_record(rec))
    assert env.execute("balance", '{"account": "bob"}').startswith(
        "error: argument 'account' must be one of"
    )
    assert env.execute("balance", '{"account": "alice"}') == "4"
    schema["parameters"]["properties"]["account"] = {"type": "string", "minimum": "x"}
    env = DOMAIN.environment(DOMAIN.from_record(rec))
    assert env.execute("balance", '{"account": 3}').startswith("error:")


@given(st.integers(0, 999), st.integers(0, 999))
def test_compare_steps_say_which_is_larger_digit_by_digit(x, y):
    """The richer op's comparison, written out: its last sign is the order of x and y,
    and each step compares one digit (or the digit counts)."""
    from teachers.agents_tasks import compare_steps

    text = compare_steps(x, y)
    head, steps = text.split(": ")
    assert head == f"{x} vs {y}"
    last = steps.split(", ")[-1]
    want = "=" if x == y else (">" if x > y else "<")
    assert f" {want} " in last
    if len(str(x)) == len(str(y)):
        for step in steps.split(", "):
            a, _, b = step.split(" ")
            assert len(a) == len(b) == 1


def test_richer_oracle_compares_before_it_names_the_richer():
    t = first(lambda t: ops(t) == ["richer"])
    msgs = DOMAIN.oracle(t)
    last = msgs[-1]
    think = last.get("reasoning_content") or last.get("content")
    assert " vs " in think and think.rstrip().endswith("has more.")
    assert DOMAIN.verify(t, msgs).passed

"""Property: every field of a trace survives a write to shards and a read back."""

from __future__ import annotations

import json
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.messages import Lineage, Trace, Verdict, compact_message, normalize_message
from distill.shards import ShardWriter, iter_traces, load_dataset, read_table

text = st.text(max_size=40)
opt_text = st.none() | text
f32 = st.floats(width=32, allow_nan=False)  # scores and logprobs are stored as float32
json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
arguments = st.none() | json_value.map(json.dumps)
# the OpenAI form, and the flat one of schema-1 rows (nested on the way in)
tool_call = st.fixed_dictionaries(
    {
        "id": opt_text,
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": opt_text, "arguments": arguments}),
    }
) | st.fixed_dictionaries({"id": opt_text, "name": opt_text, "arguments": arguments})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"])},
    optional={
        "content": opt_text,
        "reasoning_content": opt_text,
        "tool_calls": st.lists(tool_call, max_size=2),
        "tool_call_id": opt_text,
    },
)
topk = st.lists(
    st.integers(1, 4).flatmap(
        lambda k: st.fixed_dictionaries(
            {
                "ids": st.lists(st.integers(0, 2**31 - 1), min_size=k, max_size=k),
                "logprobs": st.lists(f32, min_size=k, max_size=k),
            }
        )
    ),
    max_size=3,
)
trace = st.builds(
    Trace,
    id=text,
    task_id=text,
    domain=st.sampled_from(["math", "code", "logic", "agents"]),
    messages=st.lists(message, max_size=5),
    split=st.sampled_from(["train", "eval"]),
    teacher=opt_text,
    tools=st.none() | st.lists(st.dictionaries(text, json_value, max_size=2), max_size=2),
    reference=json_value,
    finish_reason=opt_text,
    prompt_tokens=st.none() | st.integers(0, 2**31 - 1),
    completion_tokens=st.none() | st.integers(0, 2**31 - 1),
    verdict=st.none() | st.builds(Verdict, passed=st.booleans(), score=f32, reason=text),
    topk=st.none() | topk,
    lineage=st.builds(Lineage, *[opt_text] * 7),
)


def canonical(t: Trace) -> Trace:
    """What the schema promises to keep: messages normalised (OpenAI tool calls, null
    fields dropped, an empty tool-call list is no tool call)."""
    t.messages = [compact_message(normalize_message(m)) for m in t.messages]
    return t


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(trace, min_size=1, max_size=6), st.integers(1, 4))
def test_every_field_round_trips(traces, max_rows):
    with tempfile.TemporaryDirectory() as d:
        with ShardWriter(d, max_rows=max_rows) as w:
            w.write(traces)
        back = list(iter_traces(d, verify=True))
        assert back == [canonical(t) for t in traces]
        assert read_table(d).num_rows == len(traces)


@settings(max_examples=10, deadline=None)
@given(st.lists(trace, min_size=1, max_size=4))
def test_datasets_sees_the_same_rows(traces):
    with tempfile.TemporaryDirectory() as d:
        with ShardWriter(d) as w:
            w.write(traces)
        ds = load_dataset(d)
        assert ds.num_rows == len(traces)
        # datasets decodes JSON with ujson, whose floats may differ in the last digit
        from datasets.utils.json import ujson_loads

        want = [canonical(t) for t in traces]
        for t in want:
            t.reference = ujson_loads(json.dumps(t.reference))
            t.tools = None if t.tools is None else [ujson_loads(json.dumps(x)) for x in t.tools]
        assert [Trace.from_row(r, decoded=True) for r in ds] == want

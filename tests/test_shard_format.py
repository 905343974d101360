"""The shard format: OpenAI messages, tools and reference as arrow.json, and what happens
to shards of the older format (schema version 1)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from distill.messages import (
    SCHEMA_VERSION,
    TRACE_SCHEMA,
    Trace,
    compact_message,
    normalize_message,
    tool_call,
)
from distill.shards import ShardError, ShardWriter, iter_traces, read_manifest, read_table
from distill.shards.view import export
from teachers.toolenv import TOOLS

FLAT = {"id": "c1", "name": "calc", "arguments": {"expr": "12*7"}}  # schema 1, object args
NESTED = tool_call("c1", "calc", '{"expr": "12*7"}')


def trace(i: int = 0, calls=(NESTED,)) -> Trace:
    return Trace(
        id=f"t{i}",
        task_id=f"t{i}",
        domain="agents",
        messages=[
            {"role": "user", "content": "12 * 7?"},
            {"role": "assistant", "content": "", "tool_calls": list(calls)},
            {"role": "tool", "tool_call_id": "c1", "content": "84"},
            {"role": "assistant", "content": "84"},
        ],
        tools=TOOLS,
        reference={"answer": 84},
    )


def test_one_message_form_openai_nested():
    assert NESTED == {
        "id": "c1",
        "type": "function",
        "function": {"name": "calc", "arguments": '{"expr": "12*7"}'},
    }
    m = {"role": "assistant", "tool_calls": [FLAT]}
    assert compact_message(normalize_message(m))["tool_calls"] == [NESTED]  # flat is nested
    assert compact_message(m)["tool_calls"] == [NESTED]  # also when only compacted
    assert tool_call("c", None, "{oops")["function"] == {"name": None, "arguments": "{oops"}


def test_tools_and_reference_are_arrow_json(tmp_path):
    assert TRACE_SCHEMA.field("tools").type == pa.list_(pa.json_())
    assert TRACE_SCHEMA.field("reference").type == pa.json_()
    with ShardWriter(tmp_path) as w:
        w.write([trace(0), trace(1, calls=[FLAT])])
    table = read_table(tmp_path)
    assert table.schema.field("tools").type == pa.list_(pa.json_())
    assert [json.loads(t) for t in table.column("tools")[0].as_py()] == TOOLS  # one per tool
    back = list(iter_traces(tmp_path))
    assert [t.messages[1]["tool_calls"] for t in back] == [[NESTED], [NESTED]]
    assert back[0].tools == TOOLS and back[0].reference == {"answer": 84}


def test_jsonl_export_writes_json_not_text(tmp_path):
    with ShardWriter(tmp_path / "clean" / "agents") as w:
        w.write([trace(0)])
    export(tmp_path / "clean", "jsonl", tmp_path / "out.jsonl")
    (row,) = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert row["tools"] == TOOLS and row["reference"] == {"answer": 84}
    assert row["messages"][1]["tool_calls"] == [NESTED]


def test_shards_of_schema_version_1_are_refused_in_one_line(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write([trace(0)])
    path = tmp_path / "_manifest.json"
    old = json.loads(path.read_text())
    path.write_text(json.dumps({**old, "schema_version": 1}))
    with pytest.raises(ShardError) as e:
        read_manifest(tmp_path)
    assert str(e.value) == (
        f"{path}: shards of schema version 1, this distill reads {SCHEMA_VERSION}: "
        "rerun `distill generate` (and the stages after it)"
    )


def test_a_resumed_writer_drops_shards_of_the_older_format(tmp_path):
    w = ShardWriter(tmp_path, max_rows=2, fingerprint="fp")
    w.write([trace(i) for i in range(4)])
    assert w.committed_rows == 4
    journal = tmp_path / "_journal-part.json"
    old = json.loads(journal.read_text())
    assert old["schema_version"] == SCHEMA_VERSION
    del old["schema_version"]  # as a schema-1 writer left it
    journal.write_text(json.dumps(old))
    w2 = ShardWriter(tmp_path, max_rows=2, fingerprint="fp")
    assert w2.committed_ids() == set() and not list(tmp_path.glob("part-*"))

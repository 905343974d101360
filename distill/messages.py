"""The trace: one row of a shard, as Python objects and as an explicit Arrow schema.

Messages follow the OpenAI chat format with DeepSeek's ``reasoning_content``, in memory
and in shards alike: a tool call is ``{"id", "type": "function", "function": {"name",
"arguments"}}`` with ``arguments`` the JSON string the model wrote, ``tools`` the list of
OpenAI tool schemas. One form everywhere: what a shard holds is what chat templates,
OpenAI-compatible servers and TRL's ``SFTTrainer`` take, with no conversion between.
:func:`normalize_message` also accepts the flat ``{id, name, arguments}`` of older code
and shards and nests it.

``tools`` and ``reference`` are arbitrary JSON (a tool's JSON Schema has any shape; a
reference is a number for math, tests for code, a state for agents). Arrow structs need
one shape for the whole column, and a union of shapes pads every tool with the others'
keys as nulls, which chat templates then render; so both columns use Arrow's canonical
JSON extension type (``arrow.json``): ``datasets`` reads them as Python objects (its
``Json`` feature), pyarrow as the JSON text. :func:`storage_schema` is the schema rows
are converted with before the cast to :data:`TRACE_SCHEMA`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from distill.errors import UserError


class MessageError(UserError, ValueError):
    """A chat message that does not fit the trace format (a ValueError for old callers)."""


# 2: nested tool calls, tools and reference as arrow.json (1: flat calls, JSON strings)
SCHEMA_VERSION = 2
ROLES = ("system", "user", "assistant", "tool")

FUNCTION_TYPE = pa.struct([("name", pa.string()), ("arguments", pa.string())])
TOOL_CALL_TYPE = pa.struct(
    [("id", pa.string()), ("type", pa.string()), ("function", FUNCTION_TYPE)]
)
MESSAGE_TYPE = pa.struct(
    [
        ("role", pa.string()),
        ("content", pa.string()),
        ("reasoning_content", pa.string()),
        ("tool_calls", pa.list_(TOOL_CALL_TYPE)),
        ("tool_call_id", pa.string()),
    ]
)
VERDICT_TYPE = pa.struct([("passed", pa.bool_()), ("score", pa.float32()), ("reason", pa.string())])
# Teacher top-k distribution of one generated token (for logit KD); the tail mass
# 1 - sum(exp(logprobs)) is implied.
TOPK_TYPE = pa.struct([("ids", pa.list_(pa.int32())), ("logprobs", pa.list_(pa.float32()))])
LINEAGE_TYPE = pa.struct(
    [
        ("teacher_model", pa.string()),
        ("teacher_revision", pa.string()),
        ("sampling", pa.string()),  # JSON: temperature, top_p, max_new_tokens, seed, ...
        ("verifier", pa.string()),
        ("verifier_version", pa.string()),
        ("recipe_fingerprint", pa.string()),
        ("extra", pa.string()),  # JSON: filter settings and anything a stage adds
    ]
)

TRACE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task_id", pa.string()),
        ("domain", pa.string()),
        ("split", pa.string()),
        ("teacher", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("tools", pa.list_(pa.json_())),  # OpenAI tool schemas, or null
        ("reference", pa.json_()),  # what the verifier checks against
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("verdict", VERDICT_TYPE),
        # One entry per generated assistant token, all assistant turns in order; null
        # unless the recipe asked the teacher for top-k logprobs.
        ("topk", pa.list_(TOPK_TYPE)),
        ("lineage", LINEAGE_TYPE),
    ],
    metadata={b"distill.schema_version": str(SCHEMA_VERSION).encode()},
)


def storage_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with each extension type (``arrow.json``) replaced by its storage type:
    pyarrow converts Python rows only to plain types, and the cast back costs nothing."""

    def plain(t: pa.DataType) -> pa.DataType:
        if isinstance(t, pa.BaseExtensionType):
            return t.storage_type
        if pa.types.is_list(t):
            return pa.list_(plain(t.value_type))
        if pa.types.is_struct(t):
            return pa.struct([f.with_type(plain(f.type)) for f in t])
        return t

    return pa.schema([f.with_type(plain(f.type)) for f in schema], metadata=schema.metadata)


def rows_table(rows: list[dict[str, Any]], schema: pa.Schema = TRACE_SCHEMA) -> pa.Table:
    """Rows (:meth:`Trace.to_row` dicts) as a table of ``schema``."""
    return pa.Table.from_pylist(rows, schema=storage_schema(schema)).cast(schema)


def decode_tools(value: Any) -> list[dict[str, Any]] | None:
    """The ``tools`` of a row as Python objects, from any reader: pyarrow's JSON texts,
    ``datasets``' objects, or the one JSON string of a schema-1 row."""
    if value is None:
        return None
    if isinstance(value, str):
        return json.loads(value)
    return [json.loads(t) if isinstance(t, str) else t for t in value]


@dataclass
class Verdict:
    """A verifier's judgement of one trace."""

    passed: bool
    score: float
    reason: str

    @classmethod
    def ok(cls, reason: str = "correct") -> Verdict:
        return cls(True, 1.0, reason)

    @classmethod
    def fail(cls, reason: str, score: float = 0.0) -> Verdict:
        return cls(False, score, reason)


@dataclass
class Lineage:
    teacher_model: str | None = None
    teacher_revision: str | None = None
    sampling: str | None = None
    verifier: str | None = None
    verifier_version: str | None = None
    recipe_fingerprint: str | None = None
    extra: str | None = None


@dataclass
class Trace:
    """One reasoning trace: the whole conversation plus what is known about it."""

    id: str
    task_id: str
    domain: str
    messages: list[dict[str, Any]]
    split: str = "train"
    teacher: str | None = None
    tools: list[dict[str, Any]] | None = None
    reference: Any = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    verdict: Verdict | None = None
    topk: list[dict[str, list]] | None = None
    lineage: Lineage = field(default_factory=Lineage)

    def to_row(self) -> dict[str, Any]:
        """The Arrow row of :data:`TRACE_SCHEMA`."""
        return {
            "id": self.id,
            "task_id": self.task_id,
            "domain": self.domain,
            "split": self.split,
            "teacher": self.teacher,
            "messages": [normalize_message(m) for m in self.messages],
            # the storage of arrow.json: JSON text (see the module doc)
            "tools": None if self.tools is None else [json.dumps(t) for t in self.tools],
            "reference": None if self.reference is None else json.dumps(self.reference),
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "verdict": None if self.verdict is None else _flat_fields(self.verdict),
            "topk": self.topk,
            "lineage": _flat_fields(self.lineage),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any], decoded: bool = False) -> Trace:
        """The trace of an Arrow row: from pyarrow (JSON columns as text) or, with
        ``decoded``, from ``datasets`` (JSON columns already Python objects)."""
        verdict = row.get("verdict")
        reference = row.get("reference")
        return cls(
            id=row["id"],
            task_id=row["task_id"],
            domain=row["domain"],
            split=row.get("split") or "train",
            teacher=row.get("teacher"),
            messages=[compact_message(m) for m in row["messages"]],
            tools=decode_tools(row.get("tools")),
            reference=reference if decoded else _decode(reference),
            finish_reason=row.get("finish_reason"),
            prompt_tokens=row.get("prompt_tokens"),
            completion_tokens=row.get("completion_tokens"),
            verdict=None if verdict is None else Verdict(**verdict),
            topk=row.get("topk"),
            lineage=Lineage(**(row.get("lineage") or {})),
        )


def json_values(row: dict[str, Any]) -> dict[str, Any]:
    """The ``arrow.json`` columns of a pyarrow row (JSON text) as Python objects."""
    out = {"tools": decode_tools(row["tools"])} if "tools" in row else {}
    if "reference" in row:
        out["reference"] = _decode(row["reference"])
    return out


def _decode(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _flat_fields(obj: Verdict | Lineage) -> dict[str, Any]:
    # Verdict and Lineage hold only scalars: a shallow copy is their row. asdict's
    # recursive deep copy was half the cost of Trace.to_row (~15 us a trace).
    return dict(vars(obj))


def normalize_message(m: dict[str, Any]) -> dict[str, Any]:
    """A message with every schema field present (missing ones null) and tool calls in
    the OpenAI form (flat ones nested, object arguments as JSON text)."""
    role = m.get("role")
    if role not in ROLES:
        raise MessageError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
    calls = m.get("tool_calls")
    return {
        "role": role,
        "content": m.get("content"),
        "reasoning_content": m.get("reasoning_content"),
        "tool_calls": None if not calls else [_call(c) for c in calls],
        "tool_call_id": m.get("tool_call_id"),
    }


def compact_message(m: dict[str, Any]) -> dict[str, Any]:
    """A message without null fields (what chat templates and APIs expect)."""
    out = {k: v for k, v in m.items() if v is not None}
    if "tool_calls" in out:
        calls = [_call(c) for c in out["tool_calls"]]  # copies (and nests a flat call)
        if calls:
            out["tool_calls"] = calls
        else:
            del out["tool_calls"]
    return out


def tool_call(call_id: str | None, name: str | None, arguments: Any) -> dict[str, Any]:
    """One tool call in the OpenAI form; ``arguments`` as JSON text (an object is
    encoded, a string is kept as the model wrote it, valid JSON or not)."""
    if not (isinstance(arguments, str) or arguments is None):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _call(c: dict[str, Any]) -> dict[str, Any]:
    fn = c.get("function") if isinstance(c.get("function"), dict) else c  # flat: schema 1
    return tool_call(c.get("id"), fn.get("name"), fn.get("arguments"))


def to_openai(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the OpenAI API takes them: the one form, every field checked, nulls
    dropped (flat tool calls of older code are nested)."""
    return [compact_message(normalize_message(m)) for m in messages]


# the API form is ours: reading a request's messages is the same normalisation
from_openai = to_openai


def drop_old_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The thinking-retention rule of DeepSeek-V3.2.

    Reasoning of assistant turns is kept across tool calls inside the current user turn
    and dropped from every assistant turn that precedes the last user message. Tool calls
    and tool results stay. Used both to build generation prompts and training renders, so
    the student learns exactly the context it will see.
    """
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    out = []
    for i, m in enumerate(messages):
        if i < last_user and m.get("role") == "assistant" and m.get("reasoning_content"):
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
        out.append(m)
    return out

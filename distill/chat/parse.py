"""Generated assistant text -> one assistant message (OpenAI tool calls).

Reads our chat format and the Hermes/Qwen one alike::

    <think>reasoning</think>content<tool_call>{"name": ..., "arguments": {...}}</tool_call><|end|>

Tool calls that are not valid JSON do not raise: they stay in the message as a call with
``function.name`` None and the raw text as ``function.arguments``, so a rollout can answer them with a tool
error the model sees and the filter can drop the trace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from distill.messages import tool_call

THINK, END_THINK = "<think>", "</think>"
CALL, END_CALL = "<tool_call>", "</tool_call>"
# End-of-turn markers of our template and of common chat formats (Qwen, Llama 3, Mistral).
END_MARKERS = (
    "<|end|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "</s>",
    "<|pad|>",
)
_CALL_RE = re.compile(re.escape(CALL) + r"(.*?)(?:" + re.escape(END_CALL) + r"|$)", re.S)


def strip_end(text: str, eos: Iterable[str] = ()) -> str:
    """``text`` cut at the first end-of-turn marker (eos tokens of the model included)."""
    cut = len(text)
    for marker in (*END_MARKERS, *(e for e in eos if e)):
        i = text.find(marker)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def parse_tool_call(raw: str, call_id: str) -> dict[str, Any]:
    """One OpenAI tool call from the JSON between ``<tool_call>`` tags; never raises."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return tool_call(call_id, None, raw.strip())
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return tool_call(call_id, None, raw.strip())
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models emit arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return tool_call(call_id, obj["name"], args)
    return tool_call(call_id, obj["name"], json.dumps(args, ensure_ascii=False))


def parse_assistant(text: str, *, call_offset: int = 0, eos: Iterable[str] = ()) -> dict[str, Any]:
    """The assistant message of generated ``text`` (special tokens kept).

    ``<think>...</think>`` becomes ``reasoning_content`` (a ``</think>`` without an opening
    tag, as when the prompt already opened it, counts everything before it); each
    ``<tool_call>`` block becomes an OpenAI tool call with id ``call_<k>`` where ``k`` counts
    from ``call_offset``; the rest, stripped, is ``content``.
    """
    text = strip_end(text, eos)
    reasoning = None
    start = text.find(THINK)
    end = text.find(END_THINK)
    if end != -1 and (start == -1 or start > end):
        reasoning, text = text[:end], text[end + len(END_THINK) :]
    elif start != -1:
        before = text[:start]
        if end == -1:  # truncated inside the reasoning
            reasoning, text = text[start + len(THINK) :], before
        else:
            reasoning = text[start + len(THINK) : end]
            text = before + text[end + len(END_THINK) :]
    calls = []
    for k, m in enumerate(_CALL_RE.finditer(text)):
        calls.append(parse_tool_call(m.group(1), f"call_{call_offset + k}"))
    content = _CALL_RE.sub("", text).strip()
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning.strip()
    if calls:
        msg["tool_calls"] = calls
    return msg

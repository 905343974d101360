"""Streamed chat completions for ``distill serve``: generated text, read while it grows,
as the chunks of OpenAI's ``stream: true`` (server-sent events).

A choice's text is parsed as the non-streamed reply parses it (:func:`parse_assistant`),
on the part that can no longer change: text that may still turn into a stop string, an
end or tag marker, a half-decoded character or stripped whitespace is held back. What was
sent is then always a prefix of the final reply, so the deltas of a stream add up to
exactly the message the same request gets without ``stream``. Tool calls go out whole,
one delta each, once their closing tag is there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from distill.chat.parse import CALL, END_CALL, END_MARKERS, END_THINK, THINK, parse_assistant
from distill.messages import to_openai

_MARKERS = (THINK, END_THINK, CALL, END_CALL, *END_MARKERS)


def settled_text(text: str, stop: list[str] | None, eos: list[str]) -> tuple[str, bool]:
    """The part of generated ``text`` that no later token can change, and whether a stop
    string already ended it."""
    for s in stop or ():
        if (i := text.find(s)) != -1:
            return text[:i], True
    longest = max((len(s) for s in stop or ()), default=1)
    text = text[: len(text) - (longest - 1)]  # may be the start of a stop string
    text = text.rstrip("\ufffd")  # a character whose bytes are not all decoded yet
    lt = text.rfind("<")
    if lt != -1 and any(m.startswith(text[lt:]) and m != text[lt:] for m in (*_MARKERS, *eos) if m):
        text = text[:lt]  # may be the start of a marker
    return text, False


@dataclass
class ChoiceStream:
    """What one choice has sent so far; :meth:`deltas` gives what to send next."""

    index: int
    reasoning: str = ""
    content: str = ""
    calls: int = 0
    started: bool = False
    pending: list[dict[str, Any]] = field(default_factory=list)

    def deltas(self, message: dict[str, Any], final: bool) -> list[dict[str, Any]]:
        """The deltas that bring what was sent up to ``message`` (flat tool calls). Before
        the end only settled text is shown (trailing whitespace held back) and only
        complete tool calls; at the end everything."""
        out: list[dict[str, Any]] = []
        if not self.started:
            out.append({"role": "assistant", "content": ""})
            self.started = True
        reasoning = message.get("reasoning_content") or ""
        content = message.get("content") or ""
        if not final:
            reasoning, content = reasoning.rstrip(), content.rstrip()
        if len(reasoning) > len(self.reasoning) and reasoning.startswith(self.reasoning):
            out.append({"reasoning_content": reasoning[len(self.reasoning) :]})
            self.reasoning = reasoning
        if len(content) > len(self.content) and content.startswith(self.content):
            out.append({"content": content[len(self.content) :]})
            self.content = content
        calls = message.get("tool_calls") or []
        done = calls if final else calls[: message.get("_closed_calls", 0)]
        if len(done) > self.calls:
            (nested,) = to_openai([{"role": "assistant", "tool_calls": done}])
            for k in range(self.calls, len(done)):
                out.append({"tool_calls": [{"index": k, **nested["tool_calls"][k]}]})
            self.calls = len(done)
        return out


def partial_message(text: str, stop: list[str] | None, eos: list[str]) -> dict[str, Any]:
    """The message of generated ``text`` so far, as far as it is settled; ``_closed_calls``
    counts the tool calls whose closing tag was generated."""
    settled, _ = settled_text(text, stop, eos)
    msg = parse_assistant(settled, eos=eos)
    msg["_closed_calls"] = settled.count(END_CALL)
    return msg


def chunk(
    cid: str, created: int, model: str, index: int, delta: dict, finish: str | None = None
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with one choice."""
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def event(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {body}\n\n".encode()

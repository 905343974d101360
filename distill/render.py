"""Render a trace into training examples: token ids plus an assistant-only loss mask.

Works for any chat template by rendering message prefixes as text and diffing: an
assistant turn's span is what ``render(messages[:k+1])`` adds after
``render(messages[:k], add_generation_prompt=True)``. Every prefix render must be a
prefix of the full render (the round trip check), and no token may straddle a span
boundary; otherwise masking would be a guess, so we raise :class:`TemplateError`.

Thinking retention (DESIGN.md): a trace with several user turns becomes one example per
user turn. Its context is everything before that turn's answer with older reasoning
dropped; its loss covers that turn's assistant messages, reasoning included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from distill.chat import CHAT_TEMPLATE
from distill.errors import UserError
from distill.messages import compact_message, drop_old_reasoning, normalize_message

RENDER_VERSION = "1"


class TemplateError(UserError):
    """A chat template whose output cannot be split into per-message spans."""


@dataclass
class RenderedExample:
    input_ids: list[int]
    loss_mask: list[int]


def template_messages(tokenizer, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages in the form the tokenizer's template expects.

    Our template takes our flat tool calls as they are (arguments stay the exact JSON
    string the model wrote). Other templates get the transformers convention: nested
    ``function`` with ``arguments`` as a dict.
    """
    out = []
    ours = tokenizer.chat_template == CHAT_TEMPLATE
    for m in messages:
        m = compact_message(normalize_message(m))
        if "tool_calls" in m and not ours:
            m["tool_calls"] = [
                {
                    "id": c.get("id"),
                    "type": "function",
                    "function": {"name": c["name"], "arguments": _args(c)},
                }
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def _args(call: dict[str, Any]) -> Any:
    try:
        return json.loads(call.get("arguments") or "{}")
    except json.JSONDecodeError:
        return call.get("arguments")


def render_text(tokenizer, messages, tools=None, add_generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except (
        Exception
    ) as e:  # jinja raises anything (TemplateError, TypeError, its own raise_exception)
        raise TemplateError(
            f"chat template failed on a {len(messages)}-message prefix: {e}"
        ) from None


def assistant_spans(tokenizer, messages, tools=None) -> tuple[str, list[tuple[int, int]]]:
    """The full render and the character spans of the assistant turns after the last
    user message (the turns that carry loss)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    full = render_text(tokenizer, messages, tools)
    spans: list[tuple[int, int]] = []
    end_prev = 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or k < last_user:
            continue
        before = render_text(tokenizer, messages[:k], tools, add_generation_prompt=True)
        upto = render_text(tokenizer, messages[: k + 1], tools)
        for name, text in (("with a generation prompt", before), ("", upto)):
            if not full.startswith(text):
                raise TemplateError(
                    f"chat template is not prefix-stable: the render of the first {k + (name == '')} "
                    f"messages {name} is not a prefix of the whole conversation's render; "
                    "its loss mask cannot be derived reliably"
                )
        a, b = len(before), len(upto)
        if a < end_prev or b <= a:
            raise TemplateError(
                f"chat template renders assistant message {k} in no span of its own"
            )
        reasoning = (m.get("reasoning_content") or "").strip()
        if reasoning and reasoning not in full[a:b]:
            # a template that drops reasoning would train a student that never thinks
            raise TemplateError(
                "chat template does not render reasoning_content of the assistant turns "
                "being trained; use a template that renders it (e.g. as <think>...</think>)"
            )
        spans.append((a, b))
        end_prev = b
    return full, spans


def _mask_tokens(tokenizer, text: str, spans: list[tuple[int, int]]) -> RenderedExample:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    bounds = sorted({x for s in spans for x in s})
    mask = [0] * len(ids)
    j = 0
    for t, (s, e) in enumerate(offsets):
        for x in bounds:
            if s < x < e:
                raise TemplateError(
                    f"token {tokenizer.convert_ids_to_tokens(ids[t])!r} straddles an assistant "
                    "turn boundary; the loss mask cannot be split at a token"
                )
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j < len(spans) and spans[j][0] <= s < spans[j][1] and e > s:
            mask[t] = 1
    if mask:
        mask[0] = 0  # the first token has no context to be predicted from
    return RenderedExample(list(ids), mask)


def render_trace(
    tokenizer, messages: list[dict], tools: list[dict] | None = None
) -> list[RenderedExample]:
    """One example per user turn that has an assistant answer (see module doc)."""
    msgs = template_messages(tokenizer, messages)
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"] or [0]
    examples = []
    for n, u in enumerate(users):
        end = users[n + 1] if n + 1 < len(users) else len(msgs)
        convo = drop_old_reasoning(msgs[:end])
        if not any(m["role"] == "assistant" for m in convo[u:]):
            continue
        text, spans = assistant_spans(tokenizer, convo, tools)
        ex = _mask_tokens(tokenizer, text, spans)
        if sum(ex.loss_mask):
            examples.append(ex)
    return examples

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

import numpy as np

from distill.chat.render_python import render_spans
from distill.chat.template import ASSISTANT, CHAT_TEMPLATE, END
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

    Our template takes the OpenAI form as it is (arguments stay the exact JSON string
    the model wrote). Other templates get the transformers convention: ``arguments`` as
    an object (Llama's templates, for one, cannot read a string there).
    """
    out = []
    ours = tokenizer.chat_template == CHAT_TEMPLATE
    for m in messages:
        m = compact_message(normalize_message(m))
        if "tool_calls" in m and not ours:
            for c in m["tool_calls"]:
                c["function"]["arguments"] = _args(c["function"]["arguments"])
        out.append(m)
    return out


def _args(text: str | None) -> Any:
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:
        return text


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


def assistant_spans(tokenizer, messages, tools=None) -> tuple[str, list[tuple[int, int]], bool]:
    """The full render, the character spans of the assistant turns after the last user
    message (the turns that carry loss), and whether the render came from
    :mod:`distill.chat.render_python` (our template without Jinja, whose turn markers are all
    structural, so the mask follows from the token ids)."""
    if tokenizer.chat_template == CHAT_TEMPLATE and messages and messages[0]["role"] != "assistant":
        if (fast := render_spans(messages, tools)) is not None:
            return (*fast, True)
    return (*template_spans(tokenizer, messages, tools), False)


def template_spans(tokenizer, messages, tools=None) -> tuple[str, list[tuple[int, int]]]:
    """The text and spans of :func:`assistant_spans` for any template: prefix renders,
    diffed."""
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


def _mask_tokens(tokenizer, ids, offsets, spans: list[tuple[int, int]]) -> RenderedExample:
    """Loss mask of one tokenized render: a token is trained when it starts inside an
    assistant span; a token across a span boundary makes the mask a guess, so it raises."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    s, e = off[:, 0], off[:, 1]
    for x in sorted({x for sp in spans for x in sp}):
        bad = np.flatnonzero((s < x) & (x < e))
        if len(bad):
            raise TemplateError(
                f"token {tokenizer.convert_ids_to_tokens(ids[bad[0]])!r} straddles an assistant "
                "turn boundary; the loss mask cannot be split at a token"
            )
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        mask |= (a <= s) & (s < b)
    mask &= e > s
    if len(mask):
        mask[0] = False  # the first token has no context to be predicted from
    return RenderedExample(list(ids), mask.astype(np.uint8).tolist())


def trace_texts(tokenizer, messages, tools) -> list[tuple[str, list[tuple[int, int]], bool]]:
    """The text, assistant spans and render path (see :func:`assistant_spans`) of each example of
    one trace (one per user turn)."""
    msgs = template_messages(tokenizer, messages)
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"] or [0]
    out = []
    for n, u in enumerate(users):
        end = users[n + 1] if n + 1 < len(users) else len(msgs)
        convo = drop_old_reasoning(msgs[:end])
        if any(m["role"] == "assistant" for m in convo[u:]):
            out.append(assistant_spans(tokenizer, convo, tools))
    return out


def render_trace(
    tokenizer, messages: list[dict], tools: list[dict] | None = None
) -> list[RenderedExample]:
    """One example per user turn that has an assistant answer (see module doc)."""
    return render_traces(tokenizer, [(messages, tools)])[0]


def render_traces(tokenizer, traces: list[tuple[list[dict], list[dict] | None]]):
    """:func:`render_trace` of many traces, tokenized in one batched call (the tokenizer
    spreads a batch over its threads)."""
    texts = [trace_texts(tokenizer, m, tools) for m, tools in traces]
    return encode_texts(tokenizer, texts)


def encode_texts(tokenizer, texts: list[list[tuple[str, list[tuple[int, int]], bool]]]):
    """Per trace, its rendered examples (:func:`trace_texts`) tokenized in one batched
    call and masked; examples without a loss token are left out. Renders of our template
    are masked from the turn-marker ids, others from character offsets."""
    flat = [t for row in texts for t, _, _ in row]
    offsets = any(not ours for row in texts for _, _, ours in row)
    enc = (
        tokenizer(flat, add_special_tokens=False, return_offsets_mapping=offsets)
        if flat
        else {"input_ids": []}
    )
    marks = (tokenizer.convert_tokens_to_ids(ASSISTANT), tokenizer.convert_tokens_to_ids(END))
    out, k = [], 0
    for row in texts:
        exs = []
        for _, spans, ours in row:
            ids = enc["input_ids"][k]
            if ours:
                ex = _mask_by_markers(ids, len(spans), *marks)
            else:
                ex = _mask_tokens(tokenizer, ids, enc["offset_mapping"][k], spans)
            k += 1
            if any(ex.loss_mask):
                exs.append(ex)
        out.append(exs)
    return out


def _mask_by_markers(ids: list[int], n: int, assistant: int, end: int) -> RenderedExample:
    """The mask of our template's render: the last ``n`` assistant turns, each from the
    token after its ``<|assistant|>`` through its ``<|end|>``."""
    a = np.asarray(ids)
    mask = np.zeros(len(a), dtype=np.uint8)
    ends, starts = np.flatnonzero(a == end), np.flatnonzero(a == assistant)
    for p in starts[len(starts) - n :] if n else []:
        q = ends[np.searchsorted(ends, p)]
        mask[p + 1 : q + 1] = 1
    if len(mask):
        mask[0] = 0  # the first token has no context to be predicted from
    return RenderedExample(list(ids), mask.tolist())

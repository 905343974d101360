"""Our chat template (:data:`distill.chat.template.CHAT_TEMPLATE`) rendered in plain Python.

Rendering a trace for training takes one full render plus two prefix renders per
trained assistant message; through Jinja that cost 19 ms for a three-turn agents trace
(the tokenizer itself well under 1 ms), which made tokenizing 6,000 oracle traces a
two-minute stage. Here the same text and assistant spans come from one pass over the
messages. ``tests/test_render.py`` checks it against the Jinja template on every
domain's traces and the edge cases; conversations it does not know how to render
exactly (non-string content, say) return ``None`` and take the generic path.
"""

from __future__ import annotations

import json
from typing import Any

from distill.chat.template import ASSISTANT, CALL, END, END_CALL, END_THINK, SYSTEM, THINK


def _json(x: Any) -> str:  # transformers' tojson filter
    return json.dumps(x, ensure_ascii=False)


def _tools(tools: list[dict[str, Any]]) -> str:
    sigs = []
    for t in tools:
        f = t.get("function") or t
        ps = f.get("parameters") or {}
        req = ps.get("required") or []
        args = []
        for k, p in (ps.get("properties") or {}).items():
            plain = (
                isinstance(p, dict) and list(p.keys()) == ["type"] and isinstance(p["type"], str)
            )
            args.append(f"{k}{'' if k in req else '?'}: {p['type'] if plain else _json(p)}")
        desc = f.get("description")
        sigs.append(f"{f['name']}({', '.join(args)}){' ' + desc if desc else ''}")
    return f"{SYSTEM}tools: {'; '.join(sigs)}{END}"


def _text(x: Any) -> str | None:
    """Jinja's ``x or ''`` for the values our messages hold; None for anything else."""
    if x is None or isinstance(x, str):
        return x or ""
    return None


def render_spans(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[str, list[tuple[int, int]]] | None:
    """The render of ``messages`` and the character spans of the assistant messages
    after the last user message (each from just after its ``<|assistant|>`` to the end of
    its ``<|end|>``, as the prefix diff finds them); None if this renderer cannot be
    sure to match the template, or a message holds the text of a turn marker."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    parts: list[str] = [_tools(tools)] if tools else []
    at = len(parts[0]) if parts else 0
    spans = []
    for i, m in enumerate(messages):
        content = _text(m.get("content"))
        if content is None:
            return None
        if m.get("role") == "assistant":
            body = []
            reasoning = m.get("reasoning_content")
            if reasoning and i > last_user:
                if not isinstance(reasoning, str):
                    return None
                body.append(f"{THINK}{reasoning}{END_THINK}")
            body.append(content)
            for tc in m.get("tool_calls") or []:
                fn = tc.get("function") or tc
                args = fn["arguments"]
                args = args if isinstance(args, str) else _json(args)
                body.append(f'{CALL}{{"name": {_json(fn["name"])}, "arguments": {args}}}{END_CALL}')
            body.append(END)
            piece = "".join(body)
            if i > last_user:
                spans.append((at + len(ASSISTANT), at + len(ASSISTANT) + len(piece)))
            piece = ASSISTANT + piece
        else:
            piece = f"<|{m.get('role')}|>{content}{END}"
        parts.append(piece)
        at += len(piece)
    text = "".join(parts)
    # every <|assistant|> and <|end|> in the text is one of ours (none inside a message):
    # then the loss mask can be read off the token ids (see distill.chat.render.encode_texts)
    n_assistant = sum(m.get("role") == "assistant" for m in messages)
    if text.count(ASSISTANT) != n_assistant or text.count(END) != len(messages) + bool(tools):
        return None
    return text, spans

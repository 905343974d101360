"""Loss masks from chat templates: exactly the assistant tokens carry loss, one example
per user turn with older reasoning dropped, for our template and a ChatML/Qwen one."""

import json

import pytest
from tiny_artifacts import make_tokenizer, tool_trace

from distill.chat.render import TemplateError, render_trace
from distill.chat.template import END

QWEN_STYLE = (
    "{%- if tools %}{{ '<|im_start|>system\\n# Tools\\n' + (tools | tojson) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if m.reasoning_content %}{{ '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{ m.content or '' }}"
    "{%- for tc in m.tool_calls or [] %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + tc.function.name + '\", \"arguments\": ' + (tc.function.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    t = make_tokenizer(tmp_path_factory.mktemp("qtok"))
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.eos_token = "<|im_end|>"
    t.chat_template = QWEN_STYLE
    return t


def loss_text(tok, ex):
    return tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m])


def test_our_template_masks_assistant_tokens_per_user_turn(tok):
    first, second = render_trace(tok, tool_trace())
    call = '<tool_call>{"name": "calc", "arguments": {"expr": "12*7"}}</tool_call>'
    assert loss_text(tok, first) == (
        f"<think>I should call the calculator.</think>{call}{END}<think>The tool said 84.</think>12 * 7 = 84.{END}"
    )
    assert loss_text(tok, second) == f"<think>84 + 1 = 85.</think>85{END}"
    ctx = tok.decode(second.input_ids)
    # thinking retention: the first turn's reasoning is gone, its tool call and result stay
    assert "I should call" not in ctx and "The tool said" not in ctx
    assert call in ctx and "<|tool|>84<|end|>" in ctx
    # the full render is the tokenizer's own render of that conversation
    assert second.input_ids == tok.apply_chat_template(
        tool_trace(), tokenize=True, return_dict=False
    )


def test_system_user_and_tool_tokens_carry_no_loss(tok):
    first, _ = render_trace(tok, tool_trace())
    masked_out = tok.decode(
        [i for i, m in zip(first.input_ids, first.loss_mask, strict=True) if not m]
    )
    assert (
        masked_out
        == "<|system|>You are a calculator agent.<|end|><|user|>What is 12 * 7?<|end|><|assistant|><|tool|>84<|end|><|assistant|>"
    )


def test_qwen_style_template(qwen_tok):
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
    first, second = render_trace(qwen_tok, tool_trace(), tools=tools)
    call = '\n<tool_call>\n{"name": "calc", "arguments": {"expr": "12*7"}}\n</tool_call>'
    assert loss_text(qwen_tok, first) == (
        f"<think>\nI should call the calculator.\n</think>\n\n{call}<|im_end|>\n"
        "<think>\nThe tool said 84.\n</think>\n\n12 * 7 = 84.<|im_end|>\n"
    )
    assert loss_text(qwen_tok, second) == "<think>\n84 + 1 = 85.\n</think>\n\n85<|im_end|>\n"
    ctx = qwen_tok.decode(second.input_ids)
    assert "I should call" not in ctx and "<tool_response>\n84\n</tool_response>" in ctx
    assert ctx.startswith("<|im_start|>system\n# Tools\n") and json.dumps(tools)[:20] in ctx


def test_template_that_is_not_prefix_stable_fails_loudly(qwen_tok, tok):
    bad = tok.chat_template.replace('<|end|>"', '<|end|>"').replace(
        "{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}",
        "{%- for m in messages -%}{%- if loop.last -%}<|system|>{%- endif -%}{%- if m['role'] == 'assistant' -%}",
    )
    assert bad != tok.chat_template
    old = tok.chat_template
    tok.chat_template = bad
    try:
        with pytest.raises(TemplateError, match="not prefix-stable"):
            render_trace(tok, tool_trace())
    finally:
        tok.chat_template = old


def test_assistant_turn_without_user_answer_gives_no_example(tok):
    assert render_trace(tok, [{"role": "user", "content": "hi"}]) == []


def test_template_that_drops_reasoning_fails_loudly(qwen_tok):
    old = qwen_tok.chat_template
    qwen_tok.chat_template = old.replace("{%- if m.reasoning_content %}", "{%- if false %}")
    assert qwen_tok.chat_template != old
    try:
        with pytest.raises(TemplateError, match="does not render reasoning_content"):
            render_trace(qwen_tok, tool_trace())
    finally:
        qwen_tok.chat_template = old


def test_our_template_renders_tools_as_signatures():
    """Required and optional parameters, plain types short, anything richer as its JSON
    schema, bare tool objects as well as OpenAI's {type, function} wrapper."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from distill.chat.template import CHAT_TEMPLATE

    tools = [
        {
            "type": "function",
            "function": {
                "name": "pick",
                "description": "Pick one.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "mode": {"type": "string", "enum": ["a", "b"]},
                        "n": {"type": "integer"},
                    },
                    "required": ["mode"],
                },
            },
        },
        {"name": "ping"},
    ]
    msgs = [{"role": "user", "content": "hi"}]
    text = render_jinja_template([msgs], tools=tools, chat_template=CHAT_TEMPLATE)[0][0]
    assert text == (
        '<|system|>tools: pick(mode: {"type": "string", "enum": ["a", "b"]}, n?: integer) '
        "Pick one.; ping()<|end|><|user|>hi<|end|>"
    )


def _generic(monkeypatch):
    """Render through the Jinja template and character offsets only."""
    import distill.chat.render as render

    monkeypatch.setattr(render, "render_spans", lambda messages, tools=None: None)


RICH_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": 'Find <b>things</b> & "quotes".',
            "parameters": {
                "type": "object",
                "properties": {
                    "q": {"type": "string"},
                    "mode": {"type": "string", "enum": ["fast", "exact"]},
                    "limit": {"type": "integer"},
                },
                "required": ["q"],
            },
        },
    },
    {"name": "now", "parameters": {}},  # flat form, no description, no arguments
]


def _edge_traces():
    call = {"id": "c1", "name": "search", "arguments": '{"q": "é ü"}'}
    nested = {"id": "c2", "type": "function", "function": {"name": "now", "arguments": {}}}
    return [
        (tool_trace(), None),
        (tool_trace(), RICH_TOOLS),
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "first"},
                {"role": "assistant", "reasoning_content": "old", "content": "a"},
                {"role": "user", "content": "second"},
                {"role": "assistant", "reasoning_content": "r", "tool_calls": [call, nested]},
                {"role": "tool", "tool_call_id": "c1", "content": "found"},
                {"role": "tool", "tool_call_id": "c2", "content": None},
                {"role": "assistant", "content": "done", "reasoning_content": ""},
            ],
            RICH_TOOLS,
        ),
        (
            [
                {"role": "user", "content": "say <|end|> please"},
                {"role": "assistant", "content": "<|end|>"},
            ],
            None,
        ),
    ]


def test_our_python_render_matches_the_jinja_template(tok, monkeypatch):
    """distill.chat.render_python gives the template's very text and spans, and the token-marker
    masks equal the offset masks, on every domain's oracle traces (difficulties 1-3) and
    on edge cases; a message holding a turn marker takes the generic path."""
    from distill.chat import render_python as render_ours
    from distill.chat.render import template_messages, template_spans
    from distill.messages import drop_old_reasoning
    from teachers.base import REGISTRY, get_domain

    traces = list(_edge_traces())
    for d in REGISTRY:
        dom = get_domain(d)
        for level in (1, 2, 3):
            traces += [(dom.oracle(t), t.tools) for t in dom.tasks("train", 15, 0, level)]
    compared = 0
    for messages, tools in traces:
        msgs = template_messages(tok, messages)
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        for n in range(len(users)):
            convo = drop_old_reasoning(msgs[: users[n + 1] if n + 1 < len(users) else None])
            fast = render_ours.render_spans(convo, tools)
            if fast is not None:
                assert fast == template_spans(tok, convo, tools)
                compared += 1
    assert compared > len(traces)  # multi-turn agents traces give several examples
    assert render_ours.render_spans(*_edge_traces()[-1]) is None
    fast = [render_trace(tok, m, t) for m, t in traces]
    _generic(monkeypatch)
    assert fast == [render_trace(tok, m, t) for m, t in traces]

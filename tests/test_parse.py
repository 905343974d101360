"""Generated text -> assistant message: our format, Qwen/Hermes output, broken output."""

import json

from distill.chat.parse import parse_assistant


def test_our_format_with_reasoning_and_tool_call():
    text = '<think>add them</think>ok<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call><|end|>'
    m = parse_assistant(text)
    assert m["reasoning_content"] == "add them"
    assert m["content"] == "ok"
    assert m["tool_calls"] == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
        }
    ]


def test_plain_answer_and_eos_stripped():
    m = parse_assistant("<think> r </think> 42 <|end|><|pad|>garbage")
    assert m == {"role": "assistant", "content": "42", "reasoning_content": "r"}
    assert parse_assistant("hello</s>", eos=["</s>"])["content"] == "hello"
    assert "reasoning_content" not in parse_assistant("just text")


def test_qwen_style_several_calls_and_offset():
    text = (
        "I'll call two tools.\n<tool_call>\n"
        '{"name": "get", "arguments": {"k": "x"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "put", "arguments": "{\\"k\\": 1}"}\n</tool_call><|im_end|>'
    )
    m = parse_assistant(text, call_offset=3)
    assert m["content"] == "I'll call two tools."
    assert [c["id"] for c in m["tool_calls"]] == ["call_3", "call_4"]
    assert [c["function"]["name"] for c in m["tool_calls"]] == ["get", "put"]
    assert json.loads(m["tool_calls"][1]["function"]["arguments"]) == {"k": 1}


def test_think_closed_without_opening_tag():
    # Qwen3-style templates open <think> in the prompt: only the closing tag is generated
    m = parse_assistant("reasoning here</think>\n\nanswer")
    assert m["reasoning_content"] == "reasoning here"
    assert m["content"] == "answer"


def test_truncated_reasoning_is_reasoning_not_content():
    m = parse_assistant("<think>still thinking and then the budget ran o")
    assert m["reasoning_content"].startswith("still thinking")
    assert m["content"] == ""


def test_unparsable_tool_call_kept_with_raw_arguments():
    m = parse_assistant('<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>')
    raw = '{"name": "add", "arguments": {"a": 1,'
    assert m["tool_calls"] == [
        {"id": "call_0", "type": "function", "function": {"name": None, "arguments": raw}}
    ]
    # valid JSON but no name: also unparsable as a call
    m = parse_assistant('<tool_call>[1, 2]</tool_call><tool_call>{"name": "f"')
    assert [c["function"]["name"] for c in m["tool_calls"]] == [None, None]
    assert m["tool_calls"][1]["function"]["arguments"] == '{"name": "f"'

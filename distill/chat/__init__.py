"""Chat rendering: our tokenizer and chat template, the same template rendered in plain
Python, traces rendered into token ids with an assistant-only loss mask, and generated
text parsed back into an assistant message.

- :mod:`~distill.chat.template`: the special tokens, the Jinja chat template, the tokenizer trainer
- :mod:`~distill.chat.render_python`: our template without Jinja (same text and spans)
- :mod:`~distill.chat.render`: trace -> ids + loss mask, for any chat template
- :mod:`~distill.chat.parse`: generated assistant text -> one assistant message
"""

from distill.chat.parse import parse_assistant
from distill.chat.render import RenderedExample, render_trace, render_traces
from distill.chat.template import ASSISTANT, CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer

__all__ = [
    "ASSISTANT",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "RenderedExample",
    "parse_assistant",
    "render_trace",
    "render_traces",
    "train_tokenizer",
]

"""Our tokenizer and chat template (used when the recipe trains its own tokenizer).

Rendered form of a conversation::

    <|system|>tools: balance(account: string) Read a balance.; ...<|end|>
    <|system|>...<|end|><|user|>...<|end|>
    <|assistant|><think>reasoning</think>content<tool_call>{"name": ..., "arguments": {...}}</tool_call><|end|>
    <|tool|>result<|end|>

The generation prompt is ``<|assistant|>``; ``<|end|>`` ends every turn and is the EOS
token. Tool calls use the Hermes/Qwen ``<tool_call>`` JSON form, so one parser reads both
our models and Qwen-style ones. The template applies the thinking-retention rule: an
assistant turn's reasoning is rendered only after the last user message.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SYSTEM, USER, ASSISTANT, TOOL, END = (
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<|end|>",
)
THINK, END_THINK, CALL, END_CALL = "<think>", "</think>", "<tool_call>", "</tool_call>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, SYSTEM, USER, ASSISTANT, TOOL, END, THINK, END_THINK, CALL, END_CALL]

# Whitespace is controlled with {%- -%} so the rendered text is exactly the form above.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    # tools as signatures, `name(arg: type, opt?: type) description; ...` (the JSON schema
    # is 4x longer: in the demo it was 190 of an agent example's 330 tokens, none of them
    # learned from); a parameter that is more than a plain type keeps its JSON schema
    "{%- if tools -%}<|system|>{{ 'tools: ' }}"
    "{%- for t in tools -%}{%- set f = t['function'] if t.get('function') else t -%}"
    "{%- set ps = f.get('parameters') or {} -%}{%- set req = ps.get('required') or [] -%}"
    "{{ f['name'] }}("
    "{%- for k, p in (ps.get('properties') or {}).items() -%}"
    "{{ k }}{{ '' if k in req else '?' }}: "
    "{{ p['type'] if (p.keys() | list) == ['type'] and p['type'] is string else p | tojson }}"
    "{{ ', ' if not loop.last }}"
    "{%- endfor -%})"
    "{{ ' ' ~ f['description'] if f.get('description') }}{{ '; ' if not loop.last }}"
    "{%- endfor -%}<|end|>{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "<|assistant|>"
    "{%- if m.get('reasoning_content') and loop.index0 > ns.last_user -%}<think>{{ m['reasoning_content'] }}</think>{%- endif -%}"
    "{{ m.get('content') or '' }}"
    "{%- for tc in (m.get('tool_calls') or []) -%}"
    "{%- set fn = tc['function'] if tc.get('function') else tc -%}"
    "{%- set args = fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -%}"
    '<tool_call>{"name": {{ fn[\'name\'] | tojson }}, "arguments": {{ args }}}</tool_call>'
    "{%- endfor -%}"
    "<|end|>"
    "{%- else -%}"
    "<|{{ m['role'] }}|>{{ m.get('content') or '' }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE on ``texts`` and save it as an HF tokenizer with our chat
    template. Digits are split one by one: arithmetic stays learnable for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=END,
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=1 << 20,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast

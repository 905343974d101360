"""Tiny real teachers for the generation tests: a tokenizer trained with our chat
template and a 2-layer Llama, random or taught one conversation by heart (so greedy
decoding reproduces it: tool calls, multi-turn, everything a rollout must handle)."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

from distill.chat.template import train_tokenizer
from distill.messages import to_openai

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
]
PROMPT = [{"role": "user", "content": "add 2 and 3"}]
# The conversation the taught model knows by heart: a tool call, its result, a final
# answer, then a followup user turn answered directly.
SCRIPT = [
    *PROMPT,
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "use the tool",
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "add", "arguments": json.dumps({"a": 2, "b": 3})},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": "5"},
    {"role": "assistant", "content": "5", "reasoning_content": "the tool said 5"},
    {"role": "user", "content": "and double it"},
    {"role": "assistant", "content": "10", "reasoning_content": "5 times 2"},
]
CORPUS = [
    "add 2 and 3 use the tool the tool said 5 and double it 5 times 2 = 10",
    '{"name": "add", "arguments": {"a": 2, "b": 3}} tools: integers object properties',
    "the quick brown fox jumps over the lazy dog 0123456789",
]


class AddEnv:
    """A one-tool environment: ``add(a, b)``; errors come back as strings."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def execute(self, name: str, arguments: str) -> str:
        self.calls.append((name, arguments))
        if name != "add":
            return f"error: unknown tool {name!r}"
        try:
            args = json.loads(arguments)
            return str(int(args["a"]) + int(args["b"]))
        except (ValueError, KeyError, TypeError) as e:
            return f"error: bad arguments ({e})"


def tiny_model_dir(
    out: Path,
    *,
    taught: bool = False,
    hidden: int = 32,
    steps: int = 80,
    script: list[dict] | None = None,
    tools: list[dict] | None = None,
    corpus: list[str] | None = None,
) -> Path:
    """Save a tokenizer and a 2-layer Llama under ``out``; ``taught`` memorises ``script``
    (default SCRIPT, with ``tools``, default TOOLS)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = train_tokenizer((corpus or CORPUS) * 20, 400, out)
    end = tok.convert_tokens_to_ids("<|end|>")
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=end, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if taught:
        _teach(model, tok, steps, script or SCRIPT, TOOLS if tools is None else tools)
    model.generation_config.eos_token_id = end
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    return out


def _teach(model, tok, steps: int, script: list[dict], tools: list[dict]) -> None:
    """Overfit the full rendered SCRIPT (both user turns' views) so greedy decoding
    replays it; the rendering for generation drops old reasoning, so train on each
    prefix the rollout will actually see."""
    texts = []
    for k in range(1, len(script) + 1):
        if script[k - 1]["role"] == "assistant":
            from distill.messages import drop_old_reasoning

            texts.append(
                tok.apply_chat_template(
                    to_openai(drop_old_reasoning(script[:k])), tools=tools, tokenize=False
                )
            )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seqs = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    for _ in range(steps):  # one padded batch of every prefix per step
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


class AddDomain:
    """A hand-built domain on the protocol of teachers/base.py: one tool, followups."""

    name = "agents"
    verifier_name = "add"
    verifier_version = "1"

    def __init__(self):
        self.envs: list[AddEnv] = []

    def environment(self, task):
        if not task.tools:
            return None
        env = AddEnv()
        self.envs.append(env)
        return env


def add_task(task_id: str = "t0", followups: tuple[str, ...] = ("and double it",)):
    from teachers.base import Task

    return Task(
        id=task_id,
        domain="agents",
        messages=list(PROMPT),
        reference=10,
        tools=TOOLS,
        followups=list(followups),
    )


@functools.cache
def taught_model_dir() -> Path:
    """One taught model per test process (teaching takes seconds; reuse it)."""
    d = Path(tempfile.mkdtemp(prefix="distill-taught-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return tiny_model_dir(d, taught=True)

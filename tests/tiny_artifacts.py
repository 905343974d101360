"""Tiny real artifacts for the trainer tests: hand-written traces, a tokenizer trained
on them, shards written with distill.shards, a 2-layer Llama config."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from distill.chat.template import train_tokenizer
from distill.messages import Trace
from distill.recipe.schema import ModelArch, TrainConfig
from distill.shards import ShardWriter

ARCH = ModelArch(
    hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=512
)


def tool_trace() -> list[dict]:
    """Two user turns; the first uses a tool over two assistant messages."""
    return [
        {"role": "system", "content": "You are a calculator agent."},
        {"role": "user", "content": "What is 12 * 7?"},
        {
            "role": "assistant",
            "reasoning_content": "I should call the calculator.",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "calc", "arguments": json.dumps({"expr": "12*7"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "84"},
        {"role": "assistant", "reasoning_content": "The tool said 84.", "content": "12 * 7 = 84."},
        {"role": "user", "content": "And plus 1?"},
        {"role": "assistant", "reasoning_content": "84 + 1 = 85.", "content": "85"},
    ]


def math_trace(i: int, rng: random.Random) -> list[dict]:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    steps = " ".join(f"step {k}: carry {a + k}." for k in range(rng.randint(0, 6)))
    return [
        {"role": "user", "content": f"Problem {i}: what is {a} + {b}?"},
        {
            "role": "assistant",
            "reasoning_content": f"Add {a} and {b}. {steps}",
            "content": f"{a + b}",
        },
    ]


def corpus(n: int = 40, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [math_trace(i, rng) for i in range(n)] + [tool_trace()]


def make_tokenizer(out_dir: Path, vocab_size: int = 400):
    texts = []
    for msgs in corpus():
        texts += [
            str(m.get("content") or "") + " " + str(m.get("reasoning_content") or "") for m in msgs
        ]
    texts.append(json.dumps({"name": "calc", "arguments": {"expr": "12*7"}}))
    return train_tokenizer(texts, vocab_size, out_dir)


def write_shards(directory: Path, domain: str, traces: list[list[dict]], topk=None) -> Path:
    with ShardWriter(directory, max_rows=16) as w:
        w.write(
            Trace(
                id=f"{domain}-{i}",
                task_id=f"{domain}-{i}",
                domain=domain,
                messages=m,
                topk=None if topk is None else topk[i],
            )
            for i, m in enumerate(traces)
        )
    return directory


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        learning_rate=3e-3,
        warmup_steps=2,
        max_steps=6,
        batch_tokens=512,
        micro_batch_tokens=256,
        max_length=128,
        logging_steps=1,
        precision="fp32",
    )
    base.update(kw)
    return TrainConfig(**base)


def domain_data(tok, name: str, traces: list[list[dict]]):
    """DomainData built in memory from rendered traces (no cache)."""
    import numpy as np

    from distill.chat.render import render_trace
    from distill.train.data import DomainData

    exs = [ex for t in traces for ex in render_trace(tok, t)]
    lens = [len(e.input_ids) for e in exs]
    return DomainData(
        name,
        np.concatenate([e.input_ids for e in exs]).astype(np.int32),
        np.concatenate([e.loss_mask for e in exs]).astype(np.uint8),
        np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
    )


def tiny_model(tok, seed: int = 0):
    import torch

    from distill.models import build_model

    torch.manual_seed(seed)
    return build_model(ARCH, tok, seed).float()


def tensors(batch: dict):
    import torch

    return {k: torch.from_numpy(v) for k, v in batch.items()}


def trace_ce(model, dd, i: int):
    """Per-token cross-entropy of example ``i`` of ``dd`` run through ``model`` alone: the
    reference a packed or flattened batch must reproduce."""
    import torch
    import torch.nn.functional as F

    s, e = dd.offsets[i], dd.offsets[i + 1]
    ids = torch.tensor(dd.ids[s:e], dtype=torch.long)[None]
    mask = torch.tensor(dd.mask[s:e][1:], dtype=torch.bool)
    logits = model(ids).logits[0, :-1][mask].float()
    return F.cross_entropy(logits, ids[0, 1:][mask], reduction="none")


def per_trace_loss_sum(model, dd, idx) -> float:
    """Summed cross-entropy of the examples ``idx``, each run alone."""
    return sum(trace_ce(model, dd, i).sum().item() for i in idx)


def segment_sdpa(q, k, v, cu, max_len, scale):
    """What torch.nn.attention.varlen computes: causal attention inside each segment."""
    import torch

    assert int((cu[1:] - cu[:-1]).max()) <= max_len
    rep = q.shape[1] // k.shape[1]
    out = torch.full_like(q, float("nan"))
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        out[s:e] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale
        ).transpose(0, 1)
    return out


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that imports this checkout: the repository first
    on PYTHONPATH, ahead of what the caller has there (wheels a host carries that way), not
    in its place."""
    root = str(Path(__file__).parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}

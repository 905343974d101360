"""Build and load the models and tokenizers the trainer works on.

A model built from scratch is a Llama-style causal LM (transformers), sized by the
recipe's :class:`~distill.recipe.schema.ModelArch` and by the tokenizer's vocabulary. Anything
else is an HF model directory, loaded with its own tokenizer and chat template.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

import torch

from distill.errors import UserError
from distill.files import short_hash
from distill.recipe.schema import ModelArch


def load_tokenizer(path: str | Path):
    """The tokenizer of an HF directory; it must be fast and carry a chat template."""
    from transformers import AutoTokenizer

    from distill.dsa import register

    # AutoTokenizer reads the directory's config.json: an unregistered model type there (a
    # DSA student's) makes transformers fall back to a base config with a warning
    register()
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: tokenizer directory not found")
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if not getattr(tok, "chat_template", None):
        raise UserError(f"{p}: tokenizer has no chat template (set tokenizer.chat_template)")
    if not getattr(tok, "is_fast", False):
        raise UserError(f"{p}: a fast tokenizer is needed (loss masks use token offsets)")
    return tok


def end_token_id(tokenizer) -> int:
    """The id that ends an assistant turn: eos of the tokenizer."""
    if tokenizer.eos_token_id is None:
        raise UserError("tokenizer has no eos token: cannot stop generation or mask turns")
    return int(tokenizer.eos_token_id)


def pad_token_id(tokenizer) -> int:
    return int(
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_token_id(tokenizer)
    )


def build_model(arch: ModelArch, tokenizer, seed: int = 0, attn_implementation: str = "sdpa"):
    """A Llama-style causal LM from scratch; vocabulary and special ids from ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = arch.num_heads
    if arch.hidden_size % heads:
        raise UserError(
            f"arch.hidden_size {arch.hidden_size} is not a multiple of num_heads {heads}"
        )
    kv = arch.num_kv_heads or heads
    if heads % kv:
        raise UserError(f"arch.num_heads {heads} is not a multiple of num_kv_heads {kv}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size or 4 * arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        initializer_range=arch.initializer_range,
        pad_token_id=pad_token_id(tokenizer),
        eos_token_id=end_token_id(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        attn_implementation=attn_implementation,
    )
    # the seed alone fixes the initial weights, whatever ran before in this process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    set_generation_config(model, tokenizer)
    return model


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
):
    """An HF causal LM directory; a clear error when it is missing or not a causal LM."""
    from transformers import AutoModelForCausalLM

    from distill.dsa import register

    register()  # a DSA student's model type (distill/dsa/)
    p = Path(path)
    if not (p / "config.json").exists():
        raise UserError(f"{p}: not an HF model directory (no config.json)")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: cannot load a causal LM ({str(e).splitlines()[0]})") from None


def enable_checkpointing(model) -> None:
    """transformers' activation checkpointing on every decoder layer, non-reentrant (the
    reentrant kind needs an input that requires grad, which a frozen embedding's is not).
    transformers 5.23 renamed it ``activation_checkpointing_enable`` and warns on the old
    name on every call; earlier versions have the old name only."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


VARLEN = "distill_varlen"


def varlen_supported() -> bool:
    """PyTorch's own flash-attention varlen kernel is there (torch >= 2.10 on CUDA). (On
    CPU the segments go through SDPA one by one, :func:`_segment_sdpa`.)"""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def use_varlen_attention(model) -> None:
    """Attention over one flattened row of packed traces: each layer receives the trace
    boundaries (``cu_seq_lens_q``, ``max_length_q``) and calls varlen attention, so no
    mask is built and no padding between rows is computed. transformers builds no mask
    for an attention it has no mask function for."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, _varlen_attention)
    model.config._attn_implementation = VARLEN


@torch.compiler.disable  # the boundaries change every batch: a compiled layer breaks here
def _varlen_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        raise RuntimeError(
            f"{VARLEN} attention needs one flattened row and its cu_seq_lens_q "
            "(distill.train.data.collate(..., flat=True))"
        )
    # rotary embeddings leave q and k in fp32 under autocast, and a custom op is not cast
    # for us: the kernel gets the autocast dtype (flash attention runs in fp16/bf16 only)
    dev = query.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else query.dtype
    # [1, heads, T, D] -> [T, heads, D], the layout of the varlen kernel
    q, k, v = (
        x[0].transpose(0, 1).to(dtype=dtype, memory_format=torch.contiguous_format)
        for x in (query, key, value)
    )
    out = _varlen_kernel(q, k, v, cu, int(kwargs["max_length_q"]), scaling)
    return out.unsqueeze(0), None


def _varlen_kernel(q, k, v, cu, max_len: int, scale: float | None) -> torch.Tensor:
    """Causal attention within each segment of ``cu``; q [T, H, D], k and v [T, Hkv, D]."""
    if q.device.type == "cpu" or q.dtype not in (torch.float16, torch.bfloat16):
        # the flash kernel takes fp16/bf16 only: an fp32 run on the GPU that asks for this
        # path (DISTILL_ATTN; the trainer's own choice avoids it) gets the exact SDPA one
        return _segment_sdpa(q, k, v, cu, scale)
    from torch.nn.attention.varlen import varlen_attn

    kw = dict(_varlen_kwargs())
    if "enable_gqa" in kw:
        kw["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:  # older torch: repeat the kv heads, as transformers does
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    if "scale" in kw:
        kw["scale"] = scale
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


def _segment_sdpa(q, k, v, cu, scale: float | None) -> torch.Tensor:
    """The CPU kernel (and fp32 on a GPU): causal SDPA on each segment alone, segments of
    similar length batched. A packed row under SDPA with a block-diagonal mask computes
    every query against every key of the row (a 512-token row of 60-token traces: 8x the
    work); segments alone need no mask at all, SDPA's fast path.

    Segments are grouped by length (within a factor of two) and right-padded into one
    contiguous [segments, heads, length, dim] batch per group: with ``is_causal`` a real
    query sees only the keys before it, never the padding after, so the result is exact.
    One call per group instead of one per segment, on contiguous tensors: forward and
    backward of a 1,024-token row of 40 traces took 9.7 ms instead of 40 ms per layer
    (one row of one trace: 80 instead of 158 ms), one CPU thread."""
    t, h = q.shape[0], q.shape[1]
    lens, starts = (cu[1:] - cu[:-1]).tolist(), cu[:-1].tolist()
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        if n > 0:
            groups.setdefault((n - 1).bit_length(), []).append(i)
    qp, kp, vp = (torch.cat([x, x.new_zeros(1, *x.shape[1:])]) for x in (q, k, v))  # row t: pad
    outs, where = [], []
    dev = q.device  # the GPU's fp32 fallback too: indices where the rows are
    for ids in groups.values():
        width = torch.arange(max(lens[i] for i in ids), device=dev)[None, :]
        valid = width < torch.tensor([lens[i] for i in ids], device=dev)[:, None]
        start = torch.tensor([starts[i] for i in ids], device=dev)[:, None]
        idx = torch.where(valid, start + width, t)
        o = torch.nn.functional.scaled_dot_product_attention(
            *(x[idx].transpose(1, 2) for x in (qp, kp, vp)),
            is_causal=True,
            scale=scale,
            enable_gqa=k.shape[1] != h,
        )
        outs.append(o.transpose(1, 2)[valid])
        where.append(idx[valid])
    pos = torch.cat(where)
    order = torch.empty_like(pos)
    order[pos] = torch.arange(len(pos), device=dev)
    return torch.cat(outs)[order]


@functools.cache
def _varlen_kwargs() -> tuple:
    """The keyword arguments this torch's varlen_attn takes (its signature changed from
    2.9's is_causal to window_size, then gained enable_gqa)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw: list[tuple[str, object]] = [
        ("is_causal", True) if "is_causal" in params else ("window_size", (-1, 0))
    ]
    kw += [(n, None) for n in ("enable_gqa", "scale") if n in params]
    return tuple(kw)


def set_generation_config(model, tokenizer) -> None:
    """Generation stops at the end-of-turn token and pads with the tokenizer's pad."""
    gc = model.generation_config
    gc.eos_token_id = end_token_id(tokenizer)
    gc.pad_token_id = pad_token_id(tokenizer)
    gc.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = gc.eos_token_id
    model.config.pad_token_id = gc.pad_token_id


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, special tokens and chat template (what rendering depends on)."""
    blob = json.dumps(
        {
            "vocab": sorted(tokenizer.get_vocab().items()),
            "template": tokenizer.chat_template,
            "eos": tokenizer.eos_token,
        },
        sort_keys=True,
    )
    return short_hash(blob)


def describe_vocab(tokenizer, where: str | Path | None = None) -> str:
    """Short name of a vocabulary for error messages."""
    name = str(where) if where else getattr(tokenizer, "name_or_path", "?")
    return f"{name} (vocab {len(tokenizer)}, {tokenizer_fingerprint(tokenizer)})"

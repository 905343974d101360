"""The forward pass of a Llama-family decoder (Llama, Qwen2, Qwen3) for decoding, written
against the live model's own parameters and our own KV buffers.

transformers' forward is what the dynamic-cache path runs; the static path runs this one
because decoding one token per row wants what that forward does not give under
``torch.compile``: the query heads of a KV group packed as rows of one attention call (the
compiled transformers path repeats the KV cache for every query head, every step), no
cache or mask objects whose Python state breaks a captured graph, and plain functions of
tensors, so one compiled function serves every layer. Each function mirrors the
transformers module it replaces op for op, and reads the parameters in place: an
optimizer step on the live model is seen by the next decode. ``tests/test_llama_decode.py``
compares it with transformers (CPU; float64 to rounding, float32 to 5e-5) on random
two-query-heads-per-KV-head Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Llama (attention
and MLP biases): a padded prefill and one-token steps (the packed-GQA branch), and
StaticDecoder's greedy tokens against ``generate``; bf16 and the compiled path are not.
A DSA student (``distill.dsa``) adds its indexer (``index_in``: the model's own
``index_projections``) and each query's top-k keys (``select_step``, ``select_prefill``),
tested against ``generate`` and the reference selection on the CPU. On a GPU the step
scores and selects in Triton kernels (``select_keys``) and attends over the selected rows
in place (``sparse_attn_out``), ``distill.dsa.decode_kernel``'s flags: the same keys, no
gathered copies. The compiled, graphed step has a GPU test with and without them, and
with fp8 index keys (``INDEX_FP8``): all passed on one H100, 2026-12-07 05:22 UTC; and
with int8 K and V (``KV_INT8``) at 11:14 UTC.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.dsa import attention as A
from distill.dsa import decode_kernel
from distill.dsa.config import INDEXED_LAYER_NAMES
from distill.dsa.config import MODEL_TYPE as DSA_TYPE
from distill.dsa.model import index_projections

FAMILY = ("llama", "qwen2", "qwen3", DSA_TYPE)
# a DSA step's cached index keys in fp8 with one fp32 scale a key rather than in the
# model's dtype: 68 bytes a key of 64 dimensions against 128 (V3.2's indexer computes in
# fp8); its scores round the keys to e4m3's 3-bit mantissa, so the top-k may differ from
# the model's own near ties (the prompt's own selection, at prefill, still reads the
# unrounded keys). On one H100 (2026-12-07, Qwen2 shape, 32k, batch 32) it cuts the cache
# from 16.2 to 14.7 GB (dense 13.0) and its scores kernel from 49 to 32 µs a layer; the
# step took 5.58-5.86 ms against 5.30-5.99 at 05:22 (three runs), 5.22-5.23 against
# 5.33-5.37 at 10:26 (three runs, interleaved). Off: a near tie can select other keys
# than the training forward does, and RL rollouts decode here (the config's cache_8bit
# turns it on for a served model)
INDEX_FP8 = False
# a DSA step's cached K and V in int8 too, with one fp32 scale a row a KV head (V3.2
# decodes from an 8-bit cache; FlashMLA's sparse kernel dequantizes only the selected
# rows): with INDEX_FP8, 340 bytes a token a layer at the Qwen2 shape against the bf16
# cache's 640 (dense: 512). The prompt's own attention reads the unrounded K and V; every
# step reads the rounded ones (decode_kernel.decode_attention applies the scales, or the
# torch step dequantizes the gathered rows). Dense layers (a buffer no longer than top_k)
# keep the model's dtype: their attention reads every row. int8, not V3.2's e4m3: a row's
# entries sit within a decade of its largest, where int8 keeps 7 bits and e4m3 3; on the
# demo's DSA student (CPU, 200 tasks a domain, one run each) e4m3 K and V cost 2.5 points
# of math and int8 ones none (no task's outcome changed in 600; BENCHMARKS.md). On one
# H100 (2026-12-07, Qwen2 shape, 32k, batch 32, four runs) 2.39-2.43x dense with 8.6
# against 13.0 GB of cache.
# Off by default: rounded K and V are not the model the trainer trains (RL rollouts
# decode here).
KV_INT8 = False
FP8 = torch.float8_e4m3fn


def supported(model) -> bool:
    """Whether this forward can run ``model``: a Llama-family model with SiLU MLPs, full
    attention in every layer (or a DSA student's indexed attention), no unmerged LoRA
    adapters (they add to a projection's output; this forward reads the weights), and a K
    projection of the config's full shape (a tensor-parallel shard fails that; an FSDP2
    DTensor, which reports its global shape, does not)."""
    c = model.config
    if getattr(c, "model_type", None) not in FAMILY or getattr(c, "hidden_act", None) != "silu":
        return False
    full = INDEXED_LAYER_NAMES if c.model_type == DSA_TYPE else ("full_attention",)
    if getattr(c, "use_sliding_window", False) or any(
        t not in full for t in getattr(c, "layer_types", None) or []
    ):
        return False
    if any(hasattr(m, "lora_A") for m in model.modules()):
        return False  # peft adapters: the forward here reads the weights without them
    base = getattr(model, "model", None)
    if base is None or not all(
        hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")
    ):
        return False
    a = base.layers[0].self_attn
    return a.k_proj.weight.shape == (c.num_key_value_heads * a.head_dim, c.hidden_size)


class Layer(NamedTuple):
    """One decoder layer's parameters (detached views: same storage as the model's)."""

    attn_in: tuple  # arguments of attn_in after (x, cos, sin)
    attn_out: tuple  # arguments of attn_out after (x, q, k, v, mask)
    # a DSA layer's: arguments of index_in after (x, cos, sin), and how many keys each
    # query reads (0: every key, a dense layer's or a DSA layer in its dense warm-up)
    index: tuple | None = None
    top_k: int = 0


class Dims(NamedTuple):
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float


def dims(model) -> Dims:
    c, a = model.config, model.model.layers[0].self_attn
    return Dims(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                a.head_dim, float(a.scaling))  # fmt: skip


def _t(p: Tensor | None) -> Tensor | None:
    return None if p is None else p.detach()


def layers(model) -> list[Layer]:
    """Every layer's parameters, read from the model now (so the live ones)."""
    d = dims(model)
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)  # Qwen3
        out.append(
            Layer(
                attn_in=(
                    _t(ln1.weight), ln1.variance_epsilon,
                    _t(a.q_proj.weight), _t(a.q_proj.bias),
                    _t(a.k_proj.weight), _t(a.k_proj.bias),
                    _t(a.v_proj.weight), _t(a.v_proj.bias),
                    _t(qn.weight) if qn is not None else None,
                    _t(kn.weight) if kn is not None else None,
                    qn.variance_epsilon if qn is not None else 0.0,
                    d.heads, d.kv_heads, d.head_dim,
                ),
                attn_out=(
                    d.scaling, _t(a.o_proj.weight), _t(a.o_proj.bias),
                    _t(ln2.weight), ln2.variance_epsilon,
                    _t(m.gate_proj.weight), _t(m.gate_proj.bias),
                    _t(m.up_proj.weight), _t(m.up_proj.bias),
                    _t(m.down_proj.weight), _t(m.down_proj.bias),
                ),
                **_index(a, ln1),
            )
        )  # fmt: skip
    return out


def _index(a, ln) -> dict:
    """A DSA layer's indexer parameters (``Indexer``'s) and top-k; nothing for a dense one."""
    ix = getattr(a, "indexer", None)
    if ix is None:
        return {}
    own = tuple(_t(x) if isinstance(x, Tensor) else x for x in ix.arguments())
    return dict(index=(_t(ln.weight), ln.variance_epsilon, *own), top_k=0 if a.dense else a.top_k)


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attn_in(
    x, cos, sin, ln_w, eps, q_w, q_b, k_w, k_b, v_w, v_b, qn_w, kn_w, qk_eps, heads, kv_heads, hd
) -> tuple[Tensor, Tensor, Tensor]:
    """Input norm, q/k/v projections (Qwen3's q/k norms) and rotary: q [B, H, T, D],
    k and v [B, Hkv, T, D]."""
    b, t, _ = x.shape
    h = rms_norm(x, ln_w, eps)
    q = F.linear(h, q_w, q_b).view(b, t, heads, hd)
    k = F.linear(h, k_w, k_b).view(b, t, kv_heads, hd)
    v = F.linear(h, v_w, v_b).view(b, t, kv_heads, hd).transpose(1, 2)
    if qn_w is not None:
        q, k = rms_norm(q, qn_w, qk_eps), rms_norm(k, kn_w, qk_eps)
    return _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin), v


def attn_in_int8(x, cos, sin, *args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`attn_in` for int8 caches: q, int8 K and V (:func:`quantize_int8`) and their
    scales stacked [B, Hkv, T, 2] (K's, V's), what the cache holds. One compiled function
    with the projections, so the quantization can fuse into their kernels (the first
    version quantized outside the compiled functions, a few small kernels a tensor and
    layer: its step took 6.40-6.48 ms against 5.22-5.23 with bf16 K and V, one H100,
    2026-12-07 10:26-10:31 UTC, three runs; this one 5.20-5.26 against 5.06-5.07, four
    and two runs, 11:15-11:20 UTC)."""
    q, k, v = attn_in(x, cos, sin, *args)
    (k8, ks), (v8, vs) = quantize_int8(k), quantize_int8(v)
    return q, k8, v8, torch.stack((ks, vs), -1)


def index_in_fp8(x, cos, sin, ln_w, eps, *index) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`index_in` with its keys quantized: ``qi``, fp8 ``ki``, their scales, ``w``."""
    qi, ki, w = index_in(x, cos, sin, ln_w, eps, *index)
    return qi, *quantize_fp8(ki), w


def index_in(x, cos, sin, ln_w, eps, *index) -> tuple[Tensor, Tensor, Tensor]:
    """The lightning indexer on the layer's input: its input norm, then
    ``distill.dsa.model.index_projections`` (the model's own), ``index`` being
    ``Indexer.arguments()``: ``qi`` [B, T, Hi, Di], ``ki`` [B, T, Di], ``w`` [B, T, Hi]."""
    return index_projections(rms_norm(x, ln_w, eps), cos, sin, *index)


def quantize_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows [..., D] -> fp8 (e4m3) rows and one fp32 scale a row [...]: the row divided by
    its largest magnitude over 448 (e4m3's largest), as V3.2's indexer caches its keys.
    An index key's scores are its scale times those of its fp8 key (the scale is
    positive, so it passes the ReLU), which is how :func:`select_keys` applies it."""
    kf = x.float()
    scale = kf.abs().amax(-1).clamp_min(1e-30) / torch.finfo(FP8).max
    return (kf / scale[..., None]).to(FP8), scale


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows [..., D] -> int8 rows and one fp32 scale a row [...]: the row divided by its
    largest magnitude over 127, rounded to the nearest integer. A K row's attention scores
    are its scale times those of its int8 row, a V row's contribution likewise
    (:func:`dequantize_rows`)."""
    kf = x.float()
    scale = kf.abs().amax(-1).clamp_min(1e-30) / 127
    return (kf / scale[..., None]).round().to(torch.int8), scale


def select_keys(qi, ki, w, valid, top_k: int, ks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One new token per row: its ``top_k`` valid keys by index score (``ki`` [B, S, Di]
    the cached index keys, ``valid`` [B, S]) as the model's attention picks them
    (``attention.topk_indices``: ties to the later key): ``idx`` and ``ok`` [B, 1, K].
    ``ks`` [B, S]: the keys' scales where ``ki`` is fp8 (:func:`quantize_fp8`)."""
    if decode_kernel.use_decode_kernel(qi):  # the same scores and keys, in Triton kernels
        scores = decode_kernel.decode_scores(qi, ki, w, ks)
        return decode_kernel.decode_topk(scores, valid, top_k)
    scores = A.index_scores(qi, ki, w)
    if ks is not None:
        scores = scores * ks[:, None]
    return A.topk_indices(scores, valid[:, None], top_k)  # [B, 1, K]


def select_step(
    qi, ki, w, valid, k, v, top_k: int, ks=None, kv_scale=None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`select_keys`, then those keys' K and V rows gathered, [B, Hkv, K, D] (in
    ``qi``'s dtype where the caches are int8 with scales ``kv_scale`` [B, Hkv, S, 2], K's
    and V's), and the mask [B, 1, 1, K] for :func:`attn_out`. Only the selected K and V
    rows are read: what makes a step cheaper than dense attention's."""
    idx, ok = select_keys(qi, ki, w, valid, top_k, ks)
    b, hkv, _, d = k.shape
    at = idx.reshape(b, 1, -1, 1).expand(b, hkv, idx.shape[-1], d)
    if kv_scale is None:
        return k.gather(2, at), v.gather(2, at), ok[:, None]
    sc = kv_scale.gather(2, at[..., :2])  # [B, Hkv, K, 2]
    kg = dequantize_rows(k.gather(2, at), sc[..., 0], qi.dtype)
    vg = dequantize_rows(v.gather(2, at), sc[..., 1], qi.dtype)
    return kg, vg, ok[:, None]


def dequantize_rows(x8: Tensor, scale: Tensor, dtype) -> Tensor:
    """8-bit rows [..., D] and their scales [...] (:func:`quantize_int8`,
    :func:`quantize_fp8`) -> ``dtype``."""
    return (x8.float() * scale[..., None]).to(dtype)


def select_prefill(qi, ki, w, mask, top_k: int, budget: int = 1 << 24) -> Tensor:
    """A prompt's queries: ``mask`` [B, 1, T, S] (what each may read) narrowed to its
    ``top_k`` keys by index score, scored in query chunks of about ``budget`` entries."""
    allowed = mask[:, 0]
    step = max(1, budget // max(1, allowed.shape[0] * allowed.shape[-1]))
    out = [
        A.select(A.index_scores(qi[:, a : a + step], ki, w[:, a : a + step]),
                 allowed[:, a : a + step], top_k)
        for a in range(0, allowed.shape[1], step)
    ]  # fmt: skip
    return torch.cat(out, 1)[:, None]


def attn_out(
    x, q, k, v, mask, scaling, o_w, o_b, ln_w, eps, gate_w, gate_b, up_w, up_b, down_w, down_b
) -> Tensor:
    """Attention of q [B, H, T, D] over k, v [B, Hkv, S, D] (mask [B, 1, T, S], True =
    attend), output projection, residual, and the MLP block."""
    b, heads, t, hd = q.shape
    rep = heads // k.shape[1]
    if t == 1:  # one new token: a KV group's query heads are the rows of one attention
        a = F.scaled_dot_product_attention(
            q.reshape(b, k.shape[1], rep, hd), k, v, attn_mask=mask, scale=scaling
        )
        a = a.reshape(b, 1, heads * hd)
    else:
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        a = a.transpose(1, 2).reshape(b, t, heads * hd)
    return _out_mlp(x, a, o_w, o_b, ln_w, eps, gate_w, gate_b, up_w, up_b, down_w, down_b)


def sparse_attn_out(
    x, q, k, v, idx, ok, kv_scale, scaling, o_w, o_b, ln_w, eps, gate_w, gate_b, up_w, up_b,
    down_w, down_b,
) -> Tensor:  # fmt: skip
    """:func:`attn_out` for one new token over its selected keys (``idx``, ``ok`` [B, 1, K]
    of :func:`select_keys`), read in place from the caches ``k``, ``v`` [B, Hkv, S, D] by
    ``decode_kernel.decode_attention``: no gathered copies (int8 caches: their scales
    ``kv_scale`` [B, Hkv, S, 2]; else None)."""
    b, heads, _, hd = q.shape
    a = decode_kernel.decode_attention(q, k, v, idx, ok, scaling, kv_scale)
    a = a.reshape(b, 1, heads * hd)
    return _out_mlp(x, a, o_w, o_b, ln_w, eps, gate_w, gate_b, up_w, up_b, down_w, down_b)


def _out_mlp(x, a, o_w, o_b, ln_w, eps, gate_w, gate_b, up_w, up_b, down_w, down_b) -> Tensor:
    """The attention's output projection, the residual, and the MLP block."""
    x = x + F.linear(a, o_w, o_b)
    h = rms_norm(x, ln_w, eps)
    return x + F.linear(
        F.silu(F.linear(h, gate_w, gate_b)) * F.linear(h, up_w, up_b), down_w, down_b
    )


def rope_tables(model, length: int, device, dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [length, D] of positions 0..length-1 (what the model's rotary module gives
    for each position: one product per entry, so gathering rows is exact)."""
    pos = torch.arange(length, device=device)[None]
    cos, sin = model.model.rotary_emb(torch.empty(1, device=device, dtype=dtype), pos)
    return cos[0], sin[0]

"""The DSA student: transformers' Llama with a lightning indexer in every attention layer.

Everything but attention is Llama's own (embeddings, MLPs, norms, RoPE, the LM head,
``get_decoder`` / ``get_output_embeddings``, generation), so a dense student converts by
loading its weights unchanged (:func:`from_dense`); only the indexer is new.

An attention layer works on what the caller hands it:

- a flat row of packed traces (``cu_seq_lens_q``, the trainer's path): each trace alone,
  :func:`~distill.dsa.attention.dsa_varlen_reference` on CPU, the chunked GPU path of
  :mod:`distill.dsa.kernels` on CUDA (``DISTILL_DSA_IMPL=reference|chunked`` overrides);
- rows with a mask and maybe a cache (eval, serve, RL, ``generate``): queries in chunks,
  each reading the gathered top-k keys; the indexer's keys live in the cache beside K/V
  (transformers' ``DynamicIndexedLayer``, chosen by ``layer_types``: see ``indexed_layer_type``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)

from distill.dsa import attention as A
from distill.dsa.config import DSAConfig

SCORE_BUDGET = 1 << 26  # score entries per query chunk of the batch path (256 MB in fp32)


class Indexer(nn.Module):
    """The lightning indexer: ``Hi`` query heads and one key head of width ``Di`` from the
    layer's input, RoPE on the first ``rope_dim`` dims, and one weight per query head from
    the input (V3.2's ``weights_proj``, scaled by ``Hi^-1/2 · Di^-1/2``). V3.2 takes its
    queries from MLA's compressed query and scores in FP8 after a Hadamard rotation; a
    Llama layer has no compressed query, and the rotation only serves FP8 (it keeps dot
    products), so here queries come from the input and scores are bf16/fp32."""

    def __init__(self, config: DSAConfig):
        super().__init__()
        hd = config.head_dim or config.hidden_size // config.num_attention_heads
        self.n_heads, self.head_dim, self.rope_dim = (
            config.index_n_heads,
            config.index_head_dim,
            config.rope_dim,
        )
        r = self.rope_dim
        if r % 2 or r > self.head_dim or r > hd:
            raise ValueError(
                f"index_rope_dim {r}: must be even and at most index_head_dim "
                f"({self.head_dim}) and head_dim ({hd})"
            )
        # every step-th of the model's RoPE frequencies: r/2 of them spanning its spectrum
        self.step = (hd // 2) // max(1, r // 2)
        h = config.hidden_size
        self.wq = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(h, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(h, self.n_heads, bias=False)
        self.scale = (self.n_heads * self.head_dim) ** -0.5

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``qi`` [B, T, Hi, Di], ``ki`` [B, T, Di], ``w`` [B, T, Hi]."""
        return index_projections(x, cos, sin, *self.arguments())

    def arguments(self) -> tuple:
        """:func:`index_projections`' arguments after ``(x, cos, sin)``: the parameters
        and the shape."""
        kn = self.k_norm
        return (
            self.wq.weight, self.wk.weight, kn.weight, kn.bias, kn.eps,
            self.weights_proj.weight, self.scale, self.n_heads, self.head_dim, self.rope_dim,
            self.step,
        )  # fmt: skip


def index_projections(
    x, cos, sin, q_w, k_w, kn_w, kn_b, kn_eps, w_w, scale, heads, hd, rope, step
) -> tuple[Tensor, Tensor, Tensor]:
    """The indexer on the layer's normed input ``x`` [B, T, hidden], its parameters given:
    one definition for :class:`Indexer` and the static decoder's step
    (``distill.backends.llama_decode.index_in``), which passes the live parameters."""
    b, t, _ = x.shape
    q = F.linear(x, q_w).view(b, t, heads, hd)
    k = F.layer_norm(F.linear(x, k_w), (hd,), kn_w, kn_b, kn_eps)
    if rope:
        half = cos.shape[-1] // 2
        c = cos[..., :half:step][..., : rope // 2]
        s = sin[..., :half:step][..., : rope // 2]
        c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
        qr = q[..., :rope] * c[:, :, None] + rotate_half(q[..., :rope]) * s[:, :, None]
        kr = k[..., :rope] * c + rotate_half(k[..., :rope]) * s
        q = torch.cat([qr.to(q.dtype), q[..., rope:]], -1)
        k = torch.cat([kr.to(k.dtype), k[..., rope:]], -1)
    return q, k, F.linear(x, w_w) * scale


class DSAAttention(LlamaAttention):
    """Llama attention reading each query's top-k keys by the indexer's score.

    ``dense`` (set for the warm-up): attention over every key, as the dense model.
    ``want_loss`` (set by the trainer's DSA objective): in training, keep this layer's
    indexer KL, summed over the batch's tokens, in ``index_loss``. The indexer reads the
    layer input detached, so its loss never reaches the main model."""

    def __init__(self, config: DSAConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.indexer = Indexer(config)
        self.top_k = config.index_top_k
        self.dense = False
        self.want_loss = False
        self.index_loss: Tensor | None = None

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        cache = cache if cache is not None else past_key_values  # transformers 5 / 4 names
        b, t = hidden_states.shape[:2]
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        qi, ki, w = self.indexer(hidden_states.detach(), cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
            ki = _update_indexer(cache, ki, self.layer_idx)
        loss = self.want_loss and self.training
        cu = kwargs.get("cu_seq_lens_q")
        fresh = k.shape[2] == t  # no earlier keys in a cache: positions restart per trace
        if cu is not None and fresh:
            if b != 1:
                raise RuntimeError("DSA with cu_seq_lens_q needs one flattened row")
            out, kl = self._varlen(q, k, v, qi, ki, w, cu, kwargs.get("max_length_q"), loss)
        else:
            allowed = _allowed(attention_mask, kwargs, b, t, k.shape[2], q.device)
            out, kl = self._rows(q, k, v, qi, ki, w, allowed, loss)
        self.index_loss = kl
        out = out.reshape(b, t, -1).contiguous()
        return self.o_proj(out), None

    # eager inside a compiled layer (train.torch_compile compiles each decoder layer), as
    # the dense varlen attention is: the selection reads trace boundaries and lengths on
    # the host; traced, the reference path compiled a new graph for every batch's packing
    # and the interpreted Triton kernels could not be traced (likely why the GPU student's
    # DSA phases had not finished after 440 s on one H100, 2026-12-06)
    @torch.compiler.disable
    def _varlen(self, q, k, v, qi, ki, w, cu, max_len, loss):
        """One flat row: [1, H, T, D] -> [1, T, H, D]."""
        impl = os.environ.get("DISTILL_DSA_IMPL") or ("chunked" if q.is_cuda else "reference")
        dev = q.device.type
        if impl != "reference" and torch.is_autocast_enabled(dev):
            # RoPE leaves q and k in fp32 under autocast; the kernels want one half dtype
            dtype = torch.get_autocast_dtype(dev)
            q, k, v, qi, ki = (x.to(dtype) for x in (q, k, v, qi, ki))
        flat = [x[0].transpose(0, 1) for x in (q, k, v)]
        args = (*flat, qi[0], ki[0], w[0], cu, self.top_k, self.scaling)
        if impl == "reference":
            out, kl = A.dsa_varlen_reference(*args, dense=self.dense, loss=loss)
        else:
            from distill.dsa.kernels import dsa_varlen

            out, kl = dsa_varlen(*args, dense=self.dense, loss=loss, max_len=max_len)
        return out.unsqueeze(0), kl

    @torch.compiler.disable  # the same for rows: chunk counts and top-k follow the shapes
    def _rows(self, q, k, v, qi, ki, w, allowed, loss):
        """Rows (maybe with a cache) and what each query may read [B, Tq, Tk]:
        [B, H, Tq, D] -> [B, Tq, H, D]."""
        b, _, tq, _ = q.shape
        tk = k.shape[2]
        if loss:
            out, kl = A.dsa_attention(
                q, k, v, qi, ki, w, allowed, self.top_k, self.scaling, dense=self.dense, loss=True
            )
            return out.transpose(1, 2), (kl * allowed.any(-1)).sum()
        # queries in chunks: the scores of a long prefill never exist all at once
        step = max(1, SCORE_BUDGET // max(1, b * max(q.shape[1], qi.shape[2]) * tk))
        outs = []
        for c in range(0, tq, step):
            sl = slice(c, c + step)
            al = allowed[:, sl]
            if self.dense or tk <= self.top_k:  # every allowed key is selected
                outs.append(A.attend(q[:, :, sl], k, v, al, self.scaling))
                continue
            scores = A.index_scores(qi[:, sl], ki, w[:, sl])
            idx, ok = A.topk_indices(scores, al, self.top_k)
            outs.append(A.attend_gathered(q[:, :, sl], k, v, idx, ok, self.scaling))
        return torch.cat(outs, dim=2).transpose(1, 2), None


def _allowed(attention_mask, kwargs: dict, b: int, t: int, tk: int, device) -> Tensor:
    """What each query may read [B, Tq, Tk], built once per forward: every layer gets the
    same mask and positions, and :class:`DSAModel` hands them all one dict
    (``dsa_masks``) where the first layer leaves it for the others."""
    masks = kwargs.get("dsa_masks")
    if masks is not None and tk in masks:
        return masks[tk]
    allowed = A.allowed_from_mask(attention_mask, b, t, tk, device)
    pos = kwargs.get("position_ids")
    if tk == t and pos is not None:
        # no earlier keys in a cache: packed rows under any mask (or none, as flash
        # attention gets), so no attention and no top-k across a trace boundary
        allowed = allowed & A.same_trace(pos.expand(b, t))
    if masks is not None:
        masks[tk] = allowed
    return allowed


def _update_indexer(cache, ki: Tensor, layer_idx: int) -> Tensor:
    if not hasattr(cache, "update_indexer"):
        raise RuntimeError(
            f"{type(cache).__name__} keeps no indexer keys: DSA decoding needs transformers' "
            "DynamicCache/StaticCache with DynamicIndexedLayer (transformers >= 5.14.1)"
        )
    return cache.update_indexer(ki, layer_idx)


class DSADecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: DSAConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = DSAAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DSAPreTrainedModel(LlamaPreTrainedModel):
    config_class = DSAConfig
    config: DSAConfig
    _no_split_modules = ["DSADecoderLayer"]
    # attention is this file's own whatever attn_implementation says (it only shapes the
    # mask transformers builds, which the layer reads); no full-graph compile
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _can_record_outputs = {"hidden_states": DSADecoderLayer, "attentions": DSAAttention}


class DSAModel(DSAPreTrainedModel, LlamaModel):
    def __init__(self, config: DSAConfig):
        DSAPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DSADecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, *args, **kwargs):
        # one dict per forward, passed through to every attention layer: the [B, Tq, Tk]
        # mask of what each query may read is built by the first layer, not by each
        kwargs.setdefault("dsa_masks", {})
        return super().forward(*args, **kwargs)


class DSAForCausalLM(DSAPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: DSAConfig):
        DSAPreTrainedModel.__init__(self, config)
        self.model = DSAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def attention_layers(self) -> list[DSAAttention]:
        return [m for m in self.modules() if isinstance(m, DSAAttention)]

    def indexer_parameters(self) -> list[nn.Parameter]:
        return [p for a in self.attention_layers() for p in a.indexer.parameters()]


def from_dense(
    dense,
    *,
    index_n_heads: int,
    index_head_dim: int,
    index_top_k: int,
    seed: int = 0,
    warmup: bool = True,
) -> DSAForCausalLM:
    """A DSA model holding ``dense``'s weights (a Llama-family causal LM) and a new,
    seeded indexer; ``warmup`` marks it for the dense warm-up."""
    cfg = dense.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "layer_types", "transformers_version"):
        cfg.pop(key, None)
    if dense.config.model_type not in ("llama", "qwen2", "qwen3", "mistral"):
        raise ValueError(f"{dense.config.model_type}: only Llama-family students convert to DSA")
    config = DSAConfig(
        **cfg,
        index_n_heads=index_n_heads,
        index_head_dim=index_head_dim,
        index_top_k=index_top_k,
        index_warmup=warmup,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DSAForCausalLM(config).to(next(dense.parameters()).dtype)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    new = {n for n, _ in model.named_parameters() if ".indexer." in n}
    if unexpected or set(missing) - new:
        raise ValueError(
            f"dense weights do not fit the DSA model: missing {sorted(set(missing) - new)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    model.generation_config = dense.generation_config
    return model

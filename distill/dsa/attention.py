"""DeepSeek Sparse Attention, the reference: index scores, top-k selection, attention over
the selected keys, and the indexer's KL loss, in plain torch on whole score matrices.

This is the CPU path and what the GPU path (:mod:`distill.dsa.kernels`) is tested
against. Shapes, for a batch of B rows:

- ``q`` [B, H, Tq, D], ``k`` and ``v`` [B, Hkv, Tk, D]: the main attention, after RoPE
- ``qi`` [B, Tq, Hi, Di], ``ki`` [B, Tk, Di], ``w`` [B, Tq, Hi]: the indexer's queries,
  its one key head, and its per-head weights (already scaled, see ``Indexer``)
- ``allowed`` [B, Tq, Tk] bool: what dense attention may read (causal, the query's own
  trace, no padding)

The indexer's score ``I(t, s) = Σ_j w(t, j) · ReLU(q_I(t, j) · k_I(s))``; each query reads
its ``top_k`` allowed keys by score (every allowed key when it has fewer). The indexer
learns ``KL(p_t ‖ softmax(I_t))`` with ``p_t`` the main attention's probabilities summed
over heads and L1-normalised (their mean): over every allowed key in the dense warm-up,
over the selected keys in sparse training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NEG = float("-inf")


def _wide(x: Tensor) -> Tensor:
    """fp32, or fp64 where the input is fp64 (the tests' exact comparisons)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def index_scores(qi: Tensor, ki: Tensor, w: Tensor) -> Tensor:
    """``I`` [B, Tq, Tk] in fp32 (fp64 for fp64 inputs). The dot products run in the
    inputs' dtype (a bf16 key cache is not copied to fp32 at every decoding step)."""
    logits = torch.einsum("bthd,bsd->bths", qi, ki.to(qi.dtype)).relu()
    return torch.einsum("bths,bth->bts", _wide(logits), _wide(w))


def rank_key(scores: Tensor) -> Tensor:
    """int64 keys ordered as the scores (rounded to fp32), equal scores by key position,
    the later first. ``topk`` of these picks the same keys whatever the layout of the
    scores (one padded matrix, chunks, another device): an untrained indexer ties often
    (every ReLU at 0), and a tie broken by layout would make two paths disagree."""
    s = scores.float() + 0.0  # -0.0 -> +0.0: one zero
    bits = s.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # IEEE order
    pos = torch.arange(s.shape[-1], device=s.device)
    return (ordered << 32) | pos


def topk_indices(scores: Tensor, allowed: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Each query's ``min(top_k, Tk)`` best keys [B, Tq, K] and which of them are allowed
    (a query with fewer allowed keys than K gets some disallowed ones, marked False)."""
    k = min(top_k, scores.shape[-1])
    # the order of the selected keys does not matter to attention: skip topk's sort
    idx = rank_key(scores.masked_fill(~allowed, NEG)).topk(k, dim=-1, sorted=False).indices
    return idx, allowed.gather(-1, idx)


def select(scores: Tensor, allowed: Tensor, top_k: int) -> Tensor:
    """The keys each query reads, as a [B, Tq, Tk] mask: its top ``top_k`` allowed keys."""
    idx, ok = topk_indices(scores, allowed, top_k)
    return torch.zeros_like(allowed).scatter_(-1, idx, ok)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Softmax attention of each query over the keys of ``mask`` [B, Tq, Tk]. A query with
    no key at all (padding) reads every key, so its unused output stays finite: a NaN
    there would reach real tokens through a 0 · NaN in the next layer."""
    m = mask | ~mask.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=m[:, None], scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


def attend_gathered(
    q: Tensor, k: Tensor, v: Tensor, idx: Tensor, ok: Tensor, scale: float
) -> Tensor:
    """:func:`attend` reading only the gathered keys ``idx`` [B, Tq, K] (``ok`` marks the
    real ones): O(Tq · K) work and memory instead of O(Tq · Tk). The decode path."""
    b, h, tq, d = q.shape
    hkv, kk = k.shape[1], idx.shape[-1]
    flat = idx.reshape(b, 1, tq * kk, 1).expand(b, hkv, tq * kk, d)
    kg = k.gather(2, flat).view(b, hkv, tq, kk, d)
    vg = v.gather(2, flat).view(b, hkv, tq, kk, d)
    qg = q.view(b, hkv, h // hkv, tq, d)
    s = torch.einsum("bngtd,bntkd->bngtk", _wide(qg), _wide(kg)) * scale
    ok = ok | ~ok.any(-1, keepdim=True)  # as in attend: padding reads its own garbage
    s = s.masked_fill(~ok[:, None, None], NEG)
    p = torch.softmax(s, dim=-1).to(v.dtype)
    return torch.einsum("bngtk,bntkd->bngtd", p, vg).reshape(b, h, tq, d)


@torch.no_grad()
def head_mean_probs(q: Tensor, k: Tensor, mask: Tensor, scale: float) -> Tensor:
    """``p_t``: the main attention's probabilities over the keys of ``mask``, summed over
    heads and L1-normalised (each head's row sums to one, so: their mean) [B, Tq, Tk];
    a query without keys gets zeros. A target: no gradient."""
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (_wide(q) @ _wide(kk).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask[:, None], NEG)
    return torch.softmax(s, dim=-1).nan_to_num_(0.0).mean(1)


def index_kl(p: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """``KL(p_t ‖ softmax(I_t))`` over the keys of ``mask``, per query [B, Tq] (0 for a
    query without keys). Gradient flows into ``scores`` only."""
    rows = mask.any(-1, keepdim=True)
    # an empty row's softmax would be NaN, and so would its (zero) gradient: give it every key
    m = mask | ~rows
    logq = torch.log_softmax(scores.masked_fill(~m, NEG), dim=-1).masked_fill(~m, 0.0)
    kl = (torch.xlogy(p, p) - p * logq).sum(-1)
    return torch.where(rows.squeeze(-1), kl, torch.zeros_like(kl))


def dsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qi: Tensor,
    ki: Tensor,
    w: Tensor,
    allowed: Tensor,
    top_k: int,
    scale: float,
    *,
    dense: bool = False,
    loss: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention output [B, H, Tq, D] and, with ``loss``, each query's indexer KL
    [B, Tq]. ``dense``: the warm-up (attention over every allowed key, KL over them too);
    otherwise each query reads its top ``top_k`` keys and the KL runs over those."""
    scores = index_scores(qi, ki, w) if loss or not dense else None
    mask = allowed if dense else select(scores.detach(), allowed, top_k)
    out = attend(q, k, v, mask, scale)
    if not loss:
        return out, None
    p = head_mean_probs(q.detach(), k.detach(), mask, scale)
    return out, index_kl(p, scores, mask)


def allowed_from_mask(attention_mask: Tensor | None, b: int, tq: int, tk: int, device) -> Tensor:
    """[B, Tq, Tk] bool from what transformers hands an attention layer: a 4D boolean or
    additive mask, a 2D padding mask, or None. None means what it means to SDPA, for
    which transformers leaves it out: one query reads every key (decoding), several are
    causal from the first key (``is_causal``: a prefill, also into a static cache whose
    later slots are empty)."""
    if attention_mask is None:
        if tq == 1:
            return torch.ones(b, 1, tk, dtype=torch.bool, device=device)
        i = torch.arange(tq, device=device)[:, None]
        return (torch.arange(tk, device=device)[None, :] <= i).expand(b, tq, tk)
    if attention_mask.dim() == 2:  # [B, Tk] padding mask (flash-attention style): add causality
        causal = allowed_from_mask(None, b, tq, tk, device)
        return causal & attention_mask[:, None, -tk:].bool()
    m = attention_mask[:, 0] if attention_mask.dim() == 4 else attention_mask
    m = m[..., -tq:, :tk]
    allowed = m if m.dtype == torch.bool else m == 0
    return allowed.expand(b, tq, tk)


def same_trace(position_ids: Tensor) -> Tensor:
    """[B, T, T] bool: both tokens in one trace of a packed row (positions restart at 0
    at each trace; a padding token at position 0 is a trace of its own)."""
    seg = (position_ids == 0).cumsum(-1)
    return seg[:, :, None] == seg[:, None, :]


def segment_groups(cu: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The segments of a flat row (boundaries ``cu``), grouped by length within a factor
    of two, as (``idx`` [S, n], ``valid`` [S, n]): the row positions of each segment of the
    group, right-padded with the row length (a padding slot callers append)."""
    t = int(cu[-1])
    lens, starts = (cu[1:] - cu[:-1]).tolist(), cu[:-1].tolist()
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        if n > 0:
            groups.setdefault((n - 1).bit_length(), []).append(i)
    out = []
    for ids in groups.values():
        width = torch.arange(max(lens[i] for i in ids), device=cu.device)[None, :]
        n = torch.tensor([lens[i] for i in ids], device=cu.device)[:, None]
        valid = width < n
        s = torch.tensor([starts[i] for i in ids], device=cu.device)[:, None]
        out.append((torch.where(valid, s + width, t), valid))
    return out


def dsa_varlen_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qi: Tensor,
    ki: Tensor,
    w: Tensor,
    cu: Tensor,
    top_k: int,
    scale: float,
    *,
    dense: bool = False,
    loss: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`dsa_attention` on one flat row of packed traces (``q`` [T, H, D], ``k``,
    ``v`` [T, Hkv, D], ``qi`` [T, Hi, Di], ``ki`` [T, Di], ``w`` [T, Hi], boundaries
    ``cu``): each trace alone, so no attention and no top-k crosses a boundary. Segments
    of similar length run as one padded batch. Returns the output [T, H, D] and the KL
    summed over the row's tokens."""
    t = q.shape[0]
    # one zero row at position t: the padding slot of segment_groups
    pad = [torch.cat([x, x.new_zeros(1, *x.shape[1:])]) for x in (q, k, v, qi, ki, w)]
    outs, where, kl = [], [], None
    for idx, valid in segment_groups(cu):
        qs, ks, vs = (x[idx].transpose(1, 2) for x in pad[:3])  # [S, heads, n, D]
        qis, kis, ws = (x[idx] for x in pad[3:])
        n = idx.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        allowed = causal[None] & valid[:, None, :]
        o, kls = dsa_attention(
            qs, ks, vs, qis, kis, ws, allowed, top_k, scale, dense=dense, loss=loss
        )
        outs.append(o.transpose(1, 2)[valid])
        where.append(idx[valid])
        if loss:
            part = (kls * valid).sum()
            kl = part if kl is None else kl + part
    pos = torch.cat(where)
    order = torch.empty_like(pos)
    order[pos] = torch.arange(len(pos), device=pos.device)
    out = torch.cat(outs)[order]
    assert out.shape[0] == t, "every position of the row belongs to one segment"
    return out, kl

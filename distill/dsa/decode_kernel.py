"""The DSA decode step's selection and attention in Triton kernels (the static decoder's).

One new token a row: its index scores against the cached index keys pick ``top_k`` keys,
and the token's query heads attend over those keys' K and V rows. The torch step
(``distill.backends.llama_decode.select_step``) scores with two batched products and a
ReLU, runs ``torch.topk`` over int64 rank keys, gathers the selected rows into
[B, Hkv, K, D] copies and calls SDPA. On one H100 (2026-12-07, Qwen2-0.5B shape, 32k
context, batch 32, compiled and graphed; one run; by the profile of two steps) a
layer's scores took ~68 µs (the product over its 134 MB of index keys 50 µs, near the
memory's speed, then a matrix-vector product and a ReLU pass), its ``topk`` 93 µs (eight
radix passes over 64-bit keys), the gather and SDPA 26 + 34 µs: ~5.3 ms of a 7.4 ms step.
:func:`decode_scores` is the scores in one kernel (one read of the index keys).

:func:`decode_topk`: the same keys (scores in IEEE order, ties to the later key, rows
with fewer valid keys than ``top_k`` take them all) by a radix select over the scores'
32-bit order, eight bits a pass, each row split into chunks of ``CS`` keys so that a batch
of 32 rows still fills the GPU: four launches write each chunk's 256-bin histogram of the
next digit among the keys that share the decided prefix (every program first decides
that prefix from the earlier passes' histograms of its row, so no launch sits between
passes); a fifth writes the positions above the k-th score and the latest of those tied
with it, each chunk at offsets it reads off the same histograms. A first version, one
program a row, took 163 µs a layer (32 programs on 132 SMs; the same H100 run).

:func:`decode_attention`: the query heads of each KV group attend over the selected rows
read in place through the indices (no gathered copies), the keys of a row split across
programs (flash-decoding); the splits' partial outputs are merged by their log-sum-exps.
From int8 K and V (``llama_decode.KV_INT8``) it multiplies a key's scores and a value
row's weight by the row's scale: only the selected rows are dequantized, in registers.

Both are registered ops (``torch.library.triton_op``), so the compiled, graphed step traces
them. Timed on one H100 (2026-12-07 05:22 UTC, the same shape, batch and context; three
runs, profiles of two steps): a layer's scores 49 µs, its selection 67 (four histogram
passes 13 + 11 + 9 + 8, the emit 25), its attention 21, against torch's ``topk`` 92
and gather and SDPA 26 + 34 (its scores ~68, by the profile above). The step took 5.30,
5.30 and 5.99 ms with both against 6.12-6.17 with the selection's alone, 7.36 with
neither (one run) and 12.5-12.7 dense: 2.12-2.37x dense. Both are on (``DECODE_FUSED``,
``DECODE_ATTENTION``). The attention had failed to compile inside the step at first:
inductor passes a Python float as fp64 (below).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from distill.dsa.select_kernel import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from distill.dsa.select_kernel import _score_order

# keys a program (the selection's chunk; the scores'), read at each launch
DECODE_LAUNCH = {"CS": 2048, "num_warps": 4}
SCORE_LAUNCH = {"BS": 256, "num_warps": 8}
# the step's index scores and selection by decode_scores and decode_topk rather than
# torch's products and torch.topk over int64 rank keys (6.1-6.2 against 7.4 ms a step)
DECODE_FUSED = True
# the step's attention by decode_attention rather than SDPA over gathered copies (5.3
# against 6.1 ms a step; 528 programs: 5.27, one run)
DECODE_ATTENTION = True
# keys a step of the attention, and the programs to aim for (a row's keys split to fill
# the GPU: 132 SMs on an H100)
ATTENTION_LAUNCH = {"BN": 64, "num_warps": 4, "num_stages": 2, "programs": 264}


def use_decode_kernel(x: Tensor) -> bool:
    return DECODE_FUSED and HAVE_TRITON and x.is_cuda


def use_attention_kernel(q: Tensor) -> bool:
    return DECODE_ATTENTION and HAVE_TRITON and q.is_cuda


def _on_gpu(op: str, *tensors: Tensor | None) -> None:
    """Refuse tensors off the GPU (but under Triton's interpreter, the tests' CPU path):
    compiled by torch 2.8 with CPU tensors, these ops raised nothing and the step decoded
    zeros (the static decoder's fallback test); raising while tracing sends such a step
    to the torch one."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    bad = [t.device.type for t in tensors if t is not None and t.device.type != "cuda"]
    if bad:
        raise RuntimeError(f"{op}: the DSA decode kernels run on CUDA tensors, got {bad[0]}")


if HAVE_TRITON:

    @triton.jit
    def _decided(HIST, b, k_out, n_c, s_hp, s_hb, s_hc, PASSES: tl.constexpr,
                 NCP: tl.constexpr):  # fmt: skip
        """The k-th key's order as far as the first ``PASSES`` passes decided it (its top
        ``8·PASSES`` bits), the keys still to take at exactly that prefix, and per chunk
        [NCP] the keys already known to be above it and those equal to it at the last
        pass: all read off the passes' per-chunk histograms of row ``b``."""
        bins = tl.arange(0, 256)
        rc = tl.arange(0, NCP)
        left = tl.zeros((), tl.int32)
        prefix = tl.zeros((), tl.uint32)
        above = tl.zeros((NCP,), tl.int32)
        equal = tl.zeros((NCP,), tl.int32)
        for p in tl.static_range(PASSES):
            hc = tl.load(
                HIST + p * s_hp + b * s_hb + rc[:, None] * s_hc + bins[None, :],
                mask=(rc < n_c)[:, None],
                other=0,
            )  # [NCP, 256]
            hist = tl.sum(hc, 0)
            if p == 0:
                left = tl.minimum(tl.sum(hist), k_out)
            at_least = tl.sum(hist) - (tl.cumsum(hist, 0) - hist)  # digit d or more
            pick = tl.max(tl.where(at_least >= left, bins, 0))
            left -= tl.sum(tl.where(bins == pick + 1, at_least, 0))
            prefix = (prefix << 8) | pick.to(tl.uint32)
            above += tl.sum(tl.where(bins[None, :] > pick, hc, 0), 1)
            equal = tl.sum(tl.where(bins[None, :] == pick, hc, 0), 1)
        return prefix, left, above, equal

    @triton.jit
    def _decode_score_kernel(
        QI, KI, W, SC, KS, n_s, s_qb, s_qh, s_kb, s_kt, s_wb, s_sb, s_ksb,
        HI: tl.constexpr, BH: tl.constexpr, DI: tl.constexpr, BD: tl.constexpr,
        BS: tl.constexpr, IEEE: tl.constexpr, SCALED: tl.constexpr,
    ):  # fmt: skip
        """Row ``pid(0)``'s index scores against keys ``[pid(1)·BS, +BS)``:
        Σ_h w(h)·ReLU(qi(h)·ki(s)), the dot products rounded to the inputs' dtype before
        the ReLU, as ``attention.index_scores`` computes them; ``SCALED``: fp8 keys,
        the sum times each key's scale ``KS``."""
        b = tl.program_id(0)
        rh = tl.arange(0, BH)
        mh = rh < HI
        rd = tl.arange(0, BD)
        md = rd < DI
        q = tl.load(QI + b * s_qb + rh[:, None] * s_qh + rd[None, :],
                    mask=mh[:, None] & md[None, :], other=0.0)  # fmt: skip
        wv = tl.load(W + b * s_wb + rh, mask=mh, other=0.0).to(tl.float32)
        s = tl.program_id(1) * BS + tl.arange(0, BS)
        m = s < n_s
        kb = tl.load(KI + b * s_kb + s[:, None] * s_kt + rd[None, :],
                     mask=m[:, None] & md[None, :], other=0.0).to(q.dtype)  # fmt: skip
        if IEEE:
            d = tl.dot(q, tl.trans(kb), input_precision="ieee")
        else:
            d = tl.dot(q, tl.trans(kb)).to(q.dtype).to(tl.float32)
        sc = tl.sum(tl.maximum(d, 0.0) * wv[:, None], 0)
        if SCALED:
            sc = sc * tl.load(KS + b * s_ksb + s, mask=m, other=0.0)
        tl.store(SC + b * s_sb + s, sc, mask=m)

    @triton.jit
    def _chunk(SC, VALID, b, c, n_s, s_sb, s_vb, CS: tl.constexpr):
        """Chunk ``c`` of row ``b``: its positions, which are valid keys, their order."""
        s = c * CS + tl.arange(0, CS)
        m = s < n_s
        ok = m & (tl.load(VALID + b * s_vb + s, mask=m, other=0) != 0)
        u = _score_order(tl.load(SC + b * s_sb + s, mask=m, other=0.0).to(tl.float32))
        return s, ok, u

    @triton.jit
    def _decode_hist_kernel(
        SC, VALID, HIST, n_s, k_out, n_c, s_sb, s_vb, s_hp, s_hb, s_hc,
        PASS: tl.constexpr, CS: tl.constexpr, NCP: tl.constexpr,
    ):  # fmt: skip
        """Pass ``PASS``: chunk ``pid(1)`` of row ``pid(0)`` counts the next digit (bits
        ``24 - 8·PASS`` up) of its valid keys that share the decided prefix."""
        b = tl.program_id(0)
        c = tl.program_id(1)
        prefix, _, _, _ = _decided(HIST, b, k_out, n_c, s_hp, s_hb, s_hc, PASS, NCP)
        _, ok, u = _chunk(SC, VALID, b, c, n_s, s_sb, s_vb, CS)
        shift = 24 - 8 * PASS
        match = ok & (((u >> shift) >> 8) == prefix)  # two shifts: u >> 32 is undefined
        hist = tl.histogram(((u >> shift) & 255).to(tl.int32), 256, mask=match)
        tl.store(HIST + PASS * s_hp + b * s_hb + c * s_hc + tl.arange(0, 256), hist)

    @triton.jit
    def _decode_emit_kernel(
        SC, VALID, HIST, IDX, OK, n_s, k_out, n_c, s_sb, s_vb, s_hp, s_hb, s_hc, s_ib,
        CS: tl.constexpr, NCP: tl.constexpr,
    ):  # fmt: skip
        """Chunk ``pid(1)`` of row ``pid(0)`` writes its keys above the k-th score (after
        those of the earlier chunks) and its keys tied with it that are among the latest
        ``left`` ties of the row (after every key above it, the latest first)."""
        b = tl.program_id(0)
        c = tl.program_id(1)
        prefix, left, above, equal = _decided(HIST, b, k_out, n_c, s_hp, s_hb, s_hc, 4, NCP)
        rc = tl.arange(0, NCP)
        n_above = tl.sum(above)
        above_before = tl.sum(tl.where(rc < c, above, 0))
        ties_after = tl.sum(tl.where(rc > c, equal, 0))
        s, ok, u = _chunk(SC, VALID, b, c, n_s, s_sb, s_vb, CS)
        up = ok & (u > prefix)
        tie = ok & (u == prefix)
        # the ties at later positions than each key: in later chunks, then in this one
        later = ties_after + tl.sum(tie.to(tl.int32)) - tl.cumsum(tie.to(tl.int32), 0)
        take = tie & (later < left)
        slot = tl.where(up, above_before + tl.cumsum(up.to(tl.int32), 0) - 1, n_above + later)
        sel = up | take
        tl.store(IDX + b * s_ib + slot, s.to(tl.int64), mask=sel)
        tl.store(OK + b * s_ib + slot, tl.full((CS,), 1, tl.int8), mask=sel)

    @triton.jit
    def _decode_attn_kernel(
        Q, K, V, KVS, IDX, OK, OUT, LSE, n_k, per_split, scale,
        s_qb, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_sb, s_sh, s_st, s_ib, s_ob, s_oh,
        s_os, s_lb, s_lh,
        G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
        BN: tl.constexpr, IEEE: tl.constexpr, SCALED: tl.constexpr,
    ):  # fmt: skip
        """KV head ``pid(1)`` of row ``pid(0)``: its ``G`` query heads over the selected
        keys ``[pid(2)·per_split, +per_split)``; writes their normalised output and
        log-sum-exp for that split (-inf where the split has no valid key). ``SCALED``:
        8-bit K and V with a scale a row (``KVS`` [B, Hkv, S, 2]: K's, then V's, in one
        sector): a key's scores are its scale times its 8-bit row's, a value row's weight
        its attention weight times its scale, so only the selected rows are dequantized."""
        b = tl.program_id(0)
        hk = tl.program_id(1)
        sp = tl.program_id(2)
        # inductor types a Python float argument fp64 (eager Triton: fp32); an fp64 scale
        # would turn the loop's running max fp64 and fail its compile
        scale = tl.cast(scale, tl.float32)
        rg = tl.arange(0, BG)
        mg = rg < G
        rd = tl.arange(0, BD)
        md = rd < D
        heads = hk * G + rg
        q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + rd[None, :],
                    mask=mg[:, None] & md[None, :], other=0.0)  # fmt: skip
        m_i = tl.full((BG,), float("-inf"), tl.float32)
        l_i = tl.zeros((BG,), tl.float32)
        acc = tl.zeros((BG, BD), tl.float32)
        lo = sp * per_split
        hi = tl.minimum(lo + per_split, n_k)
        for start in range(lo, hi, BN):
            rn = start + tl.arange(0, BN)
            mn = rn < hi
            ix = tl.load(IDX + b * s_ib + rn, mask=mn, other=0)
            ok = mn & (tl.load(OK + b * s_ib + rn, mask=mn, other=0) != 0)
            kb = tl.load(K + b * s_kb + hk * s_kh + ix[:, None] * s_kt + rd[None, :],
                         mask=ok[:, None] & md[None, :], other=0.0).to(q.dtype)  # fmt: skip
            if IEEE:
                s = tl.dot(q, tl.trans(kb), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kb))
            if SCALED:
                at_s = KVS + b * s_sb + hk * s_sh + ix * s_st
                s = s * tl.load(at_s, mask=ok, other=0.0)[None, :]
            s = tl.where(ok[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vb = tl.load(V + b * s_vb + hk * s_vh + ix[:, None] * s_vt + rd[None, :],
                         mask=ok[:, None] & md[None, :], other=0.0).to(q.dtype)  # fmt: skip
            if SCALED:  # (after l_i: the weights' sum is the unscaled one)
                p = p * tl.load(at_s + 1, mask=ok, other=0.0)[None, :]
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(OUT + b * s_ob + heads[:, None] * s_oh + sp * s_os + rd[None, :], out,
                 mask=mg[:, None] & md[None, :])  # fmt: skip
        tl.store(LSE + b * s_lb + heads * s_lh + sp, lse, mask=mg)


def decode_scores(qi: Tensor, ki: Tensor, w: Tensor, ks: Tensor | None = None) -> Tensor:
    """:func:`distill.dsa.attention.index_scores` for one new token a row, in one kernel:
    ``qi`` [B, 1, Hi, Di], the cached index keys ``ki`` [B, S, Di], ``w`` [B, 1, Hi] ->
    fp32 [B, 1, S]; ``ks`` [B, S]: fp8 keys' scales (``llama_decode.quantize_fp8``).
    The torch step runs it as two batched products and a ReLU (on one H100 at 32k, batch
    32, ~68 µs a layer, 50 of them reading 134 MB of index keys)."""
    return torch.ops.distill.decode_scores(qi[:, 0], ki, w[:, 0], ks)[:, None]


def decode_topk(scores: Tensor, valid: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """:func:`distill.dsa.attention.topk_indices` for one new token a row: ``scores``
    [B, 1, S] and ``valid`` [B, S] -> ``idx`` and ``ok`` [B, 1, K] (K = min(top_k, S)).
    The same valid keys (``ok``); where a row has fewer than K, its other entries are key
    0, not ``ok``, where ``topk_indices`` names invalid keys (attention reads neither)."""
    k = min(top_k, scores.shape[-1])
    return torch.ops.distill.decode_topk(scores[:, 0].contiguous(), valid.contiguous(), k)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, ok: Tensor, scale: float,
                     kv_scale: Tensor | None = None) -> Tensor:  # fmt: skip
    """One new token's attention over its selected keys: ``q`` [B, H, 1, D], the caches
    ``k``, ``v`` [B, Hkv, S, D], ``idx`` and ``ok`` [B, 1, K] (:func:`decode_topk`'s or
    ``topk_indices``'); returns [B, H, 1, D] in ``q``'s dtype. 8-bit caches come with
    their rows' scales ``kv_scale`` [B, Hkv, S, 2], K's and V's
    (``llama_decode.quantize_int8``)."""
    # the kernel reads each row's heads and dims at unit stride
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return torch.ops.distill.decode_attention(q, k, v, idx[:, 0], ok[:, 0], scale, kv_scale)


if HAVE_TRITON:

    @torch.library.triton_op("distill::decode_scores", mutates_args=())
    def _decode_scores_op(qi: Tensor, ki: Tensor, w: Tensor, ks: Tensor | None) -> Tensor:
        _on_gpu("decode_scores", qi, ki, w, ks)
        b, hi, di = qi.shape
        n_s = ki.shape[1]
        bs = SCORE_LAUNCH["BS"]
        scores = torch.empty(b, n_s, dtype=torch.float32, device=qi.device)
        scaled = ks is not None
        ks = ks if scaled else scores  # (read only where SCALED)
        torch.library.wrap_triton(_decode_score_kernel)[(b, triton.cdiv(n_s, bs))](
            qi, ki, w, scores, ks, n_s, qi.stride(0), qi.stride(1), ki.stride(0),
            ki.stride(1), w.stride(0), scores.stride(0), ks.stride(0), HI=hi,
            BH=max(16, triton.next_power_of_2(hi)), DI=di,
            BD=max(16, triton.next_power_of_2(di)), BS=bs, IEEE=qi.dtype == torch.float32,
            SCALED=scaled, num_warps=SCORE_LAUNCH["num_warps"],
        )  # fmt: skip
        return scores

    @torch.library.triton_op("distill::decode_topk", mutates_args=())
    def _decode_topk_op(scores: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
        _on_gpu("decode_topk", scores, valid)
        b, n_s = scores.shape
        launch = dict(DECODE_LAUNCH)
        cs = launch.pop("CS")
        n_c = triton.cdiv(n_s, cs)
        ncp = max(2, triton.next_power_of_2(n_c))
        idx = torch.zeros(b, 1, k, dtype=torch.long, device=scores.device)
        ok = torch.zeros(b, 1, k, dtype=torch.int8, device=scores.device)
        hist = torch.empty(4, b, n_c, 256, dtype=torch.int32, device=scores.device)
        valid8 = valid.to(torch.int8)  # (a bool view does not lower in the compiled step)
        strides = (scores.stride(0), valid8.stride(0), *hist.stride()[:3])
        for p in range(4):
            torch.library.wrap_triton(_decode_hist_kernel)[(b, n_c)](
                scores, valid8, hist, n_s, k, n_c, *strides, PASS=p, CS=cs, NCP=ncp, **launch
            )
        torch.library.wrap_triton(_decode_emit_kernel)[(b, n_c)](
            scores, valid8, hist, idx, ok, n_s, k, n_c, *strides, idx.stride(0),
            CS=cs, NCP=ncp, **launch,
        )  # fmt: skip
        return idx, ok != 0

    @torch.library.triton_op("distill::decode_attention", mutates_args=())
    def _decode_attention_op(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, ok: Tensor,
                             scale: float, kv_scale: Tensor | None) -> Tensor:  # fmt: skip
        _on_gpu("decode_attention", q, k, v, idx, ok, kv_scale)
        b, h, _, d = q.shape
        hkv, n_k = k.shape[1], idx.shape[-1]
        g = h // hkv
        launch = dict(ATTENTION_LAUNCH)
        bn, programs = launch.pop("BN"), launch.pop("programs")
        # a row's keys in splits of whole steps, enough of them to fill the GPU
        steps = triton.cdiv(n_k, bn)
        splits = max(1, min(steps, triton.cdiv(programs, b * hkv)))
        per_split = triton.cdiv(steps, splits) * bn
        splits = triton.cdiv(n_k, per_split)
        out = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
        ok8 = ok.to(torch.int8)
        scaled = kv_scale is not None
        kvs = kv_scale if scaled else out  # (read only where SCALED)
        torch.library.wrap_triton(_decode_attn_kernel)[(b, hkv, splits)](
            q, k, v, kvs, idx, ok8, out, lse, n_k, per_split, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), kvs.stride(0), kvs.stride(1),
            kvs.stride(2), idx.stride(0),
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            G=g, BG=max(16, triton.next_power_of_2(g)), D=d,
            BD=max(16, triton.next_power_of_2(d)), BN=bn, IEEE=q.dtype == torch.float32,
            SCALED=scaled, **launch,
        )  # fmt: skip
        # the splits merged by their log-sum-exps (a split without keys weighs 0)
        top = lse.amax(-1, keepdim=True)
        wt = torch.exp(lse - torch.where(torch.isinf(top), 0.0, top))
        merged = (out * wt[..., None]).sum(2) / wt.sum(-1, keepdim=True).clamp_min(1e-30)
        return merged[:, :, None].to(q.dtype)

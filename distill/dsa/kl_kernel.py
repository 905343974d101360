"""The indexer's KL over the selected keys (the sparse phase), fused in Triton.

Per query t with selected keys ``idx[t]`` (K of them, -1 = none):
``KL(p_t ‖ softmax(I_t))`` where ``p_t`` is the main attention over those keys, one
softmax per query head, averaged over heads, and ``I(t, s) = Σ_j w(t,j)·ReLU(qi(t,j)·ki(s))``.
Its gradient reaches ``qi``, ``ki`` and ``w`` only: ``dKL/dI(t,s) = softmax(I_t)_s - p_t(s)``.

The torch path (:func:`distill.dsa.kernels.sparse_kl`) gathers ``k[idx]`` and ``ki[idx]``
as [T, K, ...] tensors and recomputes them in backward: on one H100 at 16k tokens and
K = 2,048 that was 1.8 s of a 1.86 s layer (BENCHMARKS.md). Here one program per query
walks its selected keys in blocks, twice (the heads' log-sum-exps and the index
softmax's, then the KL); no [T, K, ...] keys are gathered and only the int32 ``idx``
[T, K] is kept: the backward walks the keys again with the saved log-sum-exps, and
scatters ``dki`` with fp32 atomic adds. Opt-in (``DISTILL_DSA_FUSED_KL=1``) until timed
on a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

BLOCK_N = 64  # selected keys per step


def sparse_kl_triton(q, k, qi, ki, w, idx: Tensor, scale: float) -> Tensor:
    """Per-token KL [T] (fp32); ``q`` [T, H, D] and ``k`` [T, Hkv, D] carry no gradient."""
    return _SparseKL.apply(q.detach(), k.detach(), qi, ki, w, idx, scale)


if HAVE_TRITON:

    @triton.jit
    def _main_scores(q, K, safe, ok, grp, rd, md, s_kt, s_kh, scale,
                     HKV: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr):  # fmt: skip
        """[BH, BN] attention logits of every query head against the block's keys, each
        head against its own KV head; -inf for keys that are not selected."""
        s = tl.full((BH, BN), float("-inf"), tl.float32)
        for hk in tl.static_range(HKV):
            kb = tl.load(
                K + safe[:, None] * s_kt + hk * s_kh + rd[None, :],
                mask=ok[:, None] & md[None, :],
                other=0.0,
            ).to(tl.float32)
            sh = tl.dot(q, tl.trans(kb)) * scale
            s = tl.where((grp == hk)[:, None], sh, s)
        return tl.where(ok[None, :], s, float("-inf"))

    @triton.jit
    def _query(Q, QI, W, t, rh, rd, rj, re, mh, md, mj, me, s_qt, s_qh, s_qit, s_qih, s_wt):
        """The query's main heads [BH, BD], index heads [BHI, BDI] and weights [BHI]."""
        q = tl.load(
            Q + t * s_qt + rh[:, None] * s_qh + rd[None, :],
            mask=mh[:, None] & md[None, :],
            other=0.0,
        ).to(tl.float32)
        qi = tl.load(
            QI + t * s_qit + rj[:, None] * s_qih + re[None, :],
            mask=mj[:, None] & me[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(W + t * s_wt + rj, mask=mj, other=0.0).to(tl.float32)
        return q, qi, w

    @triton.jit
    def _block(q, qi, w, K, KI, IDX, t, start, n_sel, grp, rn, rd, md, re, me,
               s_it, s_kt, s_kh, s_kit, scale,
               HKV: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr):  # fmt: skip
        """One block of the query's selected keys: which are selected (``ok``) and where
        (``safe``), the main logits [BH, BN], ReLU's input [BHI, BN], the index keys
        [BN, BDI] and the index scores [BN]; -inf logits and scores where not selected."""
        cols = start + rn
        ids = tl.load(IDX + t * s_it + cols, mask=cols < n_sel, other=-1)
        ok = ids >= 0
        safe = tl.where(ok, ids, 0)
        s = _main_scores(q, K, safe, ok, grp, rd, md, s_kt, s_kh, scale, HKV, BH, BN)
        kib = tl.load(
            KI + safe[:, None] * s_kit + re[None, :], mask=ok[:, None] & me[None, :], other=0.0
        ).to(tl.float32)
        z = tl.dot(qi, tl.trans(kib))
        idx_s = tl.where(ok, tl.sum(tl.maximum(z, 0.0) * w[:, None], 0), float("-inf"))
        return ok, safe, s, z, kib, idx_s

    @triton.jit
    def _kl_fwd_kernel(
        Q, K, QI, KI, W, IDX, KL, LSE, LSEI, scale, n_sel,
        s_qt, s_qh, s_kt, s_kh, s_qit, s_qih, s_kit, s_wt, s_it, s_lt,
        H: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, BH: tl.constexpr,
        D: tl.constexpr, BD: tl.constexpr, HI: tl.constexpr, BHI: tl.constexpr,
        DI: tl.constexpr, BDI: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        rh, rd, rn = tl.arange(0, BH), tl.arange(0, BD), tl.arange(0, BN)
        rj, re = tl.arange(0, BHI), tl.arange(0, BDI)
        mh, md, mj, me = rh < H, rd < D, rj < HI, re < DI
        grp = tl.where(mh, rh // G, -1)
        q, qi, w = _query(Q, QI, W, t, rh, rd, rj, re, mh, md, mj, me,
                          s_qt, s_qh, s_qit, s_qih, s_wt)  # fmt: skip
        m = tl.full((BH,), float("-inf"), tl.float32)
        l_h = tl.zeros((BH,), tl.float32)
        mi = tl.max(tl.full((BN,), float("-inf"), tl.float32), 0)
        li = tl.sum(tl.zeros((BN,), tl.float32), 0)
        for start in range(0, n_sel, BN):  # pass 1: log-sum-exps
            ok, safe, s, z, kib, idx_s = _block(
                q, qi, w, K, KI, IDX, t, start, n_sel, grp, rn, rd, md, re, me,
                s_it, s_kt, s_kh, s_kit, scale, HKV, BH, BN,
            )  # fmt: skip
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_h = l_h * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m = m_new
            mi_new = tl.maximum(mi, tl.max(idx_s, 0))
            mi_safe = tl.where(mi_new == float("-inf"), 0.0, mi_new)
            li = li * tl.exp(mi - mi_safe) + tl.sum(tl.exp(idx_s - mi_safe), 0)
            mi = mi_new
        # no key (or a padded head): +inf, so that exp(x - lse) = 0 everywhere below
        lse = tl.where(l_h > 0, m + tl.log(tl.where(l_h > 0, l_h, 1.0)), float("inf"))
        lsei = tl.where(li > 0, mi + tl.log(tl.where(li > 0, li, 1.0)), float("inf"))
        kl = tl.sum(tl.zeros((BN,), tl.float32), 0)
        for start in range(0, n_sel, BN):  # pass 2: the KL
            ok, safe, s, z, kib, idx_s = _block(
                q, qi, w, K, KI, IDX, t, start, n_sel, grp, rn, rd, md, re, me,
                s_it, s_kt, s_kh, s_kit, scale, HKV, BH, BN,
            )  # fmt: skip
            p = tl.sum(tl.exp(s - lse[:, None]), 0) / H
            term = tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0) - p * (idx_s - lsei)
            kl += tl.sum(tl.where(ok & (p > 0), term, 0.0), 0)
        tl.store(KL + t, kl)
        tl.store(LSE + t * s_lt + rh, lse, mask=mh)
        tl.store(LSEI + t, lsei)

    @triton.jit
    def _kl_bwd_kernel(
        Q, K, QI, KI, W, IDX, LSE, LSEI, GOUT, DQI, DKI, DW, scale, n_sel,
        s_qt, s_qh, s_kt, s_kh, s_qit, s_qih, s_kit, s_wt, s_it, s_lt,
        H: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, BH: tl.constexpr,
        D: tl.constexpr, BD: tl.constexpr, HI: tl.constexpr, BHI: tl.constexpr,
        DI: tl.constexpr, BDI: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        rh, rd, rn = tl.arange(0, BH), tl.arange(0, BD), tl.arange(0, BN)
        rj, re = tl.arange(0, BHI), tl.arange(0, BDI)
        mh, md, mj, me = rh < H, rd < D, rj < HI, re < DI
        grp = tl.where(mh, rh // G, -1)
        q, qi, w = _query(Q, QI, W, t, rh, rd, rj, re, mh, md, mj, me,
                          s_qt, s_qh, s_qit, s_qih, s_wt)  # fmt: skip
        lse = tl.load(LSE + t * s_lt + rh, mask=mh, other=float("inf"))
        lsei = tl.load(LSEI + t)
        g = tl.load(GOUT + t)
        dqi = tl.zeros((BHI, BDI), tl.float32)
        dw = tl.zeros((BHI,), tl.float32)
        for start in range(0, n_sel, BN):
            ok, safe, s, z, kib, idx_s = _block(
                q, qi, w, K, KI, IDX, t, start, n_sel, grp, rn, rd, md, re, me,
                s_it, s_kt, s_kh, s_kit, scale, HKV, BH, BN,
            )  # fmt: skip
            p = tl.sum(tl.exp(s - lse[:, None]), 0) / H
            di = tl.where(ok, g * (tl.exp(idx_s - lsei) - p), 0.0)  # dKL/dI [BN]
            dw += tl.sum(tl.maximum(z, 0.0) * di[None, :], 1)
            dz = tl.where(z > 0, w[:, None] * di[None, :], 0.0)  # [BHI, BN]
            dqi += tl.dot(dz, kib)
            dkib = tl.dot(tl.trans(dz), qi)  # [BN, BDI]
            tl.atomic_add(
                DKI + safe[:, None] * s_kit + re[None, :], dkib, mask=ok[:, None] & me[None, :]
            )
        tl.store(
            DQI + t * s_qit + rj[:, None] * s_qih + re[None, :], dqi, mask=mj[:, None] & me[None, :]
        )
        tl.store(DW + t * s_wt + rj, dw, mask=mj)

    def _meta(q: Tensor, k: Tensor, qi: Tensor) -> dict:
        h, d = q.shape[1], q.shape[2]
        hkv, hi, di = k.shape[1], qi.shape[1], qi.shape[2]
        p2 = triton.next_power_of_2
        return dict(
            H=h, G=h // hkv, HKV=hkv, BH=max(16, p2(h)), D=d, BD=max(16, p2(d)),
            HI=hi, BHI=max(16, p2(hi)), DI=di, BDI=max(16, p2(di)), BN=BLOCK_N,
        )  # fmt: skip

    class _SparseKL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, qi, ki, w, idx, scale):
            q, k = q.contiguous(), k.contiguous()
            # fp32 copies of the indexer's (small) tensors: the gradients come back in fp32
            qi32, ki32, w32 = (x.float().contiguous() for x in (qi, ki, w))
            idx = idx.to(torch.int32).contiguous()
            t = q.shape[0]
            kl = torch.empty(t, dtype=torch.float32, device=q.device)
            lse = torch.empty(t, q.shape[1], dtype=torch.float32, device=q.device)
            lsei = torch.empty(t, dtype=torch.float32, device=q.device)
            _kl_fwd_kernel[(t,)](
                q, k, qi32, ki32, w32, idx, kl, lse, lsei, scale, idx.shape[1],
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), qi32.stride(0),
                qi32.stride(1), ki32.stride(0), w32.stride(0), idx.stride(0), lse.stride(0),
                **_meta(q, k, qi32),
            )  # fmt: skip
            ctx.save_for_backward(q, k, qi32, ki32, w32, idx, lse, lsei)
            ctx.scale = scale
            ctx.dtypes = (qi.dtype, ki.dtype, w.dtype)
            return kl

        @staticmethod
        def backward(ctx, grad):
            q, k, qi, ki, w, idx, lse, lsei = ctx.saved_tensors
            dqi, dw = torch.empty_like(qi), torch.empty_like(w)
            dki = torch.zeros_like(ki)
            _kl_bwd_kernel[(q.shape[0],)](
                q, k, qi, ki, w, idx, lse, lsei, grad.float().contiguous(), dqi, dki, dw,
                ctx.scale, idx.shape[1],
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), qi.stride(0),
                qi.stride(1), ki.stride(0), w.stride(0), idx.stride(0), lse.stride(0),
                **_meta(q, k, qi),
            )  # fmt: skip
            dq_i, dk_i, d_w = ctx.dtypes
            return None, None, dqi.to(dq_i), dki.to(dk_i), dw.to(d_w), None, None

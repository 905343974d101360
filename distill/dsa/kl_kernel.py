"""The indexer's KL over the selected keys (the sparse phase), fused in Triton.

Per query t with selected keys ``idx[t]`` (K of them, -1 = none):
``KL(p_t ‖ softmax(I_t))`` where ``p_t`` is the main attention over those keys, one
softmax per query head, averaged over heads, and ``I(t, s) = Σ_j w(t,j)·ReLU(qi(t,j)·ki(s))``.
Its gradient reaches ``qi``, ``ki`` and ``w`` only: ``dKL/dI(t,s) = softmax(I_t)_s - p_t(s)``.

The torch path (:func:`distill.dsa.kernels.sparse_kl`) gathers ``k[idx]`` and ``ki[idx]``
as [T, K, ...] tensors and recomputes them in backward: on one H100 at 16k tokens and
K = 2,048 that was 1.8 s of a 1.86 s layer (BENCHMARKS.md). Here one program per query
walks its selected keys in blocks, twice (the heads' log-sum-exps and the index
softmax's, then the KL; with the heads' log-sum-exps given, from the sparse attention's
forward over the same keys, the first walk reads the index keys alone); no [T, K, ...]
keys are gathered and only the int32 ``idx``
[T, K] is kept. The layer sums the KL over tokens, so its gradient is known in the forward:
the second walk computes it too (:func:`sparse_kl_sum_triton`, scattering ``dki`` with fp32
atomic adds) and the backward only scales it. The per-token :func:`sparse_kl_triton` has a
backward kernel that walks the keys again with the saved log-sum-exps. On by default with
Triton on CUDA (``DISTILL_DSA_FUSED_KL=0`` selects the torch path): on one H100 the
per-token kernel and its backward took 39.8 ms forward + backward at 16k tokens against
1,807 ms for the torch path; at 32k (one H100, 2026-12-07, one run) the sum with its gradient
from the forward took 40.5 ms (MQA shape) and 41.7 (Qwen2) against 52.3 and 53.5 for the
per-token kernel and its backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

# the atomic adds' memory order, read at each launch (bench/dsa.py times both); kernels.py
# imports this module only inside a call, so no cycle
from distill.dsa import kernels

try:
    import triton
    import triton.language as tl

    from distill.dsa.select_kernel import _online_lse

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

BLOCK_N = 64  # selected keys per step
# both kernels' launch (Triton's defaults), read at each launch: bench/dsa.py --sweep-kl
# times others
KL_LAUNCH = {"num_warps": 4, "num_stages": 3}
# the main attention's logits from fp32 copies of q and each key block (True) or from the
# inputs' own dtype (False: bf16 on a GPU, exact products and fp32 sums, as the sparse
# attention's kernel computes them, with half the registers; so the log-sum-exps it reads
# from that kernel, kernels.SHARE_LSE, are of the same logits). On one H100 (2026-12-06
# 18:55 UTC, MQA shape, 32k, one run) the fused KL took 52.2 ms forward + backward from
# bf16 against 64.7 from fp32 copies (timed as kl_fused_native then; bench/dsa.py now
# times fp32 as kl_fused_fp32); the GPU test checked both settings against the torch path
# on that GPU.
MAIN_DOT_FP32 = False


# the index KL kernel's launch (index_kl_sum_triton), read at each launch: keys a step,
# warps, stages. One H100 at 32k (2026-12-07 07:30 UTC, MQA shape, one sweep of 18,
# bench/dsa.py --sweep-new): 11.6 ms forward + backward against 17.5 at 64 keys and 3
# stages; 11.8 at 64 keys, 2 warps, 2 stages
INDEX_KL_LAUNCH = {"BN": 128, "num_warps": 4, "num_stages": 2}

# the layer's KL (a sum over tokens, so every token's gradient is the same scalar) takes its
# gradient from the forward kernel's second walk over the keys (sparse_kl_sum_triton), as
# fused linear cross-entropy kernels do: no backward kernel walking the keys a third time
# with the main logits recomputed; the gradients wait in memory instead, fp32: dqi
# [T, Hi, Di], dki [T, Di], dw [T, Hi] (1.3 KB a token with bench/dsa.py's 4 index heads
# of 64). One H100 at 32k (2026-12-07, one run): 40.5 ms forward + backward against 52.3
# (MQA shape), 41.7 against 53.5 (Qwen2 shape).
# False: the per-token KL and its backward kernel.
GRAD_IN_FORWARD = True


def sparse_kl_sum_triton(q, k, qi, ki, w, idx: Tensor, scale: float, lse=None) -> Tensor:
    """``sparse_kl_triton(...).sum()`` with its gradient computed in the forward walk
    (only when one will be asked for: grad mode on and an indexer tensor requiring it)."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (qi, ki, w))
    return _SparseKLSum.apply(q.detach(), k.detach(), qi, ki, w, idx, scale, lse, grad)


def index_kl_sum_triton(qi, ki, w, idx: Tensor, p: Tensor, lsei: Tensor | None = None) -> Tensor:
    """:func:`sparse_kl_sum_triton` with ``p`` [T, K] given: the mean over the main heads
    of each selected key's attention probability, which the sparse attention's forward
    writes from its own logits (``kernels._SparseAttention`` with ``want_p``). The main
    heads are not read again: the kernel walks the index keys alone, once where ``lsei``
    [T] (the log-sum-exp of each token's selected index scores, the row selection's) is
    given, twice where it computes them."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (qi, ki, w))
    return _IndexKLSum.apply(qi, ki, w, idx, p.detach(), grad, lsei)


def sparse_kl_triton(q, k, qi, ki, w, idx: Tensor, scale: float, lse=None) -> Tensor:
    """Per-token KL [T] (fp32); ``q`` [T, H, D] and ``k`` [T, Hkv, D] carry no gradient.
    ``lse`` [T, H]: the main heads' log-sum-exps over the same selected keys (the sparse
    attention's forward: the second output of ``kernels._SparseAttention``), which spares
    the kernel one of its two walks over the main keys."""
    return _SparseKL.apply(q.detach(), k.detach(), qi, ki, w, idx, scale, lse)


if HAVE_TRITON:

    @triton.jit
    def _main_scores(q, K, safe, ok, rs, sub, mhead, rd, md, s_kt, s_kh, scale,
                     HKV: tl.constexpr, R: tl.constexpr, NS: tl.constexpr, BR: tl.constexpr,
                     BN: tl.constexpr, BD: tl.constexpr):  # fmt: skip
        """[NS, BR, BN] attention logits of the query heads (``q`` [NS, BR, BD], see
        ``_slots``) against the block's keys, each head against its own KV head: the r-th
        KV head of every slot in one batched dot with its slot's rows (``sub``: each row's
        r); -inf for keys not selected and padded rows. With one slot of 64 rows or more
        (every head in it, e.g. MQA's 64) the dot is a plain 2D one: compiled for sm_90
        (Triton 3.9, which needs no GPU for it), a batched 3D dot lowers to the pre-Hopper
        MMA where this one takes Hopper's warpgroup MMA, as the attention's does. Smaller
        slots (the Qwen2-0.5B shape's 16 rows) keep the 3D dot: their 2D one took the old
        MMA too, and spilled 32 bytes of registers with fp32 logits (225 registers, no
        spill, with the 3D dot)."""
        s = tl.zeros((NS, BR, BN), tl.float32)
        for r in tl.static_range(R):
            if NS == 1 and BR >= 64:  # hk = r < R = HKV; 64 rows: what a warpgroup MMA takes
                kb = tl.load(
                    K + safe[:, None] * s_kt + r * s_kh + rd[None, :],
                    mask=ok[:, None] & md[None, :],
                    other=0.0,
                ).to(q.dtype)  # [BN, BD]
                d2 = tl.dot(tl.reshape(q, (BR, BD)), tl.trans(kb))  # [BR, BN]
                s = tl.where((sub == r)[None, :, None], d2[None, :, :], s)
            else:
                hk = rs * R + r  # [NS]
                kb = tl.load(
                    K + safe[None, :, None] * s_kt + hk[:, None, None] * s_kh + rd[None, None, :],
                    mask=(hk < HKV)[:, None, None] & ok[None, :, None] & md[None, None, :],
                    other=0.0,
                ).to(q.dtype)  # [NS, BN, BD]
                s = tl.where((sub == r)[None, :, None], tl.dot(q, tl.trans(kb, 0, 2, 1)), s)
        return tl.where(mhead[:, :, None] & ok[None, None, :], s * scale, float("-inf"))

    @triton.jit
    def _query(Q, QI, W, t, heads, mhead, rd, rj, re, md, mj, me,
               s_qt, s_qh, s_qit, s_qih, s_wt, FP32: tl.constexpr):  # fmt: skip
        """The query's main heads in slots [NS, BR, BD] (``heads``: their numbers; fp32
        with ``FP32``, else the input's dtype), index heads [BHI, BDI] and weights [BHI]."""
        q = tl.load(
            Q + t * s_qt + heads[:, :, None] * s_qh + rd[None, None, :],
            mask=mhead[:, :, None] & md[None, None, :],
            other=0.0,
        )
        if FP32:
            q = q.to(tl.float32)
        qi, w = _index_query(QI, W, t, rj, re, mj, me, s_qit, s_qih, s_wt)
        return q, qi, w

    @triton.jit
    def _index_query(QI, W, t, rj, re, mj, me, s_qit, s_qih, s_wt):
        """The query's index heads [BHI, BDI] and weights [BHI], fp32."""
        qi = tl.load(
            QI + t * s_qit + rj[:, None] * s_qih + re[None, :],
            mask=mj[:, None] & me[None, :],
            other=0.0,
        ).to(tl.float32)
        return qi, tl.load(W + t * s_wt + rj, mask=mj, other=0.0).to(tl.float32)

    @triton.jit
    def _block(q, qi, w, K, KI, IDX, t, start, n_sel, rs, sub, mhead, rn, rd, md, re, me,
               s_it, s_kt, s_kh, s_kit, scale, HKV: tl.constexpr, R: tl.constexpr,
               NS: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
               BD: tl.constexpr):  # fmt: skip
        """One block of the query's selected keys: which are selected (``ok``) and where
        (``safe``), the main logits [NS, BR, BN], ReLU's input [BHI, BN], the index keys
        [BN, BDI] and the index scores [BN]; -inf logits and scores where not selected."""
        ok, safe, z, kib, idx_s = _index_block(qi, w, KI, IDX, t, start, n_sel, rn, re, me,
                                               s_it, s_kit)  # fmt: skip
        s = _main_scores(q, K, safe, ok, rs, sub, mhead, rd, md, s_kt, s_kh, scale,
                         HKV, R, NS, BR, BN, BD)  # fmt: skip
        return ok, safe, s, z, kib, idx_s

    @triton.jit
    def _index_block(qi, w, KI, IDX, t, start, n_sel, rn, re, me, s_it, s_kit):
        """:func:`_block` without the main logits: ``ok``, ``safe``, ReLU's input, the
        index keys and the index scores."""
        cols = start + rn
        ids = tl.load(IDX + t * s_it + cols, mask=cols < n_sel, other=-1)
        ok = ids >= 0
        safe = tl.where(ok, ids, 0)
        kib = tl.load(
            KI + safe[:, None] * s_kit + re[None, :], mask=ok[:, None] & me[None, :], other=0.0
        ).to(tl.float32)
        z = tl.dot(qi, tl.trans(kib))
        idx_s = tl.where(ok, tl.sum(tl.maximum(z, 0.0) * w[:, None], 0), float("-inf"))
        return ok, safe, z, kib, idx_s

    @triton.jit
    def _index_grads(di, z, w, qi, kib, safe, ok, re, me, DKI, s_kit, dw, dqi,
                     SEM: tl.constexpr):  # fmt: skip
        """One key block's share of the indexer's gradient from ``di`` = dKL/dI [BN]:
        ``dw`` and ``dqi`` accumulated and returned, ``dki`` added into ``DKI``."""
        dw += tl.sum(tl.maximum(z, 0.0) * di[None, :], 1)
        dz = tl.where(z > 0, w[:, None] * di[None, :], 0.0)  # [BHI, BN]
        dqi += tl.dot(dz, kib)
        dkib = tl.dot(tl.trans(dz), qi)  # [BN, BDI]
        tl.atomic_add(
            DKI + safe[:, None] * s_kit + re[None, :], dkib, mask=ok[:, None] & me[None, :],
            sem=SEM,
        )  # fmt: skip
        return dw, dqi

    @triton.jit
    def _kl_block(p, idx_s, lsei, ok, kl, z, w, qi, kib, safe, re, me, DKI, s_kit, dw, dqi,
                  GRAD: tl.constexpr, SEM: tl.constexpr):  # fmt: skip
        """One key block's KL terms from ``p`` and the index scores, added to ``kl``; with
        ``GRAD`` its share of the indexer's gradient too (``dKL/dI = softmax(I) - p``)."""
        term = tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0) - p * (idx_s - lsei)
        kl += tl.sum(tl.where(ok & (p > 0), term, 0.0), 0)
        if GRAD:
            di = tl.where(ok, tl.exp(idx_s - lsei) - p, 0.0)
            dw, dqi = _index_grads(di, z, w, qi, kib, safe, ok, re, me, DKI, s_kit, dw, dqi,
                                   SEM)  # fmt: skip
        return kl, dw, dqi

    @triton.jit
    def _store_index_grads(DQI, DW, dqi, dw, t, rj, re, mj, me, s_qit, s_qih, s_wt):
        tl.store(
            DQI + t * s_qit + rj[:, None] * s_qih + re[None, :], dqi, mask=mj[:, None] & me[None, :]
        )
        tl.store(DW + t * s_wt + rj, dw, mask=mj)

    @triton.jit
    def _kl_fwd_kernel(
        Q, K, QI, KI, W, IDX, KL, LSE, LSEI, DQI, DKI, DW, scale, n_sel,
        s_qt, s_qh, s_kt, s_kh, s_qit, s_qih, s_kit, s_wt, s_it, s_lt,
        H: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, R: tl.constexpr,
        NS: tl.constexpr, BR: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
        HI: tl.constexpr, BHI: tl.constexpr,
        DI: tl.constexpr, BDI: tl.constexpr, BN: tl.constexpr, FP32: tl.constexpr,
        HAS_LSE: tl.constexpr, GRAD: tl.constexpr, SEM: tl.constexpr,
    ):  # fmt: skip
        """With ``HAS_LSE`` the heads' log-sum-exps are read from ``LSE`` (the sparse
        attention's forward computed them over the same keys), and the first walk reads
        the index keys alone; without, it computes them and stores them there. With
        ``GRAD`` the second walk also writes the gradient of ``Σ_t KL_t`` into ``DQI``,
        ``DKI`` (atomic adds) and ``DW``, as the backward kernel does with a gradient of
        1 for every token."""
        t = tl.program_id(0)
        rs, rr = tl.arange(0, NS), tl.arange(0, BR)
        rd, rn, rj, re = tl.arange(0, BD), tl.arange(0, BN), tl.arange(0, BHI), tl.arange(0, BDI)
        md, mj, me = rd < D, rj < HI, re < DI
        heads = rs[:, None] * (R * G) + rr[None, :]  # [NS, BR]: slot s holds R groups
        mhead = (rr < R * G)[None, :] & (heads < H)
        sub = rr // G  # which of its slot's R KV heads a row reads
        q, qi, w = _query(Q, QI, W, t, heads, mhead, rd, rj, re, md, mj, me,
                          s_qt, s_qh, s_qit, s_qih, s_wt, FP32)  # fmt: skip
        m = tl.full((NS, BR), float("-inf"), tl.float32)
        l_h = tl.zeros((NS, BR), tl.float32)
        mi = tl.max(tl.full((BN,), float("-inf"), tl.float32), 0)
        li = tl.sum(tl.zeros((BN,), tl.float32), 0)
        for start in range(0, n_sel, BN):  # pass 1: log-sum-exps
            if HAS_LSE:
                ok, safe, z, kib, idx_s = _index_block(
                    qi, w, KI, IDX, t, start, n_sel, rn, re, me, s_it, s_kit
                )
            else:
                ok, safe, s, z, kib, idx_s = _block(
                    q, qi, w, K, KI, IDX, t, start, n_sel, rs, sub, mhead, rn, rd, md, re, me,
                    s_it, s_kt, s_kh, s_kit, scale, HKV, R, NS, BR, BN, BD,
                )  # fmt: skip
                m_new = tl.maximum(m, tl.max(s, 2))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_h = l_h * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, :, None]), 2)
                m = m_new
            mi, li = _online_lse(mi, li, idx_s)
        # no key (or a padded head): +inf, so that exp(x - lse) = 0 everywhere below
        if HAS_LSE:
            lse = tl.load(LSE + t * s_lt + heads, mask=mhead, other=float("inf"))
        else:
            lse = tl.where(l_h > 0, m + tl.log(tl.where(l_h > 0, l_h, 1.0)), float("inf"))
        lsei = tl.where(li > 0, mi + tl.log(tl.where(li > 0, li, 1.0)), float("inf"))
        kl = tl.sum(tl.zeros((BN,), tl.float32), 0)
        dqi = tl.zeros((BHI, BDI), tl.float32)
        dw = tl.zeros((BHI,), tl.float32)
        for start in range(0, n_sel, BN):  # pass 2: the KL (and with GRAD its gradient)
            ok, safe, s, z, kib, idx_s = _block(
                q, qi, w, K, KI, IDX, t, start, n_sel, rs, sub, mhead, rn, rd, md, re, me,
                s_it, s_kt, s_kh, s_kit, scale, HKV, R, NS, BR, BN, BD,
            )  # fmt: skip
            p = tl.sum(tl.sum(tl.exp(s - lse[:, :, None]), 1), 0) / H
            kl, dw, dqi = _kl_block(p, idx_s, lsei, ok, kl, z, w, qi, kib, safe, re, me, DKI,
                                    s_kit, dw, dqi, GRAD, SEM)  # fmt: skip
        tl.store(KL + t, kl)
        if GRAD:
            _store_index_grads(DQI, DW, dqi, dw, t, rj, re, mj, me, s_qit, s_qih, s_wt)
        if not HAS_LSE:
            tl.store(LSE + t * s_lt + heads, lse, mask=mhead)
        tl.store(LSEI + t, lsei)

    @triton.jit
    def _kl_bwd_kernel(
        Q, K, QI, KI, W, IDX, LSE, LSEI, GOUT, DQI, DKI, DW, scale, n_sel,
        s_qt, s_qh, s_kt, s_kh, s_qit, s_qih, s_kit, s_wt, s_it, s_lt,
        H: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, R: tl.constexpr,
        NS: tl.constexpr, BR: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
        HI: tl.constexpr, BHI: tl.constexpr,
        DI: tl.constexpr, BDI: tl.constexpr, BN: tl.constexpr, SEM: tl.constexpr,
        FP32: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        rs, rr = tl.arange(0, NS), tl.arange(0, BR)
        rd, rn, rj, re = tl.arange(0, BD), tl.arange(0, BN), tl.arange(0, BHI), tl.arange(0, BDI)
        md, mj, me = rd < D, rj < HI, re < DI
        heads = rs[:, None] * (R * G) + rr[None, :]  # [NS, BR]: slot s holds R groups
        mhead = (rr < R * G)[None, :] & (heads < H)
        sub = rr // G  # which of its slot's R KV heads a row reads
        q, qi, w = _query(Q, QI, W, t, heads, mhead, rd, rj, re, md, mj, me,
                          s_qt, s_qh, s_qit, s_qih, s_wt, FP32)  # fmt: skip
        lse = tl.load(LSE + t * s_lt + heads, mask=mhead, other=float("inf"))
        lsei = tl.load(LSEI + t)
        g = tl.load(GOUT + t)
        dqi = tl.zeros((BHI, BDI), tl.float32)
        dw = tl.zeros((BHI,), tl.float32)
        for start in range(0, n_sel, BN):
            ok, safe, s, z, kib, idx_s = _block(
                q, qi, w, K, KI, IDX, t, start, n_sel, rs, sub, mhead, rn, rd, md, re, me,
                s_it, s_kt, s_kh, s_kit, scale, HKV, R, NS, BR, BN, BD,
            )  # fmt: skip
            p = tl.sum(tl.sum(tl.exp(s - lse[:, :, None]), 1), 0) / H
            di = tl.where(ok, g * (tl.exp(idx_s - lsei) - p), 0.0)  # dKL/dI [BN]
            dw, dqi = _index_grads(di, z, w, qi, kib, safe, ok, re, me, DKI, s_kit, dw, dqi,
                                   SEM)  # fmt: skip
        _store_index_grads(DQI, DW, dqi, dw, t, rj, re, mj, me, s_qit, s_qih, s_wt)

    @triton.jit
    def _index_kl_kernel(
        QI, KI, W, IDX, P, LSEI, KL, DQI, DKI, DW, n_sel,
        s_qit, s_qih, s_kit, s_wt, s_it, s_pt,
        HI: tl.constexpr, BHI: tl.constexpr, DI: tl.constexpr, BDI: tl.constexpr,
        BN: tl.constexpr, GRAD: tl.constexpr, SEM: tl.constexpr, HAS_LSEI: tl.constexpr,
    ):  # fmt: skip
        """:func:`_kl_fwd_kernel` with ``p`` given (``P`` [T, K], the sparse attention's
        forward wrote it): two walks over the index keys alone, no main logits (one with
        ``HAS_LSEI``: the index softmax's log-sum-exps given in ``LSEI``); with ``GRAD``
        the last also writes the gradient of ``Σ_t KL_t``."""
        t = tl.program_id(0)
        rn, rj, re = tl.arange(0, BN), tl.arange(0, BHI), tl.arange(0, BDI)
        mj, me = rj < HI, re < DI
        qi, w = _index_query(QI, W, t, rj, re, mj, me, s_qit, s_qih, s_wt)
        if HAS_LSEI:
            lsei = tl.load(LSEI + t)
        else:
            mi = tl.max(tl.full((BN,), float("-inf"), tl.float32), 0)
            li = tl.sum(tl.zeros((BN,), tl.float32), 0)
            for start in range(0, n_sel, BN):  # walk 1: the index softmax's log-sum-exp
                _, _, _, _, idx_s = _index_block(qi, w, KI, IDX, t, start, n_sel, rn, re, me,
                                                 s_it, s_kit)  # fmt: skip
                mi, li = _online_lse(mi, li, idx_s)
            lsei = tl.where(li > 0, mi + tl.log(tl.where(li > 0, li, 1.0)), float("inf"))
        kl = tl.sum(tl.zeros((BN,), tl.float32), 0)
        dqi = tl.zeros((BHI, BDI), tl.float32)
        dw = tl.zeros((BHI,), tl.float32)
        for start in range(0, n_sel, BN):  # walk 2: the KL (and with GRAD its gradient)
            ok, safe, z, kib, idx_s = _index_block(qi, w, KI, IDX, t, start, n_sel, rn, re,
                                                   me, s_it, s_kit)  # fmt: skip
            cols = start + rn
            p = tl.load(P + t * s_pt + cols, mask=ok, other=0.0)
            kl, dw, dqi = _kl_block(p, idx_s, lsei, ok, kl, z, w, qi, kib, safe, re, me, DKI,
                                    s_kit, dw, dqi, GRAD, SEM)  # fmt: skip
        tl.store(KL + t, kl)
        if GRAD:
            _store_index_grads(DQI, DW, dqi, dw, t, rj, re, mj, me, s_qit, s_qih, s_wt)

    def _slots(h: int, hkv: int) -> dict:
        """How the kernels lay out the main query heads: ``NS`` slots of ``BR`` rows, slot
        s holding the heads of ``R`` KV heads (R · G rows, padded). Each KV head's keys are
        multiplied against its slot's rows only. A dot takes at least 16 rows: one slot of
        every head (R = HKV) multiplies each key by HKV · max(16, H) rows where H are needed;
        one slot per KV head (R = 1) pads a small group to 16 rows, which the softmaxes
        then run over. R is the one with the fewest rows (the elementwise work), then
        the fewest dot rows: never more of either than R = HKV (e.g. H = 32, HKV = 8: R = 4,
        half the dot products, the same 32 rows)."""
        g, p2 = h // hkv, triton.next_power_of_2

        def cost(r: int) -> tuple[int, int]:
            ns, br = p2(triton.cdiv(hkv, r)), max(16, p2(r * g))
            return ns * br, ns * r * br

        r = min(range(1, hkv + 1), key=cost)
        return dict(R=r, NS=p2(triton.cdiv(hkv, r)), BR=max(16, p2(r * g)))

    def _meta(q: Tensor, k: Tensor, qi: Tensor) -> dict:
        h, d = q.shape[1], q.shape[2]
        hkv, hi, di = k.shape[1], qi.shape[1], qi.shape[2]
        p2 = triton.next_power_of_2
        return dict(
            H=h, G=h // hkv, HKV=hkv, **_slots(h, hkv), D=d, BD=max(16, p2(d)),
            HI=hi, BHI=max(16, p2(hi)), DI=di, BDI=max(16, p2(di)), BN=BLOCK_N,
            FP32=MAIN_DOT_FP32,
        )  # fmt: skip

    def _launch_forward(q, k, qi, ki, w, idx, scale, lse, grad: bool):
        """The forward kernel: per-token KL [T] and what the backward reads; with ``grad``
        also the gradient of ``Σ_t KL_t`` into the indexer's fp32 copies."""
        q, k = q.contiguous(), k.contiguous()
        # fp32 copies of the indexer's (small) tensors: the gradients come back in fp32
        qi, ki, w = (x.float().contiguous() for x in (qi, ki, w))
        idx = idx.to(torch.int32).contiguous()
        t = q.shape[0]
        kl = torch.empty(t, dtype=torch.float32, device=q.device)
        has_lse = lse is not None  # read, not written: it is the attention's too
        if has_lse:
            lse = lse.float().contiguous()
        else:
            lse = torch.empty(t, q.shape[1], dtype=torch.float32, device=q.device)
        lsei = torch.empty(t, dtype=torch.float32, device=q.device)
        grads = (torch.empty_like(qi), torch.zeros_like(ki), torch.empty_like(w)) if grad else None
        dqi, dki, dw = grads or (kl, kl, kl)  # not written without GRAD
        _kl_fwd_kernel[(t,)](
            q, k, qi, ki, w, idx, kl, lse, lsei, dqi, dki, dw, scale, idx.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), qi.stride(0),
            qi.stride(1), ki.stride(0), w.stride(0), idx.stride(0), lse.stride(0),
            **_meta(q, k, qi), **KL_LAUNCH, HAS_LSE=has_lse, GRAD=grad,
            SEM=kernels.ATOMIC_SEM,
        )  # fmt: skip
        return kl, (q, k, qi, ki, w, idx, lse, lsei), grads

    class _SparseKL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, qi, ki, w, idx, scale, lse=None):
            kl, saved, _ = _launch_forward(q, k, qi, ki, w, idx, scale, lse, grad=False)
            ctx.save_for_backward(*saved)
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
                **_meta(q, k, qi), SEM=kernels.ATOMIC_SEM, **KL_LAUNCH,
            )  # fmt: skip
            dq_i, dk_i, d_w = ctx.dtypes
            return None, None, dqi.to(dq_i), dki.to(dk_i), dw.to(d_w), None, None, None

    def _launch_index_kl(qi, ki, w, idx, p, grad: bool, lsei=None):
        """The index KL kernel: per-token KL [T] and, with ``grad``, the gradient of its
        sum (fp32: ``dqi``, ``dki``, ``dw``); ``lsei`` [T]: the index softmax's
        log-sum-exps, given."""
        # the query side in fp32 copies (read once a token); the index keys, read twice a
        # selected key, in their own dtype (half the bytes in bf16), widened in registers
        qi, w = qi.float().contiguous(), w.float().contiguous()
        ki = ki.contiguous()
        idx, p = idx.to(torch.int32).contiguous(), p.contiguous()
        t = qi.shape[0]
        kl = torch.empty(t, dtype=torch.float32, device=qi.device)
        grads = None
        if grad:
            grads = (torch.empty_like(qi), torch.zeros(ki.shape, dtype=torch.float32,
                     device=ki.device), torch.empty_like(w))  # fmt: skip
        dqi, dki, dw = grads or (kl, kl, kl)  # not written without GRAD
        hi, di = qi.shape[1], qi.shape[2]
        p2 = triton.next_power_of_2
        launch = dict(INDEX_KL_LAUNCH)
        has_lsei = lsei is not None
        lsei = lsei.float().contiguous() if has_lsei else kl  # not read without HAS_LSEI
        _index_kl_kernel[(t,)](
            qi, ki, w, idx, p, lsei, kl, dqi, dki, dw, idx.shape[1],
            qi.stride(0), qi.stride(1), ki.stride(0), w.stride(0), idx.stride(0), p.stride(0),
            HI=hi, BHI=max(16, p2(hi)), DI=di, BDI=max(16, p2(di)), BN=launch.pop("BN"),
            GRAD=grad, SEM=kernels.ATOMIC_SEM, HAS_LSEI=has_lsei, **launch,
        )  # fmt: skip
        return kl, grads

    class _IndexKLSum(torch.autograd.Function):
        """``Σ_t KL_t`` from ``p`` given, its gradient computed in the forward and scaled
        by the incoming one in backward (as :class:`_SparseKLSum`)."""

        @staticmethod
        def forward(ctx, qi, ki, w, idx, p, grad, lsei=None):
            kl, grads = _launch_index_kl(qi, ki, w, idx, p, grad, lsei)
            return _keep_sum(ctx, kl, grads, (qi, ki, w))

        @staticmethod
        def backward(ctx, g):
            return *_scaled(ctx, g), None, None, None, None

    def _keep_sum(ctx, kl: Tensor, grads, inputs) -> Tensor:
        """The KL's sum; its gradient in fp32 saved (when computed) for ``_scaled``."""
        if grads is not None:
            ctx.save_for_backward(*grads)
        ctx.dtypes = tuple(x.dtype for x in inputs)
        return kl.sum()

    def _scaled(ctx, g: Tensor) -> list[Tensor]:
        """The saved gradient of the sum times the incoming one, in the inputs' dtypes."""
        return [(x * g).to(dt) for x, dt in zip(ctx.saved_tensors, ctx.dtypes, strict=True)]

    class _SparseKLSum(torch.autograd.Function):
        """``Σ_t KL_t``, its gradient computed in the forward (see :data:`GRAD_IN_FORWARD`)
        and scaled by the incoming one in backward."""

        @staticmethod
        def forward(ctx, q, k, qi, ki, w, idx, scale, lse, grad):
            kl, _, grads = _launch_forward(q, k, qi, ki, w, idx, scale, lse, grad=grad)
            return _keep_sum(ctx, kl, grads, (qi, ki, w))

        @staticmethod
        def backward(ctx, g):
            return None, None, *_scaled(ctx, g), None, None, None, None

"""DSA on the GPU for flat rows of packed traces: work and memory O(T · top_k), not O(T²).

Per layer, for a row of T tokens with trace boundaries ``cu``:

1. indexer scores, query chunk by query chunk, against the keys of the chunk's traces
   (a Triton kernel fuses the ReLU and the head weighting, so the [C, Hi, Tk] logits never
   exist; without Triton, torch computes them per chunk), then the selection: ``idx``
   [T, K] with -1 where a query has fewer than K earlier keys in its trace; on CUDA one
   program a row over the fp32 scores (``SELECT_ROWS``: ``select_kernel.rows_select``),
   else ``torch.topk`` over rank keys (or, with ``SELECT_FUSED``, one kernel scoring and
   selecting: :mod:`distill.dsa.select_kernel`);
2. attention over ``idx``: a Triton kernel, forward (online softmax over the gathered
   keys, one program per token and KV head, the heads of a GQA group together) and
   backward (dQ per program; dK and dV scattered with fp32 atomic adds, relaxed:
   ``ATOMIC_SEM``); without Triton,
   torch gathers the selected keys chunk by chunk (checkpointed);
3. the indexer's KL: over the selected keys (sparse phase) from the p the attention's
   forward writes and the index keys (``P_IN_FORWARD``; or a fused Triton kernel,
   :mod:`distill.dsa.kl_kernel`), without Triton torch chunk by chunk, checkpointed; over
   every key of the trace with dense attention (warm-up), torch chunk by chunk.

The torch code here is device-agnostic, so the tests check it against the reference on
CPU; the Triton kernels run on CUDA, or on CPU under ``TRITON_INTERPRET=1`` in the tests.
This module imports on machines without Triton; ``HAVE_TRITON`` says what is there.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distill.dsa import attention as A
from distill.dsa import select_kernel

try:
    import triton
    import triton.language as tl

    from distill.dsa.select_kernel import _score_order, _tile_scores

    HAVE_TRITON = True
except ImportError:  # CPU-only machines: the torch paths below
    HAVE_TRITON = False

BUDGET = 1 << 26  # elements of the largest per-chunk temporary (256 MB in fp32)
BLOCK_N = 64  # selected keys per step of the attention kernels
# the sparse-attention kernels' launch, read at each launch: BLOCK_N keys a step and
# Triton's default warps and stages; bench/dsa.py --sweep sets it to time others. At the
# Qwen2 shape (7 query heads a KV head) its sweep's best was 4% faster, within noise.
SPARSE_LAUNCH = {"BN": BLOCK_N, "num_warps": 4, "num_stages": 3}
# a head group of 64 rows or more (MQA: 64 heads over one KV head): at 4 warps the default
# spills registers (bench/dsa_compile.py), and on one H100 (2026-12-06 18:55 UTC, 32k, one
# sweep) 32 keys a step and 2 stages took 41.3 ms forward + backward against the default's
# 49.8 (forward 6.6 against 9.1); bench/dsa.py --sweep sets this one at such shapes
SPARSE_LAUNCH_WIDE = {"BN": 32, "num_warps": 4, "num_stages": 2}
WIDE_GROUP = 64
# the memory order of the backward kernels' dK, dV (and the KL's dki) atomic adds: only
# their sums after the kernel are read, so nothing needs the fences of Triton's default
# "acq_rel"; "relaxed" is CUDA's own default for atomicAdd. bench/dsa.py times both.
ATOMIC_SEM = "relaxed"
FUSED_KL = "DISTILL_DSA_FUSED_KL"  # "0": the sparse phase's KL in torch, not kl_kernel.py
# the sparse phase's fused KL reads the main heads' log-sum-exps from the sparse attention's
# forward (the same keys, the same logits) instead of walking the main keys for them itself:
# one walk of its forward's two. On one H100 (2026-12-06 18:55 UTC, MQA shape, 32k, one
# run) with kl_kernel.MAIN_DOT_FP32 off, the layer took 123.3 ms against 147.5 without
# both (timed as dsa_next then; bench/dsa.py now times the old defaults as dsa_before).
# The GPU test checked it on a GPU with fp32 logits, and the whole bf16 path with it on
# one H100 (2026-12-07 02:43 UTC). False walks the keys again.
SHARE_LSE = True
# the sparse phase's KL target p (the main attention over the selected keys, the mean over
# heads) written by the sparse attention's forward, in a second walk over the keys once
# its log-sum-exps are known, and the KL and its gradient from p and the index keys alone
# (kl_kernel.index_kl_sum_triton): the fused KL kernel's main logits (a walk over the
# main keys per token with every head) are not computed again. Costs a [T, K] fp32 buffer
# for the layer's forward (268 MB at 32k, top-k 2,048). One H100 at 32k (2026-12-07 07:30
# UTC, one run; bench/dsa.py: dsa_p_fwd then): the layer 103.4 ms against 106.0 with the
# fused KL (MQA shape), 84.7 against 95.8 (Qwen2). False: the fused KL kernel.
P_IN_FORWARD = True
# the forward's walk for p: keys a step. Its logits are laid out a key a row ([BNP,
# heads]: the sum over a key's heads stays within a row's threads). One H100 (2026-12-07,
# MQA shape, 32k, one run each): laid out a head a row as the attention's (the sum
# crossing warps) at 32 keys the forward took 15.3 ms against 6.4 without the walk (07:30);
# at 07:41 (a sweep of 6) a key a row at 64 keys 11.35, a head a row 12.9, 32 or 128 keys
# 13.3-15.4: the head-row layout is gone
P_WALK = {"BNP": 64}
# the index KL's softmax over the selected keys divided by the log-sum-exp of their scores
# as the row selection had them (select_kernel.rows_select: the score kernel's sums), not
# by the KL kernel's first walk over the index keys recomputing them (kl_kernel.py); the
# same sums up to their order (the KL kernel's dot over fp32 copies of the same values).
# False (or a selection other than the row one): the KL kernel's walk.
LSE_FROM_SELECTION = True


def sparse_launch(group: int) -> dict:
    """The sparse kernels' launch for a head group of ``group`` query heads a KV head."""
    return SPARSE_LAUNCH_WIDE if group >= WIDE_GROUP else SPARSE_LAUNCH


def use_triton(x: Tensor) -> bool:
    if not HAVE_TRITON or os.environ.get("DISTILL_DSA_TRITON") == "0":
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def segment_starts(cu: Tensor, t: int) -> Tensor:
    """The first position of each token's trace [T] (long)."""
    seg = torch.searchsorted(cu[1:].long(), torch.arange(t, device=cu.device), right=True)
    return cu.long()[seg]


# --------------------------------------------------------------------------- selection


def index_topk(
    qi: Tensor, ki: Tensor, w: Tensor, starts: Tensor, top_k: int, max_len: int,
    with_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor | None]:  # fmt: skip
    """Each token's ``min(top_k, max_len)`` best earlier keys of its own trace by index
    score, [T, K] (int32 from the row selection, else int64), -1 where it has fewer. No
    gradient. ``with_lse``: also the log-sum-exp of each token's selected scores [T]
    (fp32; what the index KL's softmax divides by), from the row selection, which has
    them in hand; None from the other selections."""
    t, k_out = qi.shape[0], min(top_k, max_len)
    rows = SELECT_ROWS and use_triton(qi) and not SELECT_FUSED
    if not rows:
        idx = _index_topk(qi, ki, w, starts, top_k, max_len)
        return (idx, None) if with_lse else idx
    lse = torch.empty(t, dtype=torch.float32, device=qi.device) if with_lse else None
    chunk = SELECT_CHUNK or select_chunk_rows(max_len)
    # int32: what the attention and KL kernels read (int64 [T, K] at 32k and top-k 2,048 is
    # 537 MB, converted by each)
    idx = torch.full((t, k_out), -1, dtype=torch.int32, device=qi.device)
    firsts = starts[::chunk].tolist()  # one host sync for every chunk's first key
    with torch.no_grad():
        for n, a in enumerate(range(0, t, chunk)):
            b, lo = min(t, a + chunk), firsts[n]
            scores = _chunk_keys(qi, ki, w, starts, a, b, lo, ranked=False)
            out = None if lse is None else lse[a:b]
            select_kernel.rows_select(scores, idx[a:b], min(k_out, b - lo), a - lo, lo, out)
    return (idx, lse) if with_lse else idx


def select_chunk_rows(max_len: int) -> int:
    """Rows a chunk of the row selection at rows of up to ``max_len`` keys: BUDGET of the
    score kernel's fp32 scores beside the selection's scratch (two 4-byte values a key it
    copies out, CAP keys a row), or more, up to SELECT_MIN_ROWS while under SELECT_MAX."""
    per_row = max_len + 4096 + 2 * select_kernel.ROWS_SELECT_LAUNCH["CAP"]
    rows = max(BUDGET // per_row, min(SELECT_MIN_ROWS, SELECT_MAX // per_row))
    return max(16, min(4096, rows))


def _index_topk(
    qi: Tensor, ki: Tensor, w: Tensor, starts: Tensor, top_k: int, max_len: int
) -> Tensor:
    """:func:`index_topk` by the other selections: scores and selection in one kernel
    (``SELECT_FUSED``), the rank keys' top-k, or the fp32 scores' top-k repaired."""
    t, hi = qi.shape[0], qi.shape[1]
    k_out = min(top_k, max_len)
    if SELECT_FUSED and use_triton(qi):
        return select_kernel.fused_topk(qi, ki, w, starts, k_out)
    chunk = SELECT_CHUNK or max(16, min(4096, BUDGET // (hi * (max_len + 4096))))
    idx = torch.full((t, k_out), -1, dtype=torch.long, device=qi.device)
    firsts = starts[::chunk].tolist()  # one host sync for every chunk's first key
    with torch.no_grad():
        for n, a in enumerate(range(0, t, chunk)):
            b, lo = min(t, a + chunk), firsts[n]
            kk = min(k_out, b - lo)
            if SELECT_FP32:
                scores = _chunk_keys(qi, ki, w, starts, a, b, lo, ranked=False)
                j = _topk_tied(scores, kk)
                ok = scores.gather(-1, j) > float("-inf")
            else:
                keys = _chunk_keys(qi, ki, w, starts, a, b, lo)
                j = keys.topk(kk, dim=-1, sorted=False).indices  # any order
                ok = (keys.gather(-1, j) >> 32) > NO_KEY
            idx[a:b, :kk] = torch.where(ok, j + lo, -1)
    return idx


# the selection's top-k over fp32 scores (half the bytes of the int64 rank keys, and half
# the radix passes of a top-k), its ties repaired to the rank keys' choice where they
# decide the k-th key: the same keys either way (tests/test_dsa.py). Off: slower on one
# H100 at 32k (2026-12-07, one run; bench/dsa.py: select_fp32): 50.6 ms against 32.4 for
# the rank keys (MQA shape), 49.9 against 31.9 (Qwen2).
SELECT_FP32 = False


def _topk_tied(scores: Tensor, kk: int) -> Tensor:
    """``rank_key(scores).topk(kk).indices`` as a set, from a top-k of the fp32 scores:
    where a row's k-th score ties keys that top-k left out, it broke the tie its own way,
    and that row is selected again by its rank keys (ties to the later key). A row whose
    k-th score is -inf has fewer keys than ``kk`` and all of them selected: no repair."""
    vals, j = scores.topk(kk, dim=-1, sorted=False)
    kth = vals.min(-1, keepdim=True).values
    left_out = (scores == kth).sum(-1) > (vals == kth).sum(-1)
    rows = (left_out & (kth[:, 0] > float("-inf"))).nonzero()[:, 0]  # one host sync
    if len(rows):
        j[rows] = A.rank_key(scores[rows]).topk(kk, dim=-1, sorted=False).indices
    return j


# the selection in one Triton kernel (select_kernel.py: a radix select over the scores,
# recomputed, never stored) rather than the score kernel's [chunk, T] rank keys and
# torch.topk: the same keys (tests/test_dsa.py; on one H100 too, 0 rows differing). Off:
# slower on one H100 at 32k (2026-12-07, one run; bench/dsa.py: select_fused): 60.8 ms
# against 32.4 for the rank keys and topk (MQA shape), 60.9 against 31.9 (Qwen2).
SELECT_FUSED = False

# (the decode step's radix select over fp32 chunks of the rows, SELECT_RADIX until
# 2026-12-07, picked the same keys on one H100 but took 48.8 ms against 37.0 at the MQA
# shape and 30.6 against 32.9 at the Qwen2 shape: removed for SELECT_ROWS below)

# the selection's top-k by select_kernel.rows_select: the score kernel's fp32 scores, one
# program a row (a histogram of the scores' fp16 top byte, then the keys of the k-th's
# bin copied out and narrowed to the k-th score over the copy; ties to the later key, as
# the rank keys), chunks of select_chunk_rows (2,048 rows from 32k to 128k), two
# launches a chunk. One H100 at 32k (2026-12-07 07:30 UTC, one run; bench/dsa.py), when
# each row was read five times: 16.1 ms against 33.1 for the int64 rank keys and
# torch.topk (MQA shape), 15.9 against 31.6 (Qwen2); read twice (09:14 and 09:22 UTC):
# 9.6-10.1 against 32.3-32.9 (MQA shape, three runs), 10.0 against 35.3 (Qwen2); the same
# keys (0 rows differ in every run, and the GPU test). False: the rank keys and torch.topk.
SELECT_ROWS = True
# rows a chunk of the selection (None: from BUDGET, SELECT_MIN_ROWS and SELECT_MAX);
# bench/dsa.py sets it
SELECT_CHUNK = None
# The row selection runs one program a row, so BUDGET's scores alone left few programs a
# launch at long rows (1,489 rows at 32k, 468 at 128k) and the selection grew faster than
# T^2: at 2,048 rows a chunk it took 7.8 / 31.9 / 135.5 ms at 32k / 64k / 128k against
# 8.9 / 39.3 / 229.3 (Qwen2 shape, one H100, 2026-12-07 13:10 UTC, one run each; the
# layer 0.49x / 0.78x / 1.05x dense against 0.48x / 0.73x / 0.82x, at 0.08 / 0.18 / 0.37
# GB more peak; the MQA layer at 64k 4.94x against 4.68x, the same peak). So a chunk has at
# least SELECT_MIN_ROWS rows while its scores stay under SELECT_MAX elements (2 GB fp32).
SELECT_MIN_ROWS = 2048
SELECT_MAX = 1 << 29

# a -inf score's rank (the high half of its rank key): a key outside the query's span
NO_KEY = int(A.rank_key(torch.tensor([float("-inf")]))[0]) >> 32


def _chunk_keys(qi, ki, w, starts, a: int, b: int, lo: int, ranked: bool = True) -> Tensor:
    """:func:`~distill.dsa.attention.rank_key` of the scores of queries [a, b) against keys
    [lo, b), -inf outside each query's causal span of its own trace: [b - a, b - lo]
    int64; not ``ranked``, the fp32 scores. The Triton kernel writes the keys itself: the
    torch ops that turn scores into keys were ~13 ms of the 47 ms selection at 32k (MQA
    shape, H100 profile)."""
    if use_triton(qi):
        return _triton_scores(qi, ki, w, starts, a, b, lo, ranked=ranked)
    scores = _chunk_scores(qi, ki, w, starts, a, b, lo)
    return A.rank_key(scores) if ranked else scores


def _chunk_scores(qi, ki, w, starts, a: int, b: int, lo: int) -> Tensor:
    """Scores of queries [a, b) against keys [lo, b), -inf outside each query's causal
    span of its own trace: [b - a, b - lo] fp32, in torch (the Triton kernel's
    counterpart: ``_triton_scores``)."""
    s = A.index_scores(qi[None, a:b], ki[None, lo:b], w[None, a:b])[0]
    return s.masked_fill(~_span(starts, a, b, lo), float("-inf"))


def _span(starts: Tensor, a: int, b: int, lo: int) -> Tensor:
    """[b - a, b - lo] bool: key s is in query t's trace and not after it."""
    t = torch.arange(a, b, device=starts.device)[:, None]
    s = torch.arange(lo, b, device=starts.device)[None, :]
    return (s <= t) & (s >= starts[a:b, None])


# --------------------------------------------------------------------------- attention


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float) -> Tensor:
    """Attention of each token over its selected keys ``idx`` [T, K] (-1 = none):
    ``q`` [T, H, D], ``k`` and ``v`` [T, Hkv, D] -> [T, H, D]."""
    if use_triton(q):
        return _SparseAttention.apply(q, k, v, idx, scale)[0]
    t, h, d = q.shape
    chunk = max(1, BUDGET // max(1, idx.shape[1] * max(h, k.shape[1] * d)))
    outs = []
    for a in range(0, t, chunk):
        args = (q[a : a + chunk], k, v, idx[a : a + chunk], scale)
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        outs.append(checkpoint(_gathered, *args, use_reentrant=False) if grad else _gathered(*args))
    return torch.cat(outs)


def _gathered(q, k, v, idx, scale):
    """One chunk of :func:`sparse_attention` in torch: gather, then attend."""
    ok = idx >= 0
    sel = idx.clamp(min=0)
    out = A.attend_gathered(
        q.transpose(0, 1)[None],  # [1, H, C, D]
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        sel[None],
        ok[None],
        scale,
    )
    return out[0].transpose(0, 1)


# --------------------------------------------------------------------------- losses


def fused_kl(q: Tensor) -> bool:
    """Whether the sparse phase's KL runs in the fused Triton kernel: 39.8 ms against
    1,807 ms for the torch path at 16k tokens on one H100 (bench/dsa.py; BENCHMARKS.md);
    DISTILL_DSA_FUSED_KL=0 goes back."""
    return use_triton(q) and os.environ.get(FUSED_KL) != "0"


def sparse_kl(q, k, qi, ki, w, idx: Tensor, scale: float, lse=None) -> Tensor:
    """Σ_t KL(p_t ‖ softmax(I_t)) over each token's selected keys; the gradient reaches
    the indexer's ``qi``, ``ki``, ``w`` only. ``lse``: the main heads' log-sum-exps over
    the same keys, which the fused kernel then reads instead of computing."""
    if fused_kl(q):
        from distill.dsa import kl_kernel

        if kl_kernel.GRAD_IN_FORWARD:
            return kl_kernel.sparse_kl_sum_triton(q, k, qi, ki, w, idx, scale, lse=lse)
        return kl_kernel.sparse_kl_triton(q, k, qi, ki, w, idx, scale, lse=lse).sum()
    return sparse_kl_torch(q, k, qi, ki, w, idx, scale)


def sparse_kl_torch(q, k, qi, ki, w, idx: Tensor, scale: float) -> Tensor:
    """:func:`sparse_kl` in torch: the selected keys gathered chunk by chunk, each chunk
    checkpointed (recomputed in backward)."""
    t, h = q.shape[:2]
    chunk = max(1, BUDGET // max(1, idx.shape[1] * max(h, qi.shape[1], ki.shape[1])))
    total = None
    for a in range(0, t, chunk):
        args = (q[a : a + chunk].detach(), k.detach(), qi[a : a + chunk], ki)
        part = checkpoint(
            _sparse_kl_chunk, *args, w[a : a + chunk], idx[a : a + chunk], scale,
            use_reentrant=False,
        )  # fmt: skip
        total = part if total is None else total + part
    return total


def _sparse_kl_chunk(q, k, qi, ki, w, idx, scale):
    ok = idx >= 0
    sel = idx.clamp(min=0)
    c, h, d = q.shape
    hkv = k.shape[1]
    with torch.no_grad():
        kg = k[sel]  # [C, K, Hkv, D]
        s = torch.einsum("cngd,cknd->cngk", A._wide(q.view(c, hkv, h // hkv, d)), A._wide(kg))
        s = (s * scale).masked_fill(~ok[:, None, None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0).flatten(1, 2).mean(1)  # [C, K]
    logits = torch.einsum("chd,ckd->chk", A._wide(qi), A._wide(ki[sel])).relu()
    scores = torch.einsum("chk,ch->ck", logits, A._wide(w))
    return A.index_kl(p, scores, ok).sum()


def dense_kl(q, k, qi, ki, w, starts: Tensor, scale: float, max_len: int) -> Tensor:
    """Σ_t KL(p_t ‖ softmax(I_t)) over every earlier key of the token's trace (the
    warm-up), chunk by chunk."""
    t, h = q.shape[:2]
    chunk = max(16, min(4096, BUDGET // (max(h, qi.shape[1]) * (max_len + 4096))))
    firsts = starts[::chunk].tolist()
    total = None
    for n, a in enumerate(range(0, t, chunk)):
        b, lo = min(t, a + chunk), firsts[n]
        part = checkpoint(
            _dense_kl_chunk, q[a:b].detach(), k[lo:b].detach(), qi[a:b], ki[lo:b], w[a:b],
            _span(starts, a, b, lo), scale, use_reentrant=False,
        )  # fmt: skip
        total = part if total is None else total + part
    return total


def _dense_kl_chunk(q, k, qi, ki, w, span, scale):
    p = A.head_mean_probs(q.transpose(0, 1)[None], k.transpose(0, 1)[None], span[None], scale)
    scores = A.index_scores(qi[None], ki[None], w[None])
    return A.index_kl(p, scores, span[None]).sum()


# --------------------------------------------------------------------------- the layer


def dsa_varlen(
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
    max_len: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`~distill.dsa.attention.dsa_varlen_reference`'s contract in O(T · top_k):
    the output [T, H, D] and, with ``loss``, the KL summed over the row's tokens."""
    from distill.models import _varlen_kernel, varlen_supported

    t = q.shape[0]
    max_len = int(max_len or int((cu[1:] - cu[:-1]).max()))
    starts = segment_starts(cu, t)
    if dense:
        half = q.dtype in (torch.float16, torch.bfloat16)
        if q.device.type == "cpu" or (half and varlen_supported()):
            out = _varlen_kernel(q, k, v, cu, max_len, scale)
        else:  # flash kernels take fp16/bf16 only: fp32 on a GPU is the reference
            out, _ = A.dsa_varlen_reference(q, k, v, qi, ki, w, cu, top_k, scale, dense=True)
        kl = dense_kl(q, k, qi, ki, w, starts, scale, max_len) if loss else None
        return out, kl
    if loss and P_IN_FORWARD and fused_kl(q):
        from distill.dsa import kl_kernel

        # the selection's log-sum-exps of its scores: the index KL's first walk, spared
        idx, lsei = index_topk(qi.detach(), ki.detach(), w.detach(), starts, top_k, max_len,
                               with_lse=LSE_FROM_SELECTION)  # fmt: skip
        out, _, p = _SparseAttention.apply(q, k, v, idx, scale, True)
        return out, kl_kernel.index_kl_sum_triton(qi, ki, w, idx, p, lsei)
    idx = index_topk(qi.detach(), ki.detach(), w.detach(), starts, top_k, max_len)
    if loss and SHARE_LSE and fused_kl(q):
        out, lse, _ = _SparseAttention.apply(q, k, v, idx, scale)
        return out, sparse_kl(q, k, qi, ki, w, idx, scale, lse=lse)
    out = sparse_attention(q, k, v, idx, scale)
    return out, (sparse_kl(q, k, qi, ki, w, idx, scale) if loss else None)


# --------------------------------------------------------------------------- Triton

if HAVE_TRITON:

    @triton.jit
    def _index_score_kernel(
        QI, KI, W, SEG, OUT, q0, k0, n_q, n_k,
        s_qt, s_qh, s_kt, s_wt, s_ot,
        HI: tl.constexpr, DI: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
        BN: tl.constexpr, RANKED: tl.constexpr,
    ):  # fmt: skip
        """Index scores of a [BM, BN] tile (-inf outside each query's span) or, with
        ``RANKED``, their int64 rank keys as :func:`~distill.dsa.attention.rank_key`
        makes them (IEEE order in the high half, the tile's column in the low)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rd = tl.arange(0, BD)
        mq, mk, md = rm < n_q, rn < n_k, rd < DI
        t, s = q0 + rm, k0 + rn
        acc = _tile_scores(QI, KI, W, t, s, mq, mk, rd, md, s_qt, s_qh, s_kt, s_wt, HI, BM, BN)
        seg = tl.load(SEG + t, mask=mq, other=0)
        ok = (s[None, :] <= t[:, None]) & (s[None, :] >= seg[:, None])
        acc = tl.where(ok, acc, float("-inf"))
        if RANKED:
            # the fused selection's unsigned order, its sign bit flipped back: IEEE order
            # as a signed int32, one zero (the same transform as select_kernel's)
            order = _score_order(acc).to(tl.int32, bitcast=True) ^ -2147483648
            key = (order.to(tl.int64) << 32) | rn[None, :].to(tl.int64)
            tl.store(OUT + rm[:, None] * s_ot + rn[None, :], key, mask=mq[:, None] & mk[None, :])
        else:
            tl.store(OUT + rm[:, None] * s_ot + rn[None, :], acc, mask=mq[:, None] & mk[None, :])

    @triton.jit
    def _selected_rows(IDX, t, hk, start, n_sel, s_kt, s_kh, s_it, rd, rn, md):
        """Token ``t``'s selected keys ``start`` to ``start + BN`` of key head ``hk``: which
        are real (``ok``; -1 pads), and their [BN, BD] row offsets and mask, where the
        forward reads K and V and the backward adds dK and dV (bench/dsa.py's floors
        too)."""
        cols = start + rn
        ids = tl.load(IDX + t * s_it + cols, mask=cols < n_sel, other=-1)
        ok = ids >= 0
        off = tl.where(ok, ids, 0)[:, None] * s_kt + hk * s_kh + rd[None, :]
        return ok, off, ok[:, None] & md[None, :]

    @triton.jit
    def _selected_k(K, IDX, t, hk, start, n_sel, s_kt, s_kh, s_it, rd, rn, md):
        """:func:`_selected_rows` and the keys' K rows."""
        ok, off, kmask = _selected_rows(IDX, t, hk, start, n_sel, s_kt, s_kh, s_it, rd, rn, md)
        kb = tl.load(K + off, mask=kmask, other=0.0)
        return ok, off, kmask, kb

    @triton.jit
    def _selected_kv(K, V, IDX, t, hk, start, n_sel, s_kt, s_kh, s_it, rd, rn, md):
        """:func:`_selected_k` and the keys' V rows. One loop body for the forward, the
        backward (which adds dK, dV back at ``off``) and bench/dsa.py's gather floor, so
        the floor reads exactly what the forward reads."""
        ok, off, kmask, kb = _selected_k(K, IDX, t, hk, start, n_sel, s_kt, s_kh, s_it, rd, rn, md)
        vb = tl.load(V + off, mask=kmask, other=0.0)
        return ok, off, kmask, kb, vb

    @triton.jit
    def _sparse_fwd_kernel(
        Q, K, V, IDX, OUT, LSE, P, scale, n_sel,
        s_qt, s_qh, s_kt, s_kh, s_it, s_lt, s_pt,
        G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
        BN: tl.constexpr, H: tl.constexpr, WRITE_P: tl.constexpr, ADD_P: tl.constexpr,
        BNP: tl.constexpr,
    ):  # fmt: skip
        """With ``WRITE_P``, a second walk over the selected keys once the log-sum-exps are
        known writes ``P`` [T, K]: each key's attention probability summed over the
        group's heads, divided by ``H`` (all the heads); ``ADD_P``: added (atomically,
        into zeros) to the other KV heads' sums, the mean over every head."""
        t, hk = tl.program_id(0), tl.program_id(1)
        rg, rd, rn = tl.arange(0, BG), tl.arange(0, BD), tl.arange(0, BN)
        mg, md = rg < G, rd < D
        heads = hk * G + rg
        qmask = mg[:, None] & md[None, :]
        q = tl.load(Q + t * s_qt + heads[:, None] * s_qh + rd[None, :], mask=qmask, other=0.0)
        m_i = tl.full((BG,), float("-inf"), tl.float32)
        l_i = tl.zeros((BG,), tl.float32)
        acc = tl.zeros((BG, BD), tl.float32)
        for start in range(0, n_sel, BN):
            ok, off, kmask, kb, vb = _selected_kv(
                K, V, IDX, t, hk, start, n_sel, s_kt, s_kh, s_it, rd, rn, md
            )
            s = tl.dot(q, tl.trans(kb)) * scale
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("inf"))  # no key: p = 0 in backward
        tl.store(OUT + t * s_qt + heads[:, None] * s_qh + rd[None, :], out, mask=qmask)
        tl.store(LSE + t * s_lt + heads, lse, mask=mg)
        if WRITE_P:  # the indexer's KL target, from the same logits: no second kernel
            rp = tl.arange(0, BNP)
            for start in range(0, n_sel, BNP):
                ok, _, _, kb = _selected_k(
                    K, IDX, t, hk, start, n_sel, s_kt, s_kh, s_it, rd, rp, md
                )
                # [BNP, BG]: a key a row, so the sum over its heads stays within the row
                st = tl.dot(kb, tl.trans(q)) * scale
                pt = tl.where(ok[:, None] & mg[None, :], tl.exp(st - lse[None, :]), 0.0)
                pk = tl.sum(pt, 1) / H
                cols = start + rp
                if ADD_P:
                    tl.atomic_add(P + t * s_pt + cols, pk, mask=cols < n_sel, sem="relaxed")
                else:
                    tl.store(P + t * s_pt + cols, pk, mask=cols < n_sel)

    @triton.jit
    def _sparse_bwd_kernel(
        Q, K, V, IDX, DO, LSE, OUT, DQ, DK, DV, scale, n_sel,
        s_qt, s_qh, s_kt, s_kh, s_it, s_lt,
        G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
        BN: tl.constexpr, SEM: tl.constexpr,
    ):  # fmt: skip
        t, hk = tl.program_id(0), tl.program_id(1)
        rg, rd, rn = tl.arange(0, BG), tl.arange(0, BD), tl.arange(0, BN)
        mg, md = rg < G, rd < D
        heads = hk * G + rg
        qmask = mg[:, None] & md[None, :]
        qoff = t * s_qt + heads[:, None] * s_qh + rd[None, :]
        q = tl.load(Q + qoff, mask=qmask, other=0.0)
        do = tl.load(DO + qoff, mask=qmask, other=0.0)
        lse = tl.load(LSE + t * s_lt + heads, mask=mg, other=float("inf"))
        # rowsum(dO * O) here, from the saved output: no fp32 copies of both in torch
        # (2 GB at 32k, 64 heads of 128: ~3.5 ms of small ops a layer in the 07:41 H100
        # profile; the MQA layer 72.3 ms then, 68.0-68.1 in three runs at 08:02)
        o = tl.load(OUT + qoff, mask=qmask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        dq = tl.zeros((BG, BD), tl.float32)
        for start in range(0, n_sel, BN):
            ok, off, kmask, kb, vb = _selected_kv(
                K, V, IDX, t, hk, start, n_sel, s_kt, s_kh, s_it, rd, rn, md
            )
            s = tl.dot(q, tl.trans(kb)) * scale
            p = tl.exp(s - lse[:, None])
            p = tl.where(ok[None, :] & mg[:, None], p, 0.0)
            dp = tl.dot(do, tl.trans(vb))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kb.dtype), kb)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale
            dv = tl.dot(tl.trans(p.to(do.dtype)), do)
            tl.atomic_add(DK + off, dk, mask=kmask, sem=SEM)
            tl.atomic_add(DV + off, dv, mask=kmask, sem=SEM)
        tl.store(DQ + qoff, dq * scale, mask=qmask)

    def _blocks(g: int, d: int) -> dict:
        return dict(
            G=g,
            BG=max(16, triton.next_power_of_2(g)),
            D=d,
            BD=max(16, triton.next_power_of_2(d)),
        )

    def _triton_scores(qi, ki, w, starts, a: int, b: int, lo: int, ranked=False) -> Tensor:
        """:func:`_chunk_scores` (fp32) or, ``ranked``, their rank keys (int64)."""
        dtype = qi.dtype if qi.dtype in (torch.float16, torch.bfloat16) else torch.float32
        qi, ki, w = (x.to(dtype).contiguous() for x in (qi, ki, w))
        n_q, n_k = b - a, b - lo
        kind = torch.int64 if ranked else torch.float32
        out = torch.empty(n_q, n_k, dtype=kind, device=qi.device)
        hi, di = qi.shape[1], qi.shape[2]
        bm, bn = 64, 64
        grid = (triton.cdiv(n_q, bm), triton.cdiv(n_k, bn))
        _index_score_kernel[grid](
            qi, ki, w, starts, out, a, lo, n_q, n_k,
            qi.stride(0), qi.stride(1), ki.stride(0), w.stride(0), out.stride(0),
            HI=hi, DI=di, BD=max(16, triton.next_power_of_2(di)), BM=bm, BN=bn, RANKED=ranked,
        )  # fmt: skip
        return out

    class _SparseAttention(torch.autograd.Function):
        """Triton attention over selected keys; q [T, H, D], k and v [T, Hkv, D] -> the
        output [T, H, D], each head's log-sum-exp over its keys [T, H] (fp32, +inf
        where none) and, ``want_p``, the mean over heads of each selected key's attention
        probability [T, K] (fp32; else empty): the last two carry no gradient."""

        @staticmethod
        def forward(ctx, q, k, v, idx, scale, want_p=False):
            q, k, v = (x.contiguous() for x in (q, k, v))
            k, v = k.to(q.dtype), v.to(q.dtype)
            idx = idx.to(torch.int32).contiguous()
            t, h, d = q.shape
            hkv = k.shape[1]
            out = torch.empty_like(q)
            lse = torch.empty(t, h, dtype=torch.float32, device=q.device)
            if want_p:  # KV heads past the first add their heads' share
                p = (torch.zeros if hkv > 1 else torch.empty)(
                    idx.shape, dtype=torch.float32, device=q.device
                )
            else:
                p = lse.new_empty(0)
            _sparse_fwd_kernel[(t, hkv)](
                q, k, v, idx, out, lse, p if want_p else lse, scale, idx.shape[1],
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), idx.stride(0), lse.stride(0),
                idx.stride(0), **_blocks(h // hkv, d), **sparse_launch(h // hkv), H=h,
                WRITE_P=want_p, ADD_P=hkv > 1, **P_WALK,
            )  # fmt: skip
            ctx.save_for_backward(q, k, v, idx, out, lse)
            ctx.scale = scale
            ctx.mark_non_differentiable(lse, p)
            return out, lse, p

        @staticmethod
        def backward(ctx, grad, _grad_lse, _grad_p):
            q, k, v, idx, out, lse = ctx.saved_tensors
            do = grad.to(q.dtype).contiguous()
            dq = torch.empty_like(q)
            dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
            dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
            t, h, d = q.shape
            hkv = k.shape[1]
            _sparse_bwd_kernel[(t, hkv)](
                q, k, v, idx, do, lse, out, dq, dk, dv, ctx.scale, idx.shape[1],
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), idx.stride(0), lse.stride(0),
                **_blocks(h // hkv, d), **sparse_launch(h // hkv), SEM=ATOMIC_SEM,
            )  # fmt: skip
            return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None

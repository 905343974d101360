"""The training selection's Triton kernels: each query's top-k keys by index score.

:func:`rows_select` (the default, ``kernels.SELECT_ROWS``; see it and
``ROWS_SELECT_LAUNCH``): one program a row over the score kernel's stored fp32 scores.

The rest of this module is the selection fused with the index scores, without a score
matrix (``kernels.SELECT_FUSED``, off). When it was written,
:func:`distill.dsa.kernels.index_topk` wrote every query's scores against every key of its
trace ([chunk, T] int64 rank keys) and ran ``torch.topk`` over them: at 32k tokens that is
4.3 GB of fp32 scores as int64 keys, written and read by a top-k's radix passes, 35.9 ms
(MQA shape) to 50.9 ms (Qwen2 shape) of a layer on one H100 (one run each, BENCHMARKS.md). Here one
program per block of ``BM`` queries finds each query's k-th best key by a radix select
over the scores, recomputed tile by tile and never stored: eight passes of four bits
over the scores' 32-bit order (a 16-bin histogram of the next digit among the keys that
share the decided prefix), then a ninth that writes the selected positions. Scoring is
cheap (``Hi`` index heads of ``Di``: 256 multiply-adds a key at 4 x 64, on the tensor
cores), so the bet is that recomputing it nine times costs less than writing and reading
the matrix; the histograms' work is the rest. The bet lost: on one H100 at 32k
(2026-12-07, one run; bench/dsa.py: ``select_fused``) it took 60.8 ms where the rank keys
and ``torch.topk`` took 32.4 (MQA shape; 60.9 against 31.9 at the Qwen2 shape), hence off
(``kernels.SELECT_FUSED``).

The same keys as the rank keys' top-k (:func:`distill.dsa.attention.rank_key`): scores in
IEEE order, equal scores to the later key. The ninth pass walks the keys from the latest
back, so the ties at the k-th score it takes are the latest ones. The order of the
selected keys within a row is not the top-k's (attention does not care). All passes run
one loop body, so each computes the same scores bit for bit: the threshold found by the
first eight is the one the ninth compares against.
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

# queries a program, keys a step; read at each launch (bench/dsa.py times the selection).
# Compiled for sm_90 on a CPU (Triton 3.9, bench/dsa_compile.py, 4 index heads of 64): 8
# warps spill nothing at 64 x 64, 4 warps spill 488 bytes; all take the warpgroup MMA.
SELECT_LAUNCH = {"BM": 64, "BN": 64, "num_warps": 8, "num_stages": 2}
# a pass's per-row histograms as one tl.histogram over BM x 16 bins (True) or as 16 row
# reductions, one a bin (False); both in the interpreter test; one H100 at 32k (2026-12-07):
# 100.1 ms against 60.8 (MQA shape; bench/dsa.py: select_fused_hist, select_fused)
SELECT_HIST = False


if HAVE_TRITON:

    @triton.jit
    def _tile_scores(
        QI, KI, W, t, s, mq, mk, rd, md, s_qt, s_qh, s_kt, s_wt,
        HI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        """Index scores of queries ``t`` [BM] against keys ``s`` [BN], fp32 [BM, BN]:
        Σ_h w(t,h)·ReLU(qi(t,h)·ki(s)). Shared by the score kernel and the fused selection,
        so the rank keys of one and the threshold of the other come from the same sums."""
        kb = tl.load(
            KI + s[:, None] * s_kt + rd[None, :], mask=mk[:, None] & md[None, :], other=0.0
        )
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for h in range(HI):
            qh = tl.load(
                QI + t[:, None] * s_qt + h * s_qh + rd[None, :],
                mask=mq[:, None] & md[None, :],
                other=0.0,
            )
            wh = tl.load(W + t * s_wt + h, mask=mq, other=0.0).to(tl.float32)
            acc += tl.maximum(tl.dot(qh, tl.trans(kb)), 0.0) * wh[:, None]
        return acc

    @triton.jit
    def _score_order(acc):
        """fp32 scores as uint32 in the same order (the score kernel's rank keys take their
        high half from it):
        negative scores with every bit flipped, the others with the sign bit set; -0.0 is
        +0.0 first (one zero, as ``rank_key``)."""
        acc = tl.where(acc == 0.0, 0.0, acc)
        bits = acc.to(tl.int32, bitcast=True)
        flipped = tl.where(bits < 0, ~bits, bits | -2147483648)
        return flipped.to(tl.uint32, bitcast=True)

    @triton.jit
    def _select_kernel(
        QI, KI, W, SEG, IDX, n_q, k_out,
        s_qt, s_qh, s_kt, s_wt, s_it,
        HI: tl.constexpr, DI: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
        BN: tl.constexpr, HIST: tl.constexpr,
    ):  # fmt: skip
        """Queries [pid·BM, pid·BM + BM): each writes its ``min(k_out, keys in its span)``
        best keys' positions into its row of IDX (left as -1 beyond them)."""
        # the last block first: causal blocks walk more keys the later they are, and the
        # longest programs should not be the ones left running alone at the end
        blk = tl.num_programs(0) - 1 - tl.program_id(0)
        rm = blk * BM + tl.arange(0, BM)
        mq = rm < n_q
        rd = tl.arange(0, BD)
        md = rd < DI
        rn = tl.arange(0, BN)
        bins = tl.arange(0, 16)
        seg = tl.load(SEG + rm, mask=mq, other=0)
        lo = tl.min(tl.where(mq, seg, n_q))  # the block's first key: its earliest trace start
        hi = tl.minimum(blk * BM + BM, n_q)  # one past its last query
        n_tiles = tl.cdiv(hi - lo, BN)
        # the keys each query takes, and of them those still to place below the decided prefix
        left = tl.where(mq, tl.minimum(rm - seg + 1, k_out), 0).to(tl.int32)
        prefix = tl.zeros((BM,), tl.uint32)  # the k-th key's order, decided digits so far
        taken = tl.zeros((BM,), tl.int32)  # emit pass: ties at the k-th order taken
        n_out = tl.zeros((BM,), tl.int32)  # emit pass: positions written
        for p in range(0, 32 // 4 + 1):
            shift = 28 - 4 * p  # the digit this pass counts (p < 8)
            hist = tl.zeros((BM, 16), tl.int32)
            for j in range(0, n_tiles):  # the latest keys first: the emit pass's tie order
                s = hi - 1 - j * BN - rn
                mk = s >= lo
                u = _score_order(
                    _tile_scores(
                        QI, KI, W, rm, s, mq, mk, rd, md, s_qt, s_qh, s_kt, s_wt, HI, BM, BN
                    )
                )
                ok = mk[None, :] & (s[None, :] <= rm[:, None]) & (s[None, :] >= seg[:, None])
                ok = ok & mq[:, None]
                if p < 8:
                    top = (u >> shift) >> 4  # the decided digits (two shifts: never by 32)
                    d = ((u >> shift) & 15).to(tl.int32)
                    match = ok & (top == prefix[:, None])
                    if tl.sum(match.to(tl.int32)) > 0:  # late passes: most tiles hold none
                        if HIST:  # every row's 16 bins as one histogram of BM x 16 bins
                            key = tl.reshape(tl.arange(0, BM)[:, None] * 16 + d, (BM * BN,))
                            flat = tl.histogram(key, BM * 16, mask=tl.reshape(match, (BM * BN,)))
                            hist += tl.reshape(flat, (BM, 16))
                        else:  # a row reduction a bin
                            for b in tl.static_range(16):
                                c = tl.sum((match & (d == b)).to(tl.int32), 1)
                                hist += tl.where(bins[None, :] == b, c[:, None], 0)
                else:
                    tie = ok & (u == prefix[:, None])
                    tie_rank = tl.cumsum(tie.to(tl.int32), 1) + taken[:, None]
                    sel = (ok & (u > prefix[:, None])) | (tie & (tie_rank <= left[:, None]))
                    slot = tl.cumsum(sel.to(tl.int32), 1) - 1 + n_out[:, None]
                    sel = sel & (slot < k_out)  # never past the row, whatever the scores
                    tl.store(IDX + rm[:, None] * s_it + slot, s[None, :].to(tl.int64), mask=sel)
                    n_out += tl.sum(sel.to(tl.int32), 1)
                    taken += tl.sum(tie.to(tl.int32), 1)
            if p < 8:
                # at_least[b]: keys of the prefix whose digit is b or more
                at_least = tl.sum(
                    tl.where(bins[None, None, :] >= bins[None, :, None], hist[:, None, :], 0), 2
                )
                pick = tl.max(tl.where(at_least >= left[:, None], bins[None, :], 0), 1)
                left -= tl.sum(tl.where(bins[None, :] == pick[:, None] + 1, at_least, 0), 1)
                prefix = (prefix << 4) | pick.to(tl.uint32)


def fused_topk(qi: Tensor, ki: Tensor, w: Tensor, starts: Tensor, k_out: int) -> Tensor:
    """:func:`distill.dsa.kernels.index_topk`'s selection in one kernel: [T, k_out] int64
    positions, -1 where a query has fewer keys in its trace; rows in no particular order.
    ``qi`` [T, Hi, Di], ``ki`` [T, Di], ``w`` [T, Hi] (fp16/bf16 on a GPU; fp32 as is),
    ``starts`` each token's trace start [T]."""
    dtype = qi.dtype if qi.dtype in (torch.float16, torch.bfloat16) else torch.float32
    qi, ki, w = (x.to(dtype).contiguous() for x in (qi, ki, w))
    t, hi, di = qi.shape
    idx = torch.full((t, k_out), -1, dtype=torch.long, device=qi.device)
    if t == 0 or k_out == 0:
        return idx
    launch = dict(SELECT_LAUNCH)
    bm, bn = launch.pop("BM"), launch.pop("BN")
    _select_kernel[(triton.cdiv(t, bm),)](
        qi, ki, w, starts.contiguous(), idx, t, k_out,
        qi.stride(0), qi.stride(1), ki.stride(0), w.stride(0), idx.stride(0),
        HI=hi, DI=di, BD=max(16, triton.next_power_of_2(di)), BM=bm, BN=bn, HIST=SELECT_HIST,
        **launch,
    )  # fmt: skip
    return idx


# the training selection's radix select over stored fp32 scores (rows_select: one program
# a row, every pass inside it), read at each launch: keys a step, warps, and CAP, the most
# keys a row copies out to finish its passes on (below). One H100 at 32k (2026-12-07
# 07:30 UTC, one sweep of 9, before the copy): 15.2 ms against 16.6 at 8 warps; 1,024 or
# 4,096 keys a step 15.5-17.5, 16 warps 21-22. Deciding 11 bits a pass (three passes of
# 2,048 bins) took 61-92 ms against 15.0-17.1 for 8 (08:02 UTC): removed. With the copy
# (09:27 UTC, bench/dsa.py --sweep-rows, one sweep of 18, the same keys in all): the
# selection with its scores 10.2 ms at 2,048 keys a step, 18.0 at CAP 0 (never copied: six
# reads of the row), 10.7 at CAP 16,384; 8 warps 0.1-1.0 ms slower; 4,096 keys a step
# 15.1; 1,024 keys a step 8.8. At 1,024 (11:17-11:19 UTC, bench/gpu_ab.sh, two runs each,
# interleaved with 2,048): the selection 8.2-8.5 against 9.7-10.1 ms, the MQA layer 60.4-
# 60.6 against 61.8-61.9 ms (3.08x and 3.16x dense)
ROWS_SELECT_LAUNCH = {"BS": 1024, "CAP": 4096, "num_warps": 4}

if HAVE_TRITON:

    @triton.jit
    def _half_digit(sc):
        """The top 8 bits of the scores' order as fp16 (the sign, 5 exponent bits and 2 of
        the mantissa): a quarter of a binade a bin where fp32's top 8 bits give two
        binades. Rounding to fp16 keeps the order (never reverses it), so a key in a
        higher bin scores higher; ±0 are one zero, as in :func:`_score_order`."""
        b = sc.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        b = tl.where((b & 0x7FFF) == 0, 0, b)
        return tl.where(b >= 0x8000, b ^ 0xFFFF, b | 0x8000) >> 8

    @triton.jit
    def _online_lse(mi, li, x):
        """One block's step of a running log-sum-exp of ``x`` [BN] (max ``mi``, sum ``li``;
        -inf: not counted). The row selection's and the KL kernels' (kl_kernel.py)."""
        mi_new = tl.maximum(mi, tl.max(x, 0))
        mi_safe = tl.where(mi_new == float("-inf"), 0.0, mi_new)
        return mi_new, li * tl.exp(mi - mi_safe) + tl.sum(tl.exp(x - mi_safe), 0)

    @triton.jit
    def _write_selected(
        out, pos, sc, prefix, left, n_up, up_seen, tie_seen, mi, li,
        LATEST_FIRST: tl.constexpr, HAS_LSE: tl.constexpr,
    ):  # fmt: skip
        """One block's writes of :func:`_rows_select_kernel`: of the keys at ``pos`` with
        scores ``sc`` (-inf: none), those above the k-th score (order ``prefix``) into
        ``out`` after the ``up_seen`` written, and those tied with it while fewer than
        ``left`` later ties are taken, after the ``n_up`` above (``tie_seen`` ties seen,
        all later than this block's); the selected scores into the running log-sum-exp.
        ``LATEST_FIRST``: the block runs from late keys to early (the scratch), else from
        early to late (a block of the row)."""
        u = _score_order(sc)
        ok = sc > float("-inf")
        up = (ok & (u > prefix)).to(tl.int32)
        tie = (ok & (u == prefix)).to(tl.int32)
        if LATEST_FIRST:
            later = tie_seen + tl.cumsum(tie, 0) - 1  # ties taken before each key
        else:
            later = tie_seen + tl.sum(tie) - tl.cumsum(tie, 0)
        sel = (up != 0) | ((tie != 0) & (later < left))
        slot = tl.where(up != 0, up_seen + tl.cumsum(up, 0) - 1, n_up + later)
        tl.store(out + slot, pos.to(out.dtype.element_ty), mask=sel)
        if HAS_LSE:
            mi, li = _online_lse(mi, li, tl.where(sel, sc, float("-inf")))
        return up_seen + tl.sum(up), tie_seen + tl.sum(tie), mi, li

    @triton.jit
    def _rows_select_kernel(
        SC, IDX, CV, CS, LSE, n_s, q0, k_out, lo, s_sb, s_ib, s_cb, cap,
        BS: tl.constexpr, HAS_LSE: tl.constexpr,
    ):  # fmt: skip
        """Row ``pid``'s best ``k_out`` keys of its scores above -inf (all of them where it
        has fewer), ties to the later key, written as positions + ``lo`` into its row of
        ``IDX`` (the rest untouched); with ``HAS_LSE``, the log-sum-exp of their scores
        into ``LSE`` (+inf where none). Row r is query ``q0 + r`` of the score columns, so
        no key after column ``q0 + r`` is read.

        A radix select: a 256-bin histogram of the scores' fp16 top byte
        (:func:`_half_digit`) finds the bin of the k-th score; four more of the next 8
        bits of the full fp32 order (:func:`_score_order`) among the keys of that bin and
        the decided prefix find the k-th score itself; then the writes: the keys above it
        and the latest of those tied with it. A pass reads the whole row only while the
        keys still in the running are more than ``cap``; once they are fewer, one read
        of the row writes the keys already above (selected whatever the later digits)
        straight into the row of ``IDX`` and copies those in the running (score and
        position, the latest key first) into the row's scratch ``CV``/``CS``, and the
        passes left and the writes read the copy alone. On scores spread over a few
        binades the fp16 bin leaves a few hundred keys of a 16k row: the row is read
        twice, once with a histogram, instead of five times with four. Scores piled
        into one bin (ties, all zero) read it up to six times; the keys are the same
        either way."""
        b = tl.program_id(0)
        n_row = tl.minimum(n_s, q0 + b + 1)
        bins = tl.arange(0, 256)
        rs = tl.arange(0, BS)
        row = SC + b.to(tl.int64) * s_sb
        out = IDX + b.to(tl.int64) * s_ib
        cv = CV + b.to(tl.int64) * s_cb
        cs = CS + b.to(tl.int64) * s_cb
        n_blocks = tl.cdiv(n_row, BS)
        hist = tl.zeros((256,), tl.int32)
        for start in range(0, n_row, BS):
            s = start + rs
            sc = tl.load(row + s, mask=s < n_row, other=float("-inf"))
            hist += tl.histogram(_half_digit(sc), 256, mask=sc > float("-inf"))
        total = tl.sum(hist)
        kk = tl.minimum(total, k_out)
        at_least = total - (tl.cumsum(hist, 0) - hist)  # keys in bin d or above
        bin16 = tl.max(tl.where(at_least >= kk, bins, 0))  # the k-th key's fp16 bin
        left = kk - tl.sum(tl.where(bins == bin16 + 1, at_least, 0))  # to take from it
        n_run = tl.sum(tl.where(bins == bin16, hist, 0))  # keys still in the running
        prefix = tl.zeros((), tl.uint32)  # the k-th key's fp32 order, digits decided so far
        copied = tl.zeros((), tl.int1)
        n_c = tl.zeros((), tl.int32)  # keys copied to the scratch
        n_above = tl.zeros((), tl.int32)  # keys above the running ones, written by the copy
        mi = tl.max(tl.full((BS,), float("-inf"), tl.float32), 0)  # the selected scores'
        li = tl.sum(tl.zeros((BS,), tl.float32), 0)  # running log-sum-exp
        # a loop, not unrolled: four copies of its body took ptxas ~30 s a compile
        for p in range(0, 4):
            shift = 24 - 8 * p
            if (n_run <= cap) & (copied == 0):
                # the copy: the latest keys first, so the scratch runs from late to early
                for i in range(0, n_blocks):
                    s = (n_blocks - 1 - i) * BS + rs
                    sc = tl.load(row + s, mask=s < n_row, other=float("-inf"))
                    u = _score_order(sc)
                    h = _half_digit(sc)
                    top = (u >> shift) >> 8  # two shifts: u >> 32 is undefined
                    run = (sc > float("-inf")) & (h == bin16)
                    match = run & (top == prefix)
                    above = (sc > float("-inf")) & ((h > bin16) | (run & (top > prefix)))
                    a = above.to(tl.int32)
                    slot = n_above + tl.cumsum(a, 0) - 1
                    tl.store(out + slot, (s + lo).to(IDX.dtype.element_ty), mask=above)
                    if HAS_LSE:
                        mi, li = _online_lse(mi, li, tl.where(above, sc, float("-inf")))
                    c = match.to(tl.int32)
                    slot = n_c + tl.sum(c) - tl.cumsum(c, 0)  # the later key first
                    tl.store(cv + slot, sc, mask=match)
                    tl.store(cs + slot, s, mask=match)
                    n_above += tl.sum(a)
                    n_c += tl.sum(c)
                copied = True
            hist = tl.zeros((256,), tl.int32)
            if copied:
                for start in range(0, n_c, BS):
                    c = start + rs
                    u = _score_order(tl.load(cv + c, mask=c < n_c, other=0.0))
                    match = (c < n_c) & (((u >> shift) >> 8) == prefix)
                    hist += tl.histogram(((u >> shift) & 255).to(tl.int32), 256, mask=match)
            else:
                for start in range(0, n_row, BS):
                    s = start + rs
                    sc = tl.load(row + s, mask=s < n_row, other=float("-inf"))
                    u = _score_order(sc)
                    run = (sc > float("-inf")) & (_half_digit(sc) == bin16)
                    match = run & (((u >> shift) >> 8) == prefix)
                    hist += tl.histogram(((u >> shift) & 255).to(tl.int32), 256, mask=match)
            total = tl.sum(hist)
            at_least = total - (tl.cumsum(hist, 0) - hist)  # digit d or more
            pick = tl.max(tl.where(at_least >= left, bins, 0))
            left -= tl.sum(tl.where(bins == pick + 1, at_least, 0))
            n_run = tl.sum(tl.where(bins == pick, hist, 0))
            prefix = (prefix << 8) | pick.to(tl.uint32)
        # keys above the k-th score: every one with a higher fp32 order (those of higher
        # fp16 bins among them); `left` of those tied with it to take, the latest
        n_up = kk - left
        up_seen = n_above
        tie_seen = tl.zeros((), tl.int32)
        if copied:  # the scratch: the running keys, the latest first
            for start in range(0, n_c, BS):
                c = start + rs
                sc = tl.load(cv + c, mask=c < n_c, other=float("-inf"))
                s = tl.load(cs + c, mask=c < n_c, other=0)
                up_seen, tie_seen, mi, li = _write_selected(
                    out, s + lo, sc, prefix, left, n_up, up_seen, tie_seen, mi, li, True, HAS_LSE
                )
        else:
            for i in range(0, n_blocks):
                s = (n_blocks - 1 - i) * BS + rs
                sc = tl.load(row + s, mask=s < n_row, other=float("-inf"))
                up_seen, tie_seen, mi, li = _write_selected(
                    out, s + lo, sc, prefix, left, n_up, up_seen, tie_seen, mi, li, False, HAS_LSE
                )
        if HAS_LSE:
            lse = tl.where(li > 0, mi + tl.log(tl.where(li > 0, li, 1.0)), float("inf"))
            tl.store(LSE + b, lse)


def rows_select(
    scores: Tensor, idx: Tensor, k_out: int, q0: int, lo: int, lse: Tensor | None = None
) -> None:
    """The trainer's selection for one chunk of queries (``kernels.SELECT_ROWS``):
    ``scores`` [R, S] fp32 (-inf where a key is not the row's), row r being query
    ``q0 + r`` of the columns; each row's ``k_out`` best keys (ties to the later key; all
    of them where it has fewer) written into ``idx`` [R, >= k_out] (int32 or int64) as
    column + ``lo``, the rest of each row left as it was; with ``lse`` [R] (fp32), the
    log-sum-exp of each row's selected scores written into it (+inf where none). One
    program a row walks its own scores, so a pass never waits on another program and a
    chunk of rows is one launch; its scratch is [R, CAP] fp32 and int32."""
    scores = scores.contiguous()
    launch = dict(ROWS_SELECT_LAUNCH)
    bs, cap = launch.pop("BS"), launch.pop("CAP")
    r = scores.shape[0]
    values = torch.empty((r, cap), dtype=torch.float32, device=scores.device)
    cols = torch.empty((r, cap), dtype=torch.int32, device=scores.device)
    _rows_select_kernel[(r,)](
        scores, idx, values, cols, scores if lse is None else lse, scores.shape[1], q0, k_out,
        lo, scores.stride(0), idx.stride(0), cap, cap, BS=bs, HAS_LSE=lse is not None,
        **launch,
    )  # fmt: skip

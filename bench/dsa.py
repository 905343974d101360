"""DeepSeek Sparse Attention against dense attention, side by side in one process.

1. **Attention forward + backward** of one layer of a Qwen2-0.5B-shaped model on one
   packed row of one trace, at each length: dense = PyTorch's varlen flash attention (the
   trainer's dense path); DSA = the trainer's sparse path (indexer scores and top-k,
   attention over the selected keys, the indexer's KL, and the backward of all of it),
   with its parts timed alone too. Peak memory of each.
2. **Decoding** at a long context: tokens/s of the whole model, batch B, one token per
   row per step, on a StaticCache pre-filled with random keys (and indexer keys), dense
   Llama against the DSA model of the same shape, both through transformers' forward.
   Not for ``h100-mqa`` (``--set decode=1`` asks for it).

With Triton, the attention rows also time the sparse attention's forward alone
(``sparse_fwd``) and a floor for it (``gather``): a kernel that only reads each token's
selected K and V rows, as any exact gather-based sparse forward must, with its effective
GB/s, and a floor for its backward (``scatter``): a kernel that only makes the backward's
atomic adds of each pair's dK and dV rows. ``--parts`` times only the parts it names.
``select_budget`` and ``dsa_budget`` are the selection and the layer with the selection's
chunks at ``kernels.BUDGET``'s rows alone (the rule before 2026-12-07 13:10 UTC),
``select_rows_N`` and ``dsa_rows_N`` at N rows (``kernels.SELECT_CHUNK``).
``--sweep`` times the sparse attention under every launch configuration
(``kernels.sparse_launch``: keys a step, warps, stages) at the first length, and
``--sweep-kl`` the fused KL (``kl_kernel.KL_LAUNCH``: warps, stages). The backward kernels'
atomic adds are timed in Triton's default memory order too (``sparse_acq_rel``,
``kl_fused_acq_rel``: the layer uses "relaxed", ``kernels.ATOMIC_SEM``), the fused KL with
its main logits from fp32 copies (``kl_fused_fp32``; the default since 2026-12-06 19:00 UTC
takes them from bf16, ``kl_kernel.MAIN_DOT_FP32``), and the whole layer as it was before
that day's changes (``dsa_before``, ``speedup_before``: fp32 logits, the KL walking the
keys for its own log-sum-exps rather than reading the attention's, ``kernels.SHARE_LSE``,
and one sparse launch for every head group, ``kernels.SPARSE_LAUNCH_WIDE``), and the
selection's top-k over fp32 scores with its ties repaired (``select_fp32``,
``kernels.SELECT_FP32``: off, slower). ``kl_fused`` is the per-token KL with its
backward kernel, ``kl_fused_sum`` the layer's sum with its gradient taken in the forward
walk (``kl_kernel.GRAD_IN_FORWARD``), and ``dsa_kl_bwd`` (``speedup_kl_bwd``) the layer
with the backward kernel instead; ``kl_fused_sum_w8`` and ``dsa_kl_w8``
(``speedup_kl_w8``) the same at 8 warps and 2 stages (``kl_kernel.KL_LAUNCH``).
``select_fused`` is the selection scored and selected in one kernel (``kernels.SELECT_FUSED``, off, slower; ``dsa_select_fused``,
``speedup_select_fused``: the layer with it; ``select_fused_hist`` with its histograms
as one ``tl.histogram``, ``select_kernel.SELECT_HIST``), ``select_fused_rows_differ``
the rows where it picked other keys than the default selection.
``dsa_kl_fused`` (``speedup_kl_fused``) is the layer with the fused KL kernel
(``kernels.P_IN_FORWARD`` off), the default until 2026-12-07; the default has the
attention's forward write the KL's target p (``sparse_p``, ``sparse_fwd_p``: the attention
with that second walk) and takes the KL from p and the index keys alone (``kl_index``:
one walk over them, the selection's log-sum-exps given, as the layer does). ``select``
is the default selection, one program a row over the score kernel's fp32 scores
(``kernels.SELECT_ROWS``), ``select_topk`` the one before it (int64 rank keys and
``torch.topk``; ``dsa_select_topk``, ``speedup_select_topk``; ``select_topk_rows_differ``:
rows where the two differ). ``--sweep-new`` times the index KL's, the row selection's and
the walk for p's launches (``kl_kernel.INDEX_KL_LAUNCH``,
``select_kernel.ROWS_SELECT_LAUNCH``, ``kernels.P_WALK``); ``--sweep-rows`` the row
selection's alone.
``--profile-layer`` prints the DSA layer's ops (forward + backward) at the first length.

    python bench/dsa.py --preset h100          # the issue's figures: one H100/H200
    python bench/dsa.py --preset cpu           # a small run of the same code on a CPU
    python bench/dsa.py --preset h100 --skip-decode --lengths 32768 --out results.json
    python bench/dsa.py --preset h100-mqa --sweep --profile-layer --out mqa.json
    python bench/dsa.py --preset cpu --skip-decode --set lengths=256,512 top_k=32 reps=1
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

PRESETS = {
    "h100": dict(
        hidden=896, layers=24, heads=14, kv=2, head_dim=64, inter=4864, vocab=151936,
        index_heads=4, index_head_dim=64, top_k=2048, lengths=[16384, 32768, 65536],
        decode_ctx=32768, decode_batch=32, decode_steps=16, dtype="bf16", reps=5, decode=True,
    ),
    "cpu": dict(
        hidden=64, layers=2, heads=4, kv=2, head_dim=16, inter=128, vocab=512,
        index_heads=2, index_head_dim=16, top_k=64, lengths=[512, 1024],
        decode_ctx=1024, decode_batch=4, decode_steps=4, dtype="fp32", reps=2, decode=True,
    ),
}  # fmt: skip
# an MQA/MLA-like layer: every query head shares one KV head, so all 64 heads attend over the
# same selected keys (DeepSeek-V3.2's setting, where DSA is meant to pay); attention rows only.
# The Triton kernels at this shape (64 heads of 128 over one KV head) equal the torch path
# under TRITON_INTERPRET=1 (48 tokens, top-k 16: outputs and gradients within 1.2e-5, fp32;
# 2026-12-06); on one H100 (2026-12-06, one run each, 32k) DSA 447 ms against dense 187 ms
# forward + backward, 233 ms against 188 with the backward's atomics relaxed (BENCHMARKS.md)
PRESETS["h100-mqa"] = dict(
    PRESETS["h100"], heads=64, kv=1, head_dim=128, lengths=[16384, 32768], decode=False
)
# today's launch first, then its neighbours: a time box that ends the sweep early has
# measured the likelier configurations (each prints its own line as it finishes)
SWEEP = dict(BN=(64, 32, 128), num_warps=(4, 8, 2), num_stages=(3, 2, 1))
KL_SWEEP = dict(num_warps=(4, 8, 2), num_stages=(3, 2))  # the fused KL's (kl_kernel.KL_LAUNCH)
# the index KL's (kl_kernel.INDEX_KL_LAUNCH) and the row selection's
# (select_kernel.ROWS_SELECT_LAUNCH), the default first
INDEX_KL_SWEEP = dict(BN=(64, 32, 128), num_warps=(4, 2, 8), num_stages=(3, 2))
# (CAP 0: every pass reads the whole row, as before the scratch, plus the fp16 bin's pass)
ROWS_SWEEP = dict(BS=(2048, 1024, 4096), CAP=(4096, 0, 16384), num_warps=(4, 8))
# rows a chunk of the selection (kernels.SELECT_CHUNK) timed beside the default's
CHUNK_ROWS = (1024, 2048)
# the forward's walk for p (kernels.P_WALK)
P_WALK_SWEEP = dict(BNP=(64, 32, 128))


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, reps: int) -> tuple[float, float | None]:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up, and peak GB."""
    fn()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None
    return statistics.median(times), peak


if HAVE_TRITON:
    from distill.dsa.kernels import _selected_kv, _selected_rows

    @triton.jit
    def _gather_floor_kernel(
        K, V, IDX, OUT, n_sel, s_kt, s_kh, s_it, s_ot, s_oh,
        D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        """The K and V reads of ``kernels._sparse_fwd_kernel`` alone (same program grid,
        and the same block loop: ``kernels._selected_kv``), summed into [BD] fp32 and
        stored so that none is elided."""
        t, hk = tl.program_id(0), tl.program_id(1)
        rd, rn = tl.arange(0, BD), tl.arange(0, BN)
        md = rd < D
        acc = tl.zeros((BD,), tl.float32)
        for start in range(0, n_sel, BN):
            _, _, _, kb, vb = _selected_kv(
                K, V, IDX, t, hk, start, n_sel, s_kt, s_kh, s_it, rd, rn, md
            )
            acc += tl.sum(kb.to(tl.float32) + vb.to(tl.float32), 0)
        tl.store(OUT + t * s_ot + hk * s_oh + rd, acc, mask=md)

    @triton.jit
    def _scatter_floor_kernel(
        DK, DV, IDX, n_sel, s_kt, s_kh, s_it,
        D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, SEM: tl.constexpr,
    ):  # fmt: skip
        """The dK and dV atomic adds of ``kernels._sparse_bwd_kernel`` alone (same program
        grid, block loop, row offsets and memory order), of a [BN, BD] fp32 tile made from
        the token's position: no K, V, Q or dO read, no product computed."""
        t, hk = tl.program_id(0), tl.program_id(1)
        rd, rn = tl.arange(0, BD), tl.arange(0, BN)
        md = rd < D
        val = tl.zeros((BN, BD), tl.float32) + (t + 1).to(tl.float32)
        for start in range(0, n_sel, BN):
            _, off, kmask = _selected_rows(IDX, t, hk, start, n_sel, s_kt, s_kh, s_it, rd, rn, md)
            tl.atomic_add(DK + off, val, mask=kmask, sem=SEM)
            tl.atomic_add(DV + off, val, mask=kmask, sem=SEM)


def scatter_floor(dk, dv, idx, group: int):
    """Add into ``dk`` and ``dv`` [T, Hkv, D] fp32 (contiguous) a row per (token, selected
    key, KV head): the atomic adds an exact sparse backward that scatters dK and dV per
    pair, as ``kernels._sparse_bwd_kernel`` does, cannot avoid; launched as that kernel is
    for ``group`` query heads a KV head. ``idx`` [T, K] int32."""
    from distill.dsa import kernels as K

    t, hkv, d = dk.shape
    _scatter_floor_kernel[(t, hkv)](
        dk, dv, idx, idx.shape[1], dk.stride(0), dk.stride(1), idx.stride(0), D=d,
        BD=max(16, triton.next_power_of_2(d)), SEM=K.ATOMIC_SEM,
        **K.sparse_launch(group),
    )  # fmt: skip


def gather_floor(k, v, idx, out=None):
    """Σ over each token's selected keys of its K and V rows, [T, Hkv, D] fp32: the bytes an
    exact gather-based sparse attention forward reads, and nothing else. ``k``, ``v``
    [T, Hkv, D] contiguous, ``idx`` [T, K] int32 contiguous (-1 = none)."""
    from distill.dsa import kernels as K

    t, hkv, d = k.shape
    if out is None:
        out = torch.empty(t, hkv, d, dtype=torch.float32, device=k.device)
    _gather_floor_kernel[(t, hkv)](
        k, v, idx, out, idx.shape[1], k.stride(0), k.stride(1), idx.stride(0),
        out.stride(0), out.stride(1), D=d, BD=max(16, triton.next_power_of_2(d)),
        **K.SPARSE_LAUNCH,
    )  # fmt: skip
    return out


def attention(p: dict, t: int, dev, dtype) -> tuple[dict, dict]:
    """One layer's attention forward + backward at ``t`` tokens: dense and DSA. Returns the
    row and the timed closures by name (on this layer's tensors: for the sweep, profile)."""
    from distill.dsa import kernels as K
    from distill.models import _varlen_kernel

    g = torch.Generator(device=dev).manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, device=dev, dtype=dtype).requires_grad_()

    h, kv, d, hi, di = p["heads"], p["kv"], p["head_dim"], p["index_heads"], p["index_head_dim"]
    q, k, v = r(t, h, d), r(t, kv, d), r(t, kv, d)
    qi, ki, w = r(t, hi, di), r(t, di), r(t, hi)
    cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
    grad = torch.randn(t, h, d, generator=g, device=dev, dtype=dtype)
    scale = d**-0.5

    def dense():
        out = _varlen_kernel(q, k, v, cu, t, scale)
        torch.autograd.backward(out, grad)

    def dsa():
        out, kl = K.dsa_varlen(q, k, v, qi, ki, w, cu, p["top_k"], scale, loss=True, max_len=t)
        torch.autograd.backward([out, kl], [grad, torch.ones_like(kl)])

    starts = K.segment_starts(cu, t)

    def idx_now():  # the selection as the layer makes it now
        return K.index_topk(qi.detach(), ki.detach(), w.detach(), starts, p["top_k"], t)

    # and its log-sum-exps, which the layer's index KL reads (kernels.LSE_FROM_SELECTION)
    idx, lsei = K.index_topk(qi.detach(), ki.detach(), w.detach(), starts, p["top_k"], t,
                             with_lse=True)  # fmt: skip
    lsei = lsei if K.LSE_FROM_SELECTION else None

    def select():
        idx_now()

    def sparse():
        torch.autograd.backward(K.sparse_attention(q, k, v, idx, scale), grad)

    def sparse_fwd():
        with torch.no_grad():
            return K.sparse_attention(q, k, v, idx, scale)

    kc, vc = k.detach().contiguous(), v.detach().contiguous()
    idx32 = idx.to(torch.int32).contiguous()

    # the floors' outputs allocated in their calls: held across parts, they would count in
    # every other part's peak memory (0.03 GB at 32k, dense and DSA alike, 12:51-13:10 UTC)
    def gather():
        gather_floor(kc, vc, idx32)

    def scatter():
        dk, dv = (torch.zeros(t, kv, d, dtype=torch.float32, device=dev) for _ in "kv")
        scatter_floor(dk, dv, idx32, h // kv)

    def kl():  # the torch path, whatever the layer's default
        K.sparse_kl_torch(q, k, qi, ki, w, idx, scale).backward()

    def kl_fused():
        from distill.dsa.kl_kernel import sparse_kl_triton

        sparse_kl_triton(q, k, qi, ki, w, idx, scale).sum().backward()

    def kl_fused_sum():  # the layer's: the sum, its gradient taken in the forward walk
        from distill.dsa.kl_kernel import sparse_kl_sum_triton

        sparse_kl_sum_triton(q, k, qi, ki, w, idx, scale).backward()

    def sparse_p():  # the attention writing the KL's target p too (P_IN_FORWARD)
        out, _, _ = K._SparseAttention.apply(q, k, v, idx, scale, True)
        torch.autograd.backward(out, grad)

    def sparse_fwd_p():
        with torch.no_grad():
            return K._SparseAttention.apply(q, k, v, idx, scale, True)

    p_kl = None

    def kl_index():  # the KL from p and the index keys alone, its gradient in its forward
        nonlocal p_kl
        from distill.dsa.kl_kernel import index_kl_sum_triton

        if p_kl is None:
            p_kl = sparse_fwd_p()[2]
        index_kl_sum_triton(qi, ki, w, idx, p_kl, lsei).backward()

    def kl_index_fwd():  # its forward alone, no gradient (its sweep's output check)
        from distill.dsa.kl_kernel import _launch_index_kl

        kl_index()  # p
        return _launch_index_kl(qi, ki, w, idx, p_kl, False, lsei)[0]

    def kl_fwd():  # the fused KL's forward alone (its sweep's output check)
        from distill.dsa.kl_kernel import sparse_kl_triton

        with torch.no_grad():
            return sparse_kl_triton(q, k, qi, ki, w, idx, scale)

    # the K and V bytes the sparse forward must read: every valid entry, each KV head's rows
    n_valid = int((idx >= 0).sum())
    nbytes = n_valid * kv * d * 2 * k.element_size()
    row = {
        "tokens": t,
        "top_k": p["top_k"],
        "triton": K.use_triton(q),
        "kv_read_gb": round(nbytes / 1e9, 3),
    }
    parts = [("dense", dense), ("dsa", dsa), ("select", select), ("sparse", sparse)]
    parts += [("sparse_fwd", sparse_fwd), ("kl", kl)]
    if K.use_triton(q):  # the fused KL alone (the layer's default on CUDA; "kl" follows the env)
        parts += [("kl_fused", kl_fused), ("gather", gather), ("scatter", scatter)]
        from distill.dsa import kl_kernel as KL

        # the backward kernels' atomic adds under Triton's default memory order, side by
        # side with the layer's (kernels.ATOMIC_SEM, "relaxed")
        parts += [("sparse_acq_rel", _with(sparse, (K, "ATOMIC_SEM", "acq_rel")))]
        parts += [("kl_fused_acq_rel", _with(kl_fused, (K, "ATOMIC_SEM", "acq_rel")))]
        # the defaults before 2026-12-06 19:00 UTC, side by side with today's: the fused
        # KL's main logits from fp32 copies, then also walking the keys for its own
        # log-sum-exps and one launch for every head group (the whole layer)
        parts += [("kl_fused_fp32", _with(kl_fused, (KL, "MAIN_DOT_FP32", True)))]
        fused = (K, "P_IN_FORWARD", False)  # the fused KL kernel, the default until 12-07
        before = [fused, (KL, "MAIN_DOT_FP32", True), (K, "SHARE_LSE", False)]
        before += [(K, "SPARSE_LAUNCH_WIDE", K.SPARSE_LAUNCH)]
        parts += [("dsa_before", _with(dsa, *before))]
        # the KL's gradient from its forward walk (kl_kernel.GRAD_IN_FORWARD, on since
        # 2026-12-06 22:00 UTC; 12 ms a layer faster on one H100 at 32k, 2026-12-07)
        # against its backward kernel, alone and in the layer
        parts += [("kl_fused_sum", kl_fused_sum)]
        parts += [("dsa_kl_bwd", _with(dsa, fused, (KL, "GRAD_IN_FORWARD", False)))]
        # the sum's forward at 8 warps and 2 stages: compiled for sm_90 (2026-12-07) without
        # the launch's specialization, the default launch (4 warps, 3 stages) spilled 336
        # bytes at the Qwen2 shape under the device image's Triton 3.6 and 72 at the MQA
        # shape, 8 warps 64 and 0; specialized as launched (bench/dsa_compile.py since
        # 14:00 UTC), 0 and 16 bytes, 8 warps none
        wide = (KL, "KL_LAUNCH", {"num_warps": 8, "num_stages": 2})
        parts += [("kl_fused_sum_w8", _with(kl_fused_sum, wide))]
        parts += [("dsa_kl_w8", _with(dsa, fused, wide))]
        # the KL's target p written by the attention's forward and the KL from the index
        # keys alone (kernels.P_IN_FORWARD, the default) against the fused KL kernel (the
        # layer with SHARE_LSE and GRAD_IN_FORWARD): the layer, the attention with p (its
        # forward's second walk), and the index KL alone
        parts += [("dsa_kl_fused", _with(dsa, fused))]
        parts += [("sparse_p", sparse_p), ("sparse_fwd_p", sparse_fwd_p)]
        parts += [("kl_index", kl_index)]
        # off (slower, 2026-12-07): the top-k over fp32 scores, ties repaired (the same keys)
        parts += [("select_fp32", _with(select, (K, "SELECT_FP32", True)))]
        # off (slower, 2026-12-07): scores and selection in one kernel (select_kernel.py),
        # alone and in the layer; the rows whose keys differ from the default selection's
        # are counted (the same scores, so none expected)
        parts += [("select_fused", _with(select, (K, "SELECT_FUSED", True)))]
        parts += [("dsa_select_fused", _with(dsa, (K, "SELECT_FUSED", True)))]
        from distill.dsa import select_kernel as S

        # its per-row histograms as one tl.histogram rather than 16 row reductions
        hist = [(K, "SELECT_FUSED", True), (S, "SELECT_HIST", True)]
        parts += [("select_fused_hist", _with(select, *hist))]

        def rows_differ(name: str, pick) -> None:
            """The rows where selection ``name`` (``pick()``) chose other keys than the
            default's: the same scores, so none expected."""
            if _skipped(p, name):
                return
            try:  # a kernel that does not compile here is the part's error, not the row's
                got = pick()
                row[f"{name}_rows_differ"] = int(
                    (got.sort(-1).values != idx.sort(-1).values).any(-1).sum()
                )
            except Exception as e:  # noqa: BLE001 - recorded by the part's own run below
                print(f"{name}_rows_differ: {type(e).__name__}: {e}", flush=True)

        # the selection before SELECT_ROWS (the default since 2026-12-07): int64 rank keys
        # and torch.topk, alone and in the layer, and the rows where it picks other keys
        topk_sel = (K, "SELECT_ROWS", False)
        parts += [("select_topk", _with(select, topk_sel))]
        parts += [("dsa_select_topk", _with(dsa, topk_sel))]
        rows_differ("select_topk", _with(idx_now, topk_sel))
        # the selection's chunks at given rows (kernels.SELECT_CHUNK), and at BUDGET's
        # alone (SELECT_MIN_ROWS 0: the rule before 2026-12-07 13:10 UTC, 468 rows at 128k
        # and 1,489 at 32k against the default's 2,048)
        budget = (K, "SELECT_MIN_ROWS", 0)
        parts += [("select_budget", _with(select, budget)), ("dsa_budget", _with(dsa, budget))]
        for rows in CHUNK_ROWS:
            parts += [(f"select_rows_{rows}", _with(select, (K, "SELECT_CHUNK", rows)))]
            parts += [(f"dsa_rows_{rows}", _with(dsa, (K, "SELECT_CHUNK", rows)))]
        rows_differ("select_fused", lambda: S.fused_topk(qi.detach(), ki.detach(), w.detach(),
                                                         starts, idx.shape[1]))  # fmt: skip
    for name, fn in parts:
        if _skipped(p, name):
            continue
        try:  # one part failing (a kernel that does not compile at a shape) keeps the others
            s, gb = _timed(fn, dev, p["reps"])
        except Exception as e:  # noqa: BLE001 - recorded in the row, the run goes on
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"{name}: {row[f'{name}_error']}", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        row[f"{name}_ms"], row[f"{name}_peak_gb"] = round(s * 1e3, 2), gb and round(gb, 2)
        if name in ("gather", "sparse_fwd"):
            row[f"{name}_gbs"] = round(nbytes / s / 1e9, 1)
        # the index KL's p [T, K] fp32 (0.27 GB at 32k), made once for its reps: held past
        # its part it counted in every later part's peak (2026-12-07 13:58 UTC)
        p_kl = None
    if "dense_ms" in row and "dsa_ms" in row:
        row["speedup"] = round(row["dense_ms"] / row["dsa_ms"], 2)
    for was in (
        "before",
        "kl_bwd",
        "select_fused",
        "kl_w8",
        "kl_fused",
        "select_topk",
        "budget",
        *(f"rows_{rows}" for rows in CHUNK_ROWS),
    ):
        if "dense_ms" in row and f"dsa_{was}_ms" in row:
            row[f"speedup_{was}"] = round(row["dense_ms"] / row[f"dsa_{was}_ms"], 2)
    extra = dict(kl_fwd=kl_fwd)
    if K.use_triton(q):
        extra.update(kl_index_fwd=kl_index_fwd, rows_idx=lambda: idx_now().sort(-1).values)
        extra.update(p_only=lambda: sparse_fwd_p()[2])
    return row, dict(parts, **extra)


def _skipped(p: dict, name: str) -> bool:
    """Whether part ``name`` is left out: named by --skip-parts, or not by --parts."""
    return name in p.get("skip_parts", ()) or bool(p.get("parts")) and name not in p["parts"]


def _with(fn, *changes):
    """``fn`` with each ``(module, attribute, value)`` of ``changes`` set while it runs;
    its result returned."""

    def run():
        old = [getattr(m, a) for m, a, _ in changes]
        for m, a, v in changes:
            setattr(m, a, v)
        try:
            return fn()
        finally:
            for (m, a, _), o in zip(changes, old, strict=True):
                setattr(m, a, o)

    return run


def _sweep(name, owner, attr, grid, fwd, full, dev, reps: int, t: int) -> dict:
    """``full`` (forward + backward) and ``fwd`` under every launch configuration in
    ``grid`` (set as ``owner.attr``, which the kernels read at each launch), with the
    forward's largest difference from the default configuration's output; a configuration
    that fails (e.g. out of shared memory) is recorded, not fatal."""
    default = getattr(owner, attr)
    ref = fwd().float()
    configs = []
    try:
        for values in itertools.product(*grid.values()):
            setattr(owner, attr, dict(zip(grid, values, strict=True)))
            row = {"tokens": t, **getattr(owner, attr)}
            try:
                row["fwd_max_diff"] = float((fwd().float() - ref).abs().max())
                row[f"{name}_fwd_ms"] = round(_timed(fwd, dev, reps)[0] * 1e3, 2)
                row[f"{name}_ms"] = round(_timed(full, dev, reps)[0] * 1e3, 2)
            except Exception as e:  # any failure of one configuration
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            configs.append(row)
            print(json.dumps({f"sweep_{name}": row}), flush=True)
    finally:
        setattr(owner, attr, default)
    ok = [c for c in configs if f"{name}_ms" in c]
    best = {
        "fastest": min(ok, key=lambda c: c[f"{name}_ms"]) if ok else None,
        "fastest_fwd": min(ok, key=lambda c: c[f"{name}_fwd_ms"]) if ok else None,
        "default": default,
    }
    print(json.dumps({f"sweep_{name}_best": best}), flush=True)
    return {"tokens": t, "configs": configs, **best}


def decode(p: dict, dev, dtype, profile: bool = False) -> dict:
    """Tokens/s of the dense and the DSA model at ``decode_ctx`` context, batch B. With
    ``profile``, then each model's ops over two more steps, by device time (where a step's
    time goes: the figure alone does not say)."""
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from distill.backends.hf import cache_kwarg
    from distill.dsa.config import DSAConfig
    from distill.dsa.model import DSAForCausalLM

    shape = dict(
        vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
        num_key_value_heads=p["kv"], head_dim=p["head_dim"],
        max_position_embeddings=p["decode_ctx"] + p["decode_steps"] + 8,
    )  # fmt: skip
    b, ctx, steps = p["decode_batch"], p["decode_ctx"], p["decode_steps"]
    row = {"context": ctx, "batch": b, "top_k": p["top_k"]}
    for name in ("dense", "dsa"):
        if name == "dense":
            model = LlamaForCausalLM(LlamaConfig(**shape))
        else:
            cfg = DSAConfig(
                **shape, index_n_heads=p["index_heads"], index_head_dim=p["index_head_dim"],
                index_top_k=p["top_k"],
            )  # fmt: skip
            model = DSAForCausalLM(cfg)
        model = model.to(dev, dtype).eval()
        cache = StaticCache(config=model.config, max_cache_len=ctx + steps + 3)  # +2: profile
        g = torch.Generator(device=dev).manual_seed(0)
        with torch.no_grad():
            for i in range(p["layers"]):  # a filled context of random keys and values
                kv = [torch.randn(b, p["kv"], ctx, p["head_dim"], generator=g, device=dev,
                                  dtype=dtype) for _ in range(2)]  # fmt: skip
                cache.update(kv[0], kv[1], i)
                if name == "dsa":
                    ki = torch.randn(b, ctx, p["index_head_dim"], generator=g, device=dev)
                    cache.update_indexer(ki.to(dtype), i)
        ids = torch.randint(0, p["vocab"], (b, 1), device=dev)
        state = {"at": ctx}

        def step(model=model, cache=cache, ids=ids, state=state):
            at = state["at"]
            mask = torch.ones(b, at + 1, dtype=torch.long, device=dev)
            pos = torch.full((b, 1), at, device=dev)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                      logits_to_keep=1, **{cache_kwarg(model): cache})  # fmt: skip
            state["at"] = at + 1

        s, gb = _timed(step, dev, steps - 1)
        row[f"{name}_tok_s"], row[f"{name}_peak_gb"] = round(b / s, 1), gb and round(gb, 2)
        if profile:
            _profile(step, dev, f"{name} decode, 2 steps")
        del model, cache
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    row["speedup"] = round(row["dsa_tok_s"] / row["dense_tok_s"], 2)
    return row


def _profile(fn, dev, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            fn()
        _sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"== profile: {title}", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=60))


def _override(p: dict, items: list[str]) -> None:
    """``--set key=value``: each value typed like the preset's (lists comma-separated)."""
    for item in items:
        key, _, val = item.partition("=")
        if key not in p:
            raise SystemExit(f"--set {item}: no preset key {key!r} (keys: {', '.join(p)})")
        old = p[key]
        if isinstance(old, bool):
            p[key] = val.lower() in ("1", "true", "yes", "on")
        elif isinstance(old, list):
            p[key] = [type(old[0])(x) for x in val.split(",")]
        else:
            p[key] = type(old)(val)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--lengths", default=None, help="comma-separated token counts")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="skip the attention rows")
    ap.add_argument("--profile-decode", action="store_true", help="print each model's ops")
    ap.add_argument(
        "--profile-layer", action="store_true", help="print the DSA layer's ops, first length"
    )
    for flag, what in (
        ("sweep", "the sparse attention (SWEEP)"),
        ("sweep-kl", "the fused KL (KL_SWEEP)"),
        ("sweep-new", "the index KL, the row selection and the walk for p"),
        ("sweep-rows", "the row selection alone (ROWS_SWEEP)"),
    ):
        ap.add_argument(
            f"--{flag}", action="store_true",
            help=f"time {what} under each launch configuration, first length",
        )  # fmt: skip
    ap.add_argument(
        "--skip-parts", default="", help="comma-separated attention parts not to time, e.g. kl"
    )
    ap.add_argument(
        "--parts", default="", help="comma-separated attention parts to time, no others"
    )
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE",
        help="override preset keys, typed like the preset's value (lists comma-separated)",
    )  # fmt: skip
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    p = dict(PRESETS[args.preset or ("h100" if dev.type == "cuda" else "cpu")])
    if args.lengths:
        p["lengths"] = [int(x) for x in args.lengths.split(",")]
    if args.top_k:
        p["top_k"] = args.top_k
    _override(p, args.set)
    if args.skip_parts:
        p["skip_parts"] = args.skip_parts.split(",")
    if args.parts:
        p["parts"] = args.parts.split(",")
    dtype = torch.bfloat16 if p["dtype"] == "bf16" else torch.float32
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    tv = triton.__version__ if HAVE_TRITON else None
    print(f"device {name}, torch {torch.__version__}, triton {tv}, preset {p}", flush=True)
    results = {"device": name, "triton": tv, "preset": p, "attention": [], "decode": None}

    def save():  # after each step: a run cut short still leaves what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    for n, t in enumerate([] if args.decode_only else p["lengths"]):
        row, fns = attention(p, t, dev, dtype)
        results["attention"].append(row)
        print(json.dumps(row), flush=True)
        save()
        if n == 0 and args.profile_layer:  # before the sweeps, which a time box may end
            _profile(fns["dsa"], dev, f"DSA layer forward + backward, {t} tokens, 2 runs")
        sweeps = {"sweep": args.sweep, "sweep_kl": args.sweep_kl}
        sweeps.update(sweep_index_kl=args.sweep_new, sweep_rows=args.sweep_new or args.sweep_rows)
        sweeps.update(sweep_p_walk=args.sweep_new)
        for key in [key for key, on in sweeps.items() if on and n == 0]:
            if not row["triton"]:
                print(f"--{key.replace('_', '-')}: no Triton here, nothing to sweep", flush=True)
                continue
            from distill.dsa import kernels, kl_kernel

            if key == "sweep":
                wide = p["heads"] // p["kv"] >= kernels.WIDE_GROUP  # the launch this shape takes
                where = (
                    "sparse",
                    kernels,
                    "SPARSE_LAUNCH_WIDE" if wide else "SPARSE_LAUNCH",
                    SWEEP,
                    fns["sparse_fwd"],
                    fns["sparse"],
                )
            elif key == "sweep_kl":
                where = ("kl", kl_kernel, "KL_LAUNCH", KL_SWEEP, fns["kl_fwd"], fns["kl_fused"])
            elif key == "sweep_index_kl":
                where = ("index_kl", kl_kernel, "INDEX_KL_LAUNCH", INDEX_KL_SWEEP,
                         fns["kl_index_fwd"], fns["kl_index"])  # fmt: skip
            elif key == "sweep_p_walk":
                where = ("p_walk", kernels, "P_WALK", P_WALK_SWEEP, fns["p_only"], fns["sparse_p"])
            else:
                from distill.dsa import select_kernel

                where = ("rows", select_kernel, "ROWS_SELECT_LAUNCH", ROWS_SWEEP,
                         fns["rows_idx"], fns["select"])  # fmt: skip
            results[key] = _sweep(*where, dev, p["reps"], t)
            save()
        del fns
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_decode and (p["decode"] or args.decode_only):
        results["decode"] = decode(p, dev, dtype, args.profile_decode)
        print(json.dumps(results["decode"]), flush=True)
    save()


if __name__ == "__main__":
    main()

"""DeepSeek Sparse Attention students (distill/dsa/): the attention against dense attention
and against its own reference, causal per-trace selection, which weights each phase's
loss reaches, save/load through AutoModelForCausalLM, the cache, and the train stage
end to end into eval's backend, serve and the RL policy's forward."""

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from old_releases import skip_where_old
from tiny_artifacts import ARCH, make_tokenizer, math_trace, write_shards

from distill.dsa import attention as A
from distill.dsa import kernels as K
from distill.dsa import register

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(seed=0, dtype=F64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _dsa(dense, top_k, warmup=False):
    from distill.dsa.model import from_dense

    return from_dense(
        dense, index_n_heads=2, index_head_dim=8, index_top_k=top_k, seed=1, warmup=warmup
    ).eval()


def _set_top_k(model, top_k):
    for layer in model.attention_layers():
        layer.top_k = top_k
    model.config.index_top_k = top_k


def _qkv(t, seed=0, dtype=F64, grad=False):
    """Main and indexer inputs of a flat row; the indexer's are positive, so no two
    scores tie and every implementation selects the same keys."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, pos=False):
        x = torch.randn(*s, generator=g, dtype=dtype)
        return (x.abs() if pos else x).requires_grad_(grad)

    return (
        r(t, 4, 16), r(t, 2, 16), r(t, 2, 16), r(t, 3, 8, pos=True), r(t, 8, pos=True),
        r(t, 3, pos=True),
    )  # fmt: skip


CU = torch.tensor([0, 37, 38, 100, 161], dtype=torch.int32)  # a lone token, unequal traces


# --------------------------------------------------------------------------- attention


def test_top_k_at_least_the_length_is_dense_attention():
    """fp64: with top_k >= the sequence length every allowed key is read, so the DSA
    model's logits are the dense model's, on padded rows and on a packed flat row; with
    a small top_k they are not."""
    dense = _llama()
    model = _dsa(dense, top_k=64)
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding, as eval's backend decodes
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()])
        # the reference on a flat row: the sparse machinery itself, top_k = the row
        q, k, v, qi, ki, w = _qkv(161)
        sparse, _ = A.dsa_varlen_reference(q, k, v, qi, ki, w, CU, 161, 0.25)
        full, _ = A.dsa_varlen_reference(q, k, v, qi, ki, w, CU, 161, 0.25, dense=True)
        torch.testing.assert_close(sparse, full)
        from distill.models import _varlen_kernel

        torch.testing.assert_close(full, _varlen_kernel(q, k, v, CU, 64, 0.25))
        small, _ = A.dsa_varlen_reference(q, k, v, qi, ki, w, CU, 4, 0.25)
        assert (small - full).abs().max() > 1e-3
        _set_top_k(model, 4)
        assert (model(input_ids=ids, attention_mask=mask).logits - want).abs().max() > 1e-3


def test_packed_rows_attend_within_their_trace():
    """A packed row through the trainer's flat path (cu_seq_lens) and through a plain
    forward with restarting position_ids both equal each trace run alone."""
    model = _dsa(_llama(), top_k=5)
    g = torch.Generator().manual_seed(1)
    lens = [9, 14, 6]
    traces = [torch.randint(0, 61, (1, n), generator=g) for n in lens]
    row = torch.cat(traces, 1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, 9, 23, 29], dtype=torch.int32)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=t).logits for t in traces], 1)
        flat = model(
            input_ids=row, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
            max_length_q=14, max_length_k=14,
        ).logits  # fmt: skip
        plain = model(input_ids=row, position_ids=pos).logits
    torch.testing.assert_close(flat, alone)
    torch.testing.assert_close(plain, alone)


def test_mask_is_built_once_per_forward(monkeypatch):
    """Every layer of one forward reads the same [B, T, T] mask of what a query may read:
    the first layer builds it, the others reuse it (a layer called without the model's
    dict builds its own, the same bits); the next forward builds its own."""
    model = _dsa(_llama(), top_k=5)
    calls = {"allowed": 0, "trace": 0}
    for name, key in (("allowed_from_mask", "allowed"), ("same_trace", "trace")):
        real = getattr(A, name)

        def counted(*args, _real=real, _key=key):
            calls[_key] += 1
            return _real(*args)

        monkeypatch.setattr(A, name, counted)
    ids = torch.randint(0, 61, (2, 23), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    pos = torch.cat([torch.arange(9), torch.arange(14)])[None].expand(2, -1)
    with torch.no_grad():
        shared = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        assert calls == {"allowed": 1, "trace": 1}
        per_layer = model(input_ids=ids, attention_mask=mask, position_ids=pos, dsa_masks=None)
    assert calls == {"allowed": 3, "trace": 3}  # two layers, each its own
    assert torch.equal(shared, per_layer.logits)


def test_selection_is_causal_and_stays_in_its_trace():
    """Scores that grow with the key's position (every future key would win): no
    selected key is after its query or before its trace, and each query reads exactly
    min(top_k, keys so far) of them; batch and flat paths alike."""
    t, top_k = 161, 6
    starts = K.segment_starts(CU, t)
    qi = torch.ones(t, 1, 4, dtype=F64)
    ki = torch.arange(t, dtype=F64)[:, None].repeat(1, 4)  # score grows with the key
    w = torch.ones(t, 1, dtype=F64)
    idx = K.index_topk(qi, ki, w, starts, top_k, max_len=62)
    pos = torch.arange(t)[:, None]
    ok = idx >= 0
    assert ((idx <= pos) | ~ok).all() and ((idx >= starts[:, None]) | ~ok).all()
    assert (ok.sum(1) == torch.clamp(pos[:, 0] - starts + 1, max=top_k)).all()
    # the latest keys win, the query itself among them
    assert (idx.max(1).values == torch.arange(t)).all()
    scores = A.index_scores(qi[None], ki[None], w[None])
    allowed = A.allowed_from_mask(None, 1, t, t, "cpu")
    sel = A.select(scores, allowed, top_k)[0]
    assert not sel.triu(1).any() and (sel.sum(1) == torch.clamp(pos[:, 0] + 1, max=top_k)).all()


def test_selection_chunks_keep_enough_rows_at_long_rows_within_their_memory():
    """The row selection's chunk: BUDGET's rows where they are many, at least
    SELECT_MIN_ROWS at long rows (where BUDGET alone left few programs a launch), but
    never a chunk of scores over SELECT_MAX elements, nor under 16 rows."""
    from distill.dsa import select_kernel

    cap = select_kernel.ROWS_SELECT_LAUNCH["CAP"]
    for max_len in (64, 16_384, 32_768, 131_072, 1 << 20, 1 << 26):
        rows, per_row = K.select_chunk_rows(max_len), max_len + 4096 + 2 * cap
        budget_rows = K.BUDGET // per_row
        assert 16 <= rows <= 4096 and rows >= min(budget_rows, 4096)
        assert rows * per_row <= max(K.SELECT_MAX, K.BUDGET) or rows == 16
        if per_row * K.SELECT_MIN_ROWS <= K.SELECT_MAX:  # up to ~250k keys a row
            assert rows >= K.SELECT_MIN_ROWS
    assert K.select_chunk_rows(131_072) == K.SELECT_MIN_ROWS > K.BUDGET // (131_072 + 4096)
    assert K.select_chunk_rows(1 << 20) < K.SELECT_MIN_ROWS  # held by SELECT_MAX


@pytest.mark.parametrize("case", ["random", "untrained", "ties", "signs"])
def test_fp32_selection_picks_the_rank_keys_choice(case, monkeypatch):
    """kernels.SELECT_FP32 (a top-k of the fp32 scores, ties repaired) selects the keys
    the rank keys select: a random indexer (whose scores still tie at 0 where every
    head's ReLU is 0), an untrained one (every score 0), scores on a coarse grid (ties at
    the k-th score: without the repair this and the others fail) and both signs with zeros
    of either sign."""
    t, top_k = 161, 6
    g = torch.Generator().manual_seed(11)
    qi = torch.randn(t, 2, 4, generator=g)
    ki = torch.randn(t, 4, generator=g)
    w = torch.rand(t, 2, generator=g)
    if case == "untrained":
        qi = torch.zeros_like(qi)
    elif case == "ties":
        qi, ki = qi.round().abs(), ki.round().abs()  # integer scores: many equal
        w = torch.ones_like(w)
    elif case == "signs":
        w = w - 0.5  # negative weights: negative scores and -0.0 where a ReLU is 0
    starts = K.segment_starts(CU, t)
    monkeypatch.setattr(K, "SELECT_FP32", False)
    want = K.index_topk(qi, ki, w, starts, top_k, 62)
    monkeypatch.setattr(K, "SELECT_FP32", True)
    got = K.index_topk(qi, ki, w, starts, top_k, 62)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    if case == "ties":  # rows whose k-th score ties keys beyond the k: the repair's case
        s = K._chunk_scores(qi, ki, w, starts, 0, t, 0)
        kth = s.topk(top_k, dim=-1).values[:, -1:]
        assert ((s >= kth) & (kth > float("-inf"))).sum(-1).gt(top_k).any()


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("top_k", [5, 200])
def test_gpu_path_in_torch_matches_the_reference(dense, top_k):
    """fp64 on CPU: the chunked O(T·top_k) path (gathered keys, chunked KL) against the
    whole-matrix reference: outputs, the KL and every gradient."""
    q, k, v, qi, ki, w = _qkv(161, grad=True)
    ref, kl_ref = A.dsa_varlen_reference(q, k, v, qi, ki, w, CU, top_k, 0.3, dense=dense, loss=True)
    got, kl_got = K.dsa_varlen(q, k, v, qi, ki, w, CU, top_k, 0.3, dense=dense, loss=True)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(kl_got, kl_ref)
    ins = (q, k, v, qi, ki, w)
    g_ref = torch.autograd.grad((ref * ref.detach().cos()).sum() + kl_ref, ins)
    g_got = torch.autograd.grad((got * got.detach().cos()).sum() + kl_got, ins)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_decode_path_gathers_the_same_keys():
    """The batch path's gathered attention (eval, serve, decode) equals masking the
    selection."""
    q, k, v, qi, ki, w = _qkv(30)
    qb, kb, vb = (x.transpose(0, 1)[None] for x in (q, k, v))
    allowed = A.allowed_from_mask(None, 1, 30, 30, "cpu")
    scores = A.index_scores(qi[None], ki[None], w[None])
    idx, ok = A.topk_indices(scores, allowed, 7)
    masked = A.attend(qb, kb, vb, A.select(scores, allowed, 7), 0.3)
    torch.testing.assert_close(A.attend_gathered(qb, kb, vb, idx, ok, 0.3), masked)


TRITON_SCRIPT = """
import itertools, os, sys, torch
sys.path.insert(0, {tests!r})
from test_dsa import _qkv, CU
from distill.dsa import attention as A, kernels as K
assert K.use_triton(torch.zeros(1))
cu = torch.tensor([0, 20, 21, 50, 70], dtype=torch.int32)
q, k, v, qi, ki, w = _qkv(70, dtype=torch.float32, grad=True)
ins = (q, k, v, qi, ki, w)
# the fused KL kernel walking the main keys for their log-sum-exps, then reading the
# attention's, then the KL from the p the attention's forward writes (the default; 2 KV
# heads: each adds its heads' share), its walk at 16 keys a step and at the default's
walk = K.P_WALK
modes = [(False, False, walk), (True, False, walk), (True, True, dict(BNP=16)), (True, True, walk)]
for (share, p_fwd, K.P_WALK), top_k in itertools.product(modes, (5, 70)):
    K.SHARE_LSE, K.P_IN_FORWARD = share, p_fwd
    ref, kl_ref = A.dsa_varlen_reference(q, k, v, qi, ki, w, cu, top_k, 0.3, loss=True)
    got, kl_got = K.dsa_varlen(q, k, v, qi, ki, w, cu, top_k, 0.3, loss=True)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kl_got, kl_ref, atol=1e-4, rtol=1e-4)
    g_ref = torch.autograd.grad((ref * ref.detach().cos()).sum() + kl_ref, ins)
    g_got = torch.autograd.grad((got * got.detach().cos()).sum() + kl_got, ins)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
assert K.P_IN_FORWARD
# and over one KV head (8 heads: p stored, not added), its gradient scaled; no grad mode
gm = torch.Generator().manual_seed(3)
qm = torch.randn(70, 8, 16, generator=gm, requires_grad=True)
km, vm = (torch.randn(70, 1, 16, generator=gm, requires_grad=True) for _ in range(2))
mins = (qm, km, vm, qi, ki, w)
ref, kl_ref = A.dsa_varlen_reference(*mins, cu, 5, 0.3, loss=True)
got, kl_got = K.dsa_varlen(*mins, cu, 5, 0.3, loss=True)
torch.testing.assert_close(kl_got, kl_ref, atol=1e-4, rtol=1e-4)
for a, b in zip(torch.autograd.grad(kl_got * 0.5 + got.sum(), mins),
                torch.autograd.grad(kl_ref * 0.5 + ref.sum(), mins)):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
with torch.no_grad():
    torch.testing.assert_close(K.dsa_varlen(*mins, cu, 5, 0.3, loss=True)[1], kl_ref.detach(),
                               atol=1e-4, rtol=1e-4)
# the score kernel's rank keys are rank_key of its scores, bit for bit, ties included (an
# untrained indexer: every ReLU at 0), and the selection equals the torch path's
starts = K.segment_starts(cu, 70)
for sign in (1.0, -1.0):
    qx = (qi.detach().abs() * sign).contiguous()
    keys = K._triton_scores(qx, ki.detach(), w.detach(), starts, 20, 70, 0, ranked=True)
    assert keys.dtype == torch.int64
    want = A.rank_key(K._triton_scores(qx, ki.detach(), w.detach(), starts, 20, 70, 0))
    assert torch.equal(keys, want), (sign, (keys != want).sum())
    got = K.index_topk(qx, ki.detach(), w.detach(), starts, 6, 30)
    # the kernel's fp32 scores, a top-k of them, ties repaired
    K.SELECT_FP32, K.SELECT_ROWS = True, False
    got32 = K.index_topk(qx, ki.detach(), w.detach(), starts, 6, 30)
    K.SELECT_FP32, K.SELECT_ROWS = False, True
    os.environ["DISTILL_DSA_TRITON"] = "0"
    ref = K.index_topk(qx, ki.detach(), w.detach(), starts, 6, 30)
    del os.environ["DISTILL_DSA_TRITON"]
    assert torch.equal(got.sort(-1).values, ref.sort(-1).values), sign
    assert torch.equal(got32.sort(-1).values, ref.sort(-1).values), sign
    # the int64 rank keys and torch.topk against scores and selection in one kernel
    # (kernels.SELECT_FUSED, its histograms by row reductions or tl.histogram) and one
    # program a row over the fp32 scores (kernels.SELECT_ROWS, the default; rows of 16
    # keys a step, chunks of 7 rows too, so rows start mid-trace; a scratch of 8 keys, so
    # rows are read whole or copied at some pass, and of 64, every row copied): the same
    # keys, ties at 0 (the ReLUs of the negative queries) to the later key, blocks that
    # span traces, rows with fewer keys than top-k
    from distill.dsa import select_kernel as S
    S.SELECT_LAUNCH = {{"BM": 16, "BN": 16}}
    S.ROWS_SELECT_LAUNCH = {{"BS": 16, "CAP": 8}}
    ways = (dict(SELECT_FUSED=True), dict(SELECT_FUSED=True, hist=True),
            dict(SELECT_ROWS=True), dict(SELECT_ROWS=True, SELECT_CHUNK=7),
            dict(SELECT_ROWS=True, cap=64))
    for (top_k, max_len), way in itertools.product(((6, 30), (40, 70), (1, 30)), ways):
        K.SELECT_ROWS = False
        plain = K.index_topk(qx, ki.detach(), w.detach(), starts, top_k, max_len)
        S.SELECT_HIST = way.get("hist", False)
        S.ROWS_SELECT_LAUNCH = {{"BS": 16, "CAP": way.get("cap", 8)}}
        for name, value in way.items():
            if name not in ("hist", "cap"):
                setattr(K, name, value)
        other = K.index_topk(qx, ki.detach(), w.detach(), starts, top_k, max_len)
        K.SELECT_FUSED, K.SELECT_ROWS, K.SELECT_CHUNK = False, True, None
        assert other.shape == plain.shape and (other < 0).any() == (plain < 0).any()
        assert torch.equal(other.sort(-1).values, plain.sort(-1).values), (sign, top_k, way)
# the decode step's selection in Triton kernels (decode_kernel.decode_topk) against
# topk_indices: ties (rounded scores: the later key), rows with fewer valid keys than k;
# rows in chunks of 32 keys (several chunks tie); then its attention over the selected
# rows read in place (decode_attention, the keys in splits) against SDPA over gathered ones
import torch.nn.functional as F
from distill.backends.llama_decode import dequantize_rows, quantize_int8
from distill.dsa import decode_kernel as D
D.DECODE_LAUNCH = {{"CS": 32}}
D.ATTENTION_LAUNCH = {{"BN": 16, "programs": 24}}
gd = torch.Generator().manual_seed(2)
qd = torch.randn(3, 4, 1, 8, generator=gd)
kd, vd = torch.randn(2, 3, 2, 150, 8, generator=gd)
D.SCORE_LAUNCH = {{"BS": 64, "num_warps": 4}}
qid, kid, wd = (torch.randn(*s, generator=gd) for s in ((3, 1, 3, 8), (3, 150, 8), (3, 1, 3)))
torch.testing.assert_close(D.decode_scores(qid, kid, wd), A.index_scores(qid, kid, wd))
for case in ("random", "ties", "few"):
    sc = torch.randn(3, 1, 150, generator=gd)
    valid = torch.rand(3, 150, generator=gd) > 0.2
    if case == "ties":
        sc = sc.round()
    if case == "few":
        valid[:, 12:] = False
    for top in (1, 16, 100):
        got_i, got_ok = D.decode_topk(sc, valid, top)
        ref_i, ref_ok = A.topk_indices(sc.masked_fill(~valid[:, None], float("-inf")),
                                       valid[:, None], top)
        assert got_i.shape == ref_i.shape and got_ok.dtype == torch.bool
        assert torch.equal(got_ok.sum(-1), ref_ok.sum(-1)), (case, top)
        for r in range(3):
            assert set(got_i[r, 0][got_ok[r, 0]].tolist()) == set(ref_i[r, 0][ref_ok[r, 0]].tolist())
        at = got_i[:, 0, None, :, None].expand(3, 2, got_i.shape[-1], 8)
        want_o = F.scaled_dot_product_attention(qd.reshape(3, 2, 2, 8), kd.gather(2, at),
                                                vd.gather(2, at), attn_mask=got_ok[:, None],
                                                scale=0.3).reshape(3, 4, 1, 8)
        got_o = D.decode_attention(qd, kd, vd, got_i, got_ok, 0.3)
        torch.testing.assert_close(got_o, want_o, atol=1e-5, rtol=1e-5)
        # int8 caches with a scale a row: the attention over their dequantized rows
        (k8, ks), (v8, vs) = (quantize_int8(t * 10.0 ** torch.randn(3, 2, 150, 1, generator=gd))
                              for t in (kd, vd))
        kb, vb = (dequantize_rows(x, sc, torch.float32) for x, sc in ((k8, ks), (v8, vs)))
        want_o = F.scaled_dot_product_attention(qd.reshape(3, 2, 2, 8), kb.gather(2, at),
                                                vb.gather(2, at), attn_mask=got_ok[:, None],
                                                scale=0.3).reshape(3, 4, 1, 8)
        got_o = D.decode_attention(qd, k8, v8, got_i, got_ok, 0.3, torch.stack((ks, vs), -1))
        torch.testing.assert_close(got_o, want_o, atol=1e-5, rtol=1e-5)
# the fused KL token by token against torch's, indexer queries of both signs (ReLUs off)
from distill.dsa.kl_kernel import sparse_kl_triton
qs = torch.randn(70, 3, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
idx = K.index_topk(qs.detach(), ki.detach(), w.detach(), K.segment_starts(cu, 70), 6, 30)
assert (idx < 0).any()  # queries with fewer than 6 keys in their trace
got = sparse_kl_triton(q, k, qs, ki, w, idx, 0.3)
want = torch.stack([K._sparse_kl_chunk(q[i : i + 1].detach(), k.detach(), qs[i : i + 1], ki,
                                       w[i : i + 1], idx[i : i + 1], 0.3) for i in range(70)])
torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)
c = torch.rand(70)
for a, b in zip(torch.autograd.grad((got * c).sum(), (qs, ki, w)),
                torch.autograd.grad((want * c).sum(), (qs, ki, w), retain_graph=True)):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
# the sum with its gradient from the forward walk (the layer's default), scaled by the
# incoming gradient; without grad mode it keeps none
from distill.dsa.kl_kernel import sparse_kl_sum_triton
total = sparse_kl_sum_triton(q, k, qs, ki, w, idx, 0.3)
torch.testing.assert_close(total, want.sum().float(), atol=1e-5, rtol=1e-4)
for a, b in zip(torch.autograd.grad(total * 1.7, (qs, ki, w)),
                torch.autograd.grad(want.sum() * 1.7, (qs, ki, w))):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
from distill.dsa import kl_kernel
launched, launch = [], kl_kernel._launch_forward
def spy(*args, grad):
    launched.append(grad)
    return launch(*args, grad=grad)
kl_kernel._launch_forward = spy
with torch.no_grad():
    sparse_kl_sum_triton(q, k, qs, ki, w, idx, 0.3)
sparse_kl_sum_triton(q, k, qs.detach(), ki.detach(), w.detach(), idx, 0.3)
sparse_kl_sum_triton(q, k, qs, ki, w, idx, 0.3)
kl_kernel._launch_forward = launch
assert launched == [False, False, True], launched  # no gradient computed unless asked for
# other layouts of the main heads (kl_kernel._slots): 3 KV heads in one slot, 4 in two
# slots of 2, 3 in slots of one (a fourth slot padding), and 64 heads over one KV head
# (one slot of 64 rows: the 2D dot)
from distill.dsa.kl_kernel import _slots
assert [_slots(h, hkv) for h, hkv in ((6, 3), (32, 4), (48, 3), (64, 1))] == [
    dict(R=3, NS=1, BR=16), dict(R=2, NS=2, BR=16), dict(R=1, NS=4, BR=16),
    dict(R=1, NS=1, BR=64)]
for h, hkv in ((6, 3), (32, 4), (48, 3), (64, 1)):
    gen = torch.Generator().manual_seed(h)
    qh, kh = torch.randn(70, h, 16, generator=gen), torch.randn(70, hkv, 16, generator=gen)
    got = sparse_kl_triton(qh, kh, qs, ki, w, idx, 0.3)
    want = torch.stack([K._sparse_kl_chunk(qh[i : i + 1], kh, qs[i : i + 1], ki, w[i : i + 1],
                                           idx[i : i + 1], 0.3) for i in range(70)])
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)
    for a, b in zip(torch.autograd.grad((got * c).sum(), (qs, ki, w)),
                    torch.autograd.grad((want * c).sum(), (qs, ki, w), retain_graph=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    total = sparse_kl_sum_triton(qh, kh, qs, ki, w, idx, 0.3)
    for a, b in zip(torch.autograd.grad(total, (qs, ki, w)),
                    torch.autograd.grad(want.sum(), (qs, ki, w))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
# half-precision main heads (bf16 on a GPU; the interpreter computes fp16 dots right, bf16
# ones not): their logits from the inputs' dtype and from fp32 copies (the default)
qh, kh = q.detach().half(), k.detach().half()
want = torch.stack([K._sparse_kl_chunk(qh[i : i + 1].float(), kh.float(), qs[i : i + 1], ki,
                                       w[i : i + 1], idx[i : i + 1], 0.3) for i in range(70)])
want_grads = torch.autograd.grad((want * c).sum(), (qs, ki, w))
for fp32 in (False, True):
    kl_kernel.MAIN_DOT_FP32 = fp32
    got = sparse_kl_triton(qh, kh, qs, ki, w, idx, 0.3)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)
    for a, b in zip(torch.autograd.grad((got * c).sum(), (qs, ki, w)), want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
# 64 heads over one KV head: the sparse attention's own launch (kernels.SPARSE_LAUNCH_WIDE,
# 32 keys a step), forward and backward against torch on the same keys: one trace of 70,
# 40 keys a query (two steps of 32, the second part padding; early queries have fewer)
assert K.sparse_launch(64) is K.SPARSE_LAUNCH_WIDE and K.SPARSE_LAUNCH_WIDE["BN"] == 32
one = torch.tensor([0, 70], dtype=torch.int32)
idx40 = K.index_topk(qs.detach(), ki.detach(), w.detach(), K.segment_starts(one, 70), 40, 70)
assert idx40.shape == (70, 40) and (idx40 < 0).any() and (idx40[-1] >= 0).all()
gen = torch.Generator().manual_seed(64)
mqa = [torch.randn(70, n, 16, generator=gen, requires_grad=True) for n in (64, 1, 1)]
ref_in = [x.detach().clone().requires_grad_() for x in mqa]
out, _, _ = K._SparseAttention.apply(*mqa, idx40, 0.3)
ref = K._gathered(*ref_in, idx40, 0.3)
torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
g = torch.randn_like(ref)
for a, b in zip(torch.autograd.grad(out, mqa, g), torch.autograd.grad(ref, ref_in, g)):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
print("ok")
"""


@pytest.mark.skipif(not K.HAVE_TRITON, reason="triton is not installed")
def test_triton_kernels_match_the_reference_interpreted(tmp_path):
    """The Triton kernels (index scores and rank keys; sparse attention forward and
    backward with atomic dK/dV, at a GQA shape and at 64 heads over one KV head with its
    own launch; the fused sparse KL and its gradient, for four groupings of the main heads
    and with the attention's log-sum-exps) on CPU under TRITON_INTERPRET=1, in a fresh
    process (the interpreter is chosen when the kernels are defined)."""
    script = tmp_path / "tri.py"
    script.write_text(TRITON_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", DISTILL_DSA_FUSED_KL="1")
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900
    )
    skip_where_old(proc.stderr)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


ROWS_SCRIPT = """
import itertools, sys
import torch
sys.path.insert(0, {tests!r} + "/..")
from distill.dsa import attention as A
from distill.dsa import select_kernel as S

g = torch.Generator().manual_seed(0)
r, n, q0, lo = 5, 120, 100, 3  # rows of 101-105 keys
cases = dict(
    spread=torch.randn(r, n, generator=g) * torch.exp(torch.randn(r, n, generator=g) * 3),
    ties=torch.randint(0, 4, (r, n), generator=g).float(),  # one fp16 bin: whole-row passes
    huge=torch.randn(r, n, generator=g) * 1e6,  # past fp16's range: +-inf and 0 bins
)
cases["huge"][:, 1::4] = 0.0
cases["huge"][:, 2::4] = -0.0
for (name, sc), k_out, cap in itertools.product(cases.items(), (1, 17, 60), (0, 8, 4096)):
    sc = sc.clone()
    sc[:, ::7] = float("-inf")  # keys not the row's
    idx = torch.full((r, k_out + 2), -1, dtype=torch.int32)
    lse = torch.empty(r)
    S.ROWS_SELECT_LAUNCH = dict(BS=32, CAP=cap)
    S.rows_select(sc, idx, k_out, q0, lo, lse)
    for b in range(r):
        row = sc[b, : q0 + b + 1]
        kk = min(k_out, int((row > float("-inf")).sum()))
        want = A.rank_key(row).topk(kk).indices  # ties to the later key
        got = idx[b][idx[b] >= 0].long() - lo
        assert sorted(got.tolist()) == sorted(want.tolist()), (name, k_out, cap, b)
        torch.testing.assert_close(lse[b], row[want].double().logsumexp(0).float())
print("ok")
"""


@pytest.mark.skipif(not K.HAVE_TRITON, reason="triton is not installed")
def test_row_selection_matches_the_rank_keys_interpreted(tmp_path):
    """The trainer's selection kernel (``select_kernel.rows_select``) under
    TRITON_INTERPRET=1: the keys of the rank keys' top-k (ties to the later key, -inf
    keys never) and the log-sum-exp of their scores, on scores spread over many binades
    (the fp16 bin narrows them, the rest copied), tied in one bin and past fp16's range
    (whole-row passes), with scratch sizes 0, 8 and 4,096: every path of its passes."""
    script = tmp_path / "rows.py"
    script.write_text(ROWS_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    skip_where_old(proc.stderr)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def _has_cuda_compiler() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not K.HAVE_TRITON or not _has_cuda_compiler(), reason="needs Triton")
def test_triton_kernels_compile_for_hopper_without_a_gpu(monkeypatch):
    """Every DSA kernel, with every setting it takes, compiles for sm_90 at the Qwen2-0.5B
    and MQA shapes (Triton compiles with its own ptxas; no GPU), specialized as the launch
    specializes it; the fused KL's main logits take Hopper's warpgroup MMA at the MQA
    shape, as the attention's do, and the backward's dK and dV (and the KL's dki) atomic
    adds go four elements an instruction."""
    import importlib.util

    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    path = Path(__file__).parents[1] / "bench" / "dsa_compile.py"
    spec = importlib.util.spec_from_file_location("dsa_compile", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for shape in ("qwen2", "mqa"):
        for name, fn, types, consts, launch in mod.kernels_at(shape):
            kernel = mod.compile_kernel(fn, types, consts, launch, 90, mod.divisible(shape, name))
            row = mod.describe(kernel)
            if shape == "mqa" and name.startswith("KL forward"):
                assert row["wgmma"], f"{name} at the MQA shape: {row}"
            if "cuobjdump" in row:  # a Triton without it: no SASS to read
                continue
            if name in ("sparse backward", "KL backward, fp32 logits True"):
                assert "reductions" in row, (shape, name, row)
            if "reductions" in row and not name.startswith("sparse forward"):  # p: one a row
                assert set(row["reductions"]) == {"F32x4"}, (shape, name, row)


@pytest.mark.skipif(not K.HAVE_TRITON, reason="triton is not installed")
def test_kl_kernel_multiplies_each_key_head_by_its_own_query_heads():
    """The fused KL's layout of the main query heads: no more rows (softmax work) and no
    more dot products than one 16-row-padded block of every head against every KV head
    (the kernel before), and fewer dot products for every GQA shape of more than 16
    heads in powers of two; the Qwen2-0.5B and Llama-3-8B shapes."""
    from distill.dsa.kl_kernel import _slots

    def p2(x):
        return 1 << (x - 1).bit_length()

    for hkv in range(1, 17):
        for g in range(1, 33):
            h, sl = hkv * g, _slots(hkv * g, hkv)
            rows, dots = sl["NS"] * sl["BR"], sl["NS"] * sl["R"] * sl["BR"]
            assert sl["NS"] * sl["R"] >= hkv and sl["R"] * g <= sl["BR"]
            assert rows <= max(16, p2(h)) and dots <= hkv * max(16, p2(h))
            if hkv > 1 and h > 16 and p2(g) == g and p2(hkv) == hkv:
                assert dots < hkv * max(16, p2(h))
    assert _slots(14, 2) == dict(R=2, NS=1, BR=16)  # 2 x 16 dot rows per key, as before
    assert _slots(32, 8) == dict(R=4, NS=2, BR=16)  # 128 dot rows per key, was 256


def _sparse_attention_matches(q, k, v, idx: torch.Tensor) -> torch.Tensor:
    """The Triton sparse attention in bf16 against the torch path in fp32 on the same
    (bf16-rounded) inputs and the keys ``idx``, forward and backward; its log-sum-exps.
    On the unrounded inputs, with an unseeded gradient, one key-gradient entry of 2,576
    missed by up to 0.077 in 2 of 10 runs at 64 heads over one KV head (one H100,
    2026-12-07 14:37 UTC; 10 of 10 passed as now): a sum over 64 heads, each with its own
    input rounding."""
    half = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    full = [x.bfloat16().float().requires_grad_() for x in (q, k, v)]
    out, lse, _ = K._SparseAttention.apply(*half, idx, 0.3)
    ref = K._gathered(*full, idx, 0.3)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(ref.shape, generator=g).to(ref.device).bfloat16()
    out.backward(grad)
    ref.backward(grad.float())
    for a, b in zip(half, full, strict=True):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2)
    return lse


@pytest.mark.skipif(not torch.cuda.is_available() or not K.HAVE_TRITON, reason="needs CUDA")
def test_triton_kernels_match_torch_on_gpu():
    """bf16 on the GPU, each kernel on the same selection as torch in fp32 (a whole-path
    comparison would let bf16 rounding flip near-tied selections): index scores, sparse
    attention forward and backward, the fused sparse KL and its gradient."""
    q, k, v, qi, ki, w = (x.cuda().float() for x in _qkv(161))
    cu = CU.cuda()
    starts = K.segment_starts(cu, 161)
    got = K._triton_scores(qi.bfloat16(), ki.bfloat16(), w.bfloat16(), starts, 20, 161, 0)
    want = K._span(starts, 20, 161, 0)
    ref = A.index_scores(qi[None, 20:], ki[None], w[None, 20:])[0]
    assert torch.equal(torch.isfinite(got), want)
    torch.testing.assert_close(got[want], ref[want], atol=5e-2, rtol=5e-2)
    keys = K._triton_scores(qi.bfloat16(), ki.bfloat16(), w.bfloat16(), starts, 20, 161, 0, True)
    assert torch.equal(keys, A.rank_key(got))  # the selection's keys, written by the kernel
    # the selection scored and selected in one kernel (kernels.SELECT_FUSED) picks the
    # keys of the score kernel's rank keys: the same tile sums; on integer scores (many
    # ties at the k-th key) too
    from distill.dsa import select_kernel

    half = [x.bfloat16() for x in (qi, ki, w)]
    cases = (("random", half), ("ties", [x.round().abs() for x in half]))
    for (case, ins), top_k, hist in itertools.product(cases, (16, 64), (False, True)):
        plain = K.index_topk(*ins, starts, top_k, 62)
        K.SELECT_FUSED, select_kernel.SELECT_HIST = True, hist
        try:
            fused = K.index_topk(*ins, starts, top_k, 62)
        finally:
            K.SELECT_FUSED, select_kernel.SELECT_HIST = False, False
        assert torch.equal(fused.sort(-1).values, plain.sort(-1).values), (case, top_k, hist)
    # and one program a row over the fp32 scores (kernels.SELECT_ROWS), rows of 32 keys a
    # step and of the default's, chunks of the default's rows and of 7, a scratch of the
    # default's keys (every row here copied after its first pass) and of 16
    launch = select_kernel.ROWS_SELECT_LAUNCH
    for (case, ins), top_k, bs, chunk, cap in itertools.product(
        cases, (16, 64), (32, launch["BS"]), (None, 7), (launch["CAP"], 16)
    ):
        K.SELECT_ROWS = False
        plain = K.index_topk(*ins, starts, top_k, 62)
        K.SELECT_ROWS, K.SELECT_CHUNK = True, chunk
        select_kernel.ROWS_SELECT_LAUNCH = dict(launch, BS=bs, CAP=cap)
        try:
            rows = K.index_topk(*ins, starts, top_k, 62)
        finally:
            K.SELECT_ROWS, K.SELECT_CHUNK = True, None
            select_kernel.ROWS_SELECT_LAUNCH = launch
        assert torch.equal(rows.sort(-1).values, plain.sort(-1).values), (case, top_k, bs, cap)
    idx = K.index_topk(qi, ki, w, starts, 16, 62)
    lse = _sparse_attention_matches(q, k, v, idx)
    from distill.dsa import kl_kernel
    from distill.dsa.kl_kernel import sparse_kl_sum_triton, sparse_kl_triton

    # seeded, several draws: on an H100 (2026-12-06) one of three runs with an unseeded
    # draw failed this test (which assertion was not captured) and two passed; the main
    # logits from fp32 copies (the default) and from bf16 (kl_kernel.MAIN_DOT_FP32 off)
    default = kl_kernel.MAIN_DOT_FP32
    try:
        for seed, fp32 in itertools.product(range(3), (True, False)):
            kl_kernel.MAIN_DOT_FP32 = fp32
            g = torch.Generator().manual_seed(seed)
            qs = torch.randn(161, 3, 8, generator=g).cuda().requires_grad_()  # both signs
            ins = (qs, ki.requires_grad_(), w.requires_grad_())
            got = sparse_kl_triton(q.bfloat16(), k.bfloat16(), *ins, idx, 0.3).sum()
            want = K._sparse_kl_chunk(q, k, *ins, idx, 0.3)
            case = f"seed {seed}, fp32 logits {fp32}"
            torch.testing.assert_close(
                got, want, atol=5e-2, rtol=2e-2, msg=lambda m, c=case: f"{m}\n(KL, {c})"
            )
            mine = torch.autograd.grad(got, ins, retain_graph=True)  # again below
            grads = zip(mine, torch.autograd.grad(want, ins), strict=True)
            for name, (a, b) in zip(("qs", "ki", "w"), grads, strict=True):
                torch.testing.assert_close(
                    a, b, atol=5e-2, rtol=5e-2, msg=lambda m, n=name, c=case: f"{m}\n(d{n}, {c})"
                )
            # the heads' log-sum-exps read from the attention's forward (kernels.SHARE_LSE)
            shared = sparse_kl_triton(q.bfloat16(), k.bfloat16(), *ins, idx, 0.3, lse=lse)
            torch.testing.assert_close(shared.sum(), got, atol=5e-3, rtol=5e-3)
            # the sum with its gradient from the forward walk (kl_kernel.GRAD_IN_FORWARD)
            total = sparse_kl_sum_triton(q.bfloat16(), k.bfloat16(), *ins, idx, 0.3, lse=lse)
            torch.testing.assert_close(total, got, atol=5e-3, rtol=5e-3)
            sums = torch.autograd.grad(total * 2.0, ins), torch.autograd.grad(got * 2.0, ins)
            grads = zip(*sums, strict=True)
            for name, (a, b) in zip(("qs", "ki", "w"), grads, strict=True):
                torch.testing.assert_close(
                    a,
                    b,
                    atol=5e-3,
                    rtol=5e-3,
                    msg=lambda m, n=name, c=case: f"{m}\n(sum d{n}, {c})",
                )
            # the KL from the p the attention's forward writes (kernels.P_IN_FORWARD) and
            # the index keys in bf16, against torch's in fp32 on the same rounded keys. The
            # kernel's index logits are a tf32 dot: where one sits at 0 its ReLU can flip
            # against fp32, which moves that dqs entry by w·di·ki (on the H100 at 08:02 UTC,
            # 1 of 3,864 entries off by 0.067; with the reference on fp32 keys, 4 by up to
            # 0.33), so up to 0.2% of dqs may miss; dki, dw and the KL must all match
            _, _, p_fwd = K._SparseAttention.apply(q.bfloat16(), k.bfloat16(),
                                                   v.bfloat16(), idx, 0.3, True)  # fmt: skip
            kib = ki.bfloat16()
            from_p = kl_kernel.index_kl_sum_triton(qs, kib, w, idx, p_fwd)
            want = K._sparse_kl_chunk(q, k, qs, kib.float(), w, idx, 0.3)
            torch.testing.assert_close(from_p, want, atol=5e-2, rtol=2e-2)
            grads = zip(torch.autograd.grad(from_p * 2.0, ins),
                        torch.autograd.grad(want * 2.0, ins), strict=True)  # fmt: skip
            for name, (a, b) in zip(("qs", "ki", "w"), grads, strict=True):
                if name == "qs":
                    off = ~torch.isclose(a, b, atol=5e-2, rtol=5e-2)
                    assert off.sum() <= 0.002 * off.numel(), (case, int(off.sum()))
                    a, b = a[~off], b[~off]
                torch.testing.assert_close(
                    a, b, atol=5e-2, rtol=5e-2,
                    msg=lambda m, n=name, c=case: f"{m}\n(from p: d{n}, {c})",
                )  # fmt: skip
        # the row selection's log-sum-exps of the scores it selected
        # (kernels.LSE_FROM_SELECTION): torch's over the same keys, and the index KL
        # divided by them equals the one that walks the index keys for its own
        sel, lsei = K.index_topk(*half, starts, 16, 62, with_lse=True)
        assert torch.equal(sel.sort(-1).values, K.index_topk(*half, starts, 16, 62).sort(-1).values)
        full = A.index_scores(*(x.float()[None] for x in half))[0]
        picked = full.gather(1, sel.long().clamp(min=0)).masked_fill(sel < 0, float("-inf"))
        torch.testing.assert_close(lsei, picked.logsumexp(1), atol=1e-4, rtol=1e-5)
        ins = (half[0].float().requires_grad_(), half[1].clone().requires_grad_(),
               half[2].float().requires_grad_())  # fmt: skip
        _, _, p_sel = K._SparseAttention.apply(q.bfloat16(), k.bfloat16(), v.bfloat16(), sel,
                                               0.3, True)  # fmt: skip
        given = kl_kernel.index_kl_sum_triton(*ins, sel, p_sel, lsei)
        walked = kl_kernel.index_kl_sum_triton(*ins, sel, p_sel)
        torch.testing.assert_close(given, walked, atol=1e-4, rtol=1e-4)
        grads = zip(torch.autograd.grad(given, ins), torch.autograd.grad(walked, ins), strict=True)
        for name, (a, b) in zip(("qi", "ki", "w"), grads, strict=True):
            torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=1e-3,
                                       msg=lambda m, n=name: f"{m}\n(lse given: d{n})")  # fmt: skip
        # 64 heads over one KV head: one slot of 64 rows, the 2D dot (Hopper's warpgroup MMA)
        gen = torch.Generator().manual_seed(7)
        qm = torch.randn(161, 64, 16, generator=gen).cuda().bfloat16()
        km = torch.randn(161, 1, 16, generator=gen).cuda().bfloat16()
        want = K._sparse_kl_chunk(qm.float(), km.float(), qs, ki, w, idx, 0.3)
        for fp32 in (True, False):
            kl_kernel.MAIN_DOT_FP32 = fp32
            got = sparse_kl_triton(qm, km, qs, ki, w, idx, 0.3).sum()
            torch.testing.assert_close(
                got, want, atol=5e-2, rtol=2e-2, msg=lambda m, f=fp32: f"{m}\n(MQA, fp32 {f})"
            )
        # the sparse attention at that shape: its own launch (kernels.SPARSE_LAUNCH_WIDE)
        assert K.sparse_launch(64) is K.SPARSE_LAUNCH_WIDE
        vm = torch.randn(161, 1, 16, generator=gen).cuda().bfloat16()
        _sparse_attention_matches(qm.float(), km.float(), vm.float(), idx)
    finally:
        kl_kernel.MAIN_DOT_FP32 = default
    # the whole path in bf16, the fused KL walking the keys itself or reading the
    # attention's log-sum-exps, and the KL from the attention's p (the default), every
    # key selected (no near-tie for bf16 to flip) against fp32 torch; at 64 heads over
    # one KV head too (p stored, not added)
    share, p_fwd, walk = K.SHARE_LSE, K.P_IN_FORWARD, K.P_WALK
    wide = (qm.float(), km.float(), vm.float())
    modes = (
        (False, False, walk),
        (True, False, walk),
        (True, True, {"BNP": 32}),
        (True, True, walk),
    )
    try:
        for (K.SHARE_LSE, K.P_IN_FORWARD, K.P_WALK), main in itertools.product(
            modes, ((q, k, v), wide)
        ):
            ref, kl_ref = A.dsa_varlen_reference(*main, qi, ki, w, cu, 161, 0.3, loss=True)
            half = [x.bfloat16() for x in (*main, qi, ki, w)]
            got, kl_got = K.dsa_varlen(*half, cu, 161, 0.3, loss=True)
            case = f"{K.SHARE_LSE}, {K.P_IN_FORWARD}, {K.P_WALK}, {main[0].shape[1]} heads"
            torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2,
                                       msg=lambda m, c=case: f"{m}\n({c})")  # fmt: skip
            torch.testing.assert_close(kl_got.float(), kl_ref, atol=5e-2, rtol=2e-2,
                                       msg=lambda m, c=case: f"{m}\n(KL, {c})")  # fmt: skip
    finally:
        K.SHARE_LSE, K.P_IN_FORWARD, K.P_WALK = share, p_fwd, walk


# --------------------------------------------------------------------------- training


@pytest.mark.skipif(not torch.cuda.is_available() or not K.HAVE_TRITON, reason="needs CUDA")
def test_decode_kernels_match_torch_on_gpu():
    """The decode step's kernels (``decode_kernel``) against the torch step in bf16 at a
    Qwen2-like group (7 query heads a KV head of 64, index heads 4 of 64), 5,000 cached
    keys in several chunks, some invalid: the scores to bf16 rounding, the selection the
    same keys as ``topk_indices`` on the same scores (ties included: rounded scores), the
    attention to bf16 tolerance against SDPA over the gathered rows, from bf16 caches and
    from int8 ones with their scales (over the dequantized rows)."""
    import torch.nn.functional as F

    from distill.dsa import decode_kernel as D

    g = torch.Generator(device="cuda").manual_seed(0)
    b, hkv, rep, d, s, hi, di, top = 4, 2, 7, 64, 5000, 4, 64, 256
    dev, bf = "cuda", torch.bfloat16
    qi, ki, w = (torch.randn(*sh, generator=g, device=dev).to(bf)
                 for sh in ((b, 1, hi, di), (b, s, di), (b, 1, hi)))  # fmt: skip
    torch.testing.assert_close(D.decode_scores(qi, ki, w), A.index_scores(qi, ki, w),
                               atol=0.05, rtol=0.02)  # fmt: skip
    valid = torch.rand(b, s, generator=g, device=dev) > 0.1
    valid[3, 100:] = False  # fewer valid keys than top-k
    for sc in (A.index_scores(qi, ki, w), A.index_scores(qi, ki, w).round()):
        got_i, got_ok = D.decode_topk(sc, valid, top)
        ref_i, ref_ok = A.topk_indices(sc.masked_fill(~valid[:, None], float("-inf")),
                                       valid[:, None], top)  # fmt: skip
        for r in range(b):
            assert set(got_i[r, 0][got_ok[r, 0]].tolist()) == set(
                ref_i[r, 0][ref_ok[r, 0]].tolist()
            )
    q = torch.randn(b, hkv * rep, 1, d, generator=g, device=dev).to(bf)
    k, v = torch.randn(2, b, hkv, s, d, generator=g, device=dev).to(bf)
    at = got_i[:, 0, None, :, None].expand(b, hkv, got_i.shape[-1], d)
    want = F.scaled_dot_product_attention(q.reshape(b, hkv, rep, d), k.gather(2, at),
                                          v.gather(2, at), attn_mask=got_ok[:, None],
                                          scale=0.125).reshape(b, hkv * rep, 1, d)  # fmt: skip
    got = D.decode_attention(q, k, v, got_i, got_ok, 0.125)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    # int8 caches (llama_decode.KV_INT8): against SDPA over the dequantized gathered rows
    from distill.backends.llama_decode import dequantize_rows, quantize_int8

    (k8, ks), (v8, vs) = quantize_int8(k), quantize_int8(v)
    kb, vb = dequantize_rows(k8, ks, bf), dequantize_rows(v8, vs, bf)
    want = F.scaled_dot_product_attention(q.reshape(b, hkv, rep, d), kb.gather(2, at),
                                          vb.gather(2, at), attn_mask=got_ok[:, None],
                                          scale=0.125).reshape(b, hkv * rep, 1, d)  # fmt: skip
    got = D.decode_attention(q, k8, v8, got_i, got_ok, 0.125, torch.stack((ks, vs), -1))
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def _objective(model):
    from distill.dsa.train import DSAObjective

    return DSAObjective(model.train(), max_seqlen=64)


def _batch(n_rows=3, seed=0):
    """A flat micro-batch as the trainer collates it (3 traces, loss on the back half)."""
    g = torch.Generator().manual_seed(seed)
    lens = [12, 20, 9][:n_rows]
    ids = torch.randint(0, 61, (1, sum(lens)), generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    loss_pos = torch.cat(
        [torch.arange(s + n // 2, s + n - 1) for s, n in zip(cu[:-1], lens, strict=True)]
    )
    n = len(loss_pos)
    return dict(
        input_ids=ids, position_ids=pos, loss_pos=loss_pos, targets=ids[0, loss_pos + 1],
        weights=torch.ones(n), domain=torch.zeros(n, dtype=torch.long), n_domains=1,
        norm=torch.tensor(float(n)), cu_seqlens=cu,
    )  # fmt: skip


def _split(model):
    indexer = {id(p) for p in model.indexer_parameters()}
    main = [p for p in model.parameters() if id(p) not in indexer]
    return main, [p for p in model.parameters() if id(p) in indexer]


def test_warmup_trains_the_indexer_alone():
    """Warm-up: dense attention, only the indexer's parameters are trainable and get a
    gradient; the loss is the KL, which a few steps lower; the saved config no longer
    asks for a warm-up."""
    from distill.dsa.model import DSAForCausalLM

    dense = _llama(dtype=torch.float32)
    with torch.no_grad():  # peaked attention: a target the fresh indexer is far from
        for layer in dense.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    model = _dsa(dense, top_k=3, warmup=True)
    obj = _objective(model)
    main, index = _split(model)
    assert not any(p.requires_grad for p in main) and all(p.requires_grad for p in index)
    assert not model.config.index_warmup
    batch = _batch()
    with torch.no_grad():  # attention is dense: the dense model's hidden states, per trace
        ids, cu = batch["input_ids"], batch["cu_seqlens"].tolist()
        h = model.model(input_ids=ids, position_ids=batch["position_ids"]).last_hidden_state
        hd = [
            dense.model(input_ids=ids[:, a:b]).last_hidden_state
            for a, b in zip(cu[:-1], cu[1:], strict=True)
        ]
    torch.testing.assert_close(h, torch.cat(hd, 1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        total, *_ = obj(**batch)
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert all(p.grad is None for p in main)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in index)
    assert losses[-1] < 0.7 * losses[0], losses
    assert isinstance(model, DSAForCausalLM)


def test_sparse_phase_keeps_the_two_losses_apart():
    """Sparse phase: the indexer's KL reaches the indexer alone (its input is detached);
    the CE reaches the main model alone (top-k has no gradient)."""
    model = _dsa(_llama(dtype=torch.float32), top_k=3)
    obj = _objective(model)
    main, index = _split(model)
    assert all(p.requires_grad for p in model.parameters())
    batch = _batch()
    total, _, _ = obj(**batch)
    kl = sum(a.index_loss for a in model.attention_layers())
    assert kl > 0
    kl.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in main)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in index)
    model.zero_grad(set_to_none=True)
    (total - kl / (batch["norm"] * len(model.attention_layers()))).backward()  # the CE alone
    assert all(p.grad is None or not p.grad.any() for p in index)
    assert sum(p.grad.abs().sum() for p in main if p.grad is not None) > 0


def test_dense_arch_carries_every_dense_field_of_the_schema():
    """The dense phase's arch: every ModelArch field but attention and index_* as the
    recipe set it (taken from the schema, so a field added later is carried too), those
    at their defaults: a changed indexer setting leaves the dense student's fingerprint."""
    from distill.dsa.train import dense_arch
    from distill.recipe.schema import ModelArch

    dense_fields = dict(
        hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2, intermediate_size=80,
        max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.05,
    )  # fmt: skip
    dsa = [
        ModelArch(**dense_fields, attention="dsa", index_heads=2, index_head_dim=8, index_top_k=16),
        ModelArch(**dense_fields, attention="dsa", index_top_k=64),
    ]
    default = ModelArch()
    assert all(getattr(default, f) != v for f, v in dense_fields.items())
    for arch in dsa:
        got = dense_arch(arch)
        assert got.attention == "dense"
        for f in ModelArch.model_fields:
            want = getattr(default if f == "attention" or f.startswith("index_") else arch, f)
            assert getattr(got, f) == want, f
        # every other field is passed on explicitly, whatever the schema holds
        assert got.model_fields_set == {
            f for f in ModelArch.model_fields if f != "attention" and not f.startswith("index_")
        }
    assert dense_arch(dsa[0]) == dense_arch(dsa[1])


def _convert_on_rank(root: str) -> str:
    """One rank of the test below: convert root/dense, leaving a file for each rank that
    hashed the dense weights or built the DSA model, and one with the path it got."""
    import distill.dsa.model as M
    import distill.dsa.train as T
    from distill.recipe.schema import ModelArch

    rank, where = os.environ["RANK"], Path(root)

    def noted(what, fn):
        def call(*args, **kwargs):
            (where / f"{what}-{rank}").touch()
            return fn(*args, **kwargs)

        return call

    T._digest, M.from_dense = noted("hashed", T._digest), noted("built", M.from_dense)
    arch = ModelArch(index_heads=2, index_head_dim=8, index_top_k=4)
    out = T.convert(where / "dense", where / "dsa", arch, seed=0, warmup=True)
    (where / f"got-{rank}").write_text(str(out))
    return str(out)


def test_conversion_hashes_and_builds_on_the_main_process_alone(tmp_path, monkeypatch):
    """Two ranks convert one dense model: rank 0 alone hashes its files and builds and
    saves the DSA model; rank 1 gets the same path; one directory, no leftovers."""
    from distill import launch

    # two CPU ranks (what launch.spawn is for): on a one-GPU host both would take cuda:0,
    # which NCCL refuses ("Duplicate GPU detected")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    _llama(dtype=torch.float32).save_pretrained(tmp_path / "dense")
    got = launch.spawn(_convert_on_rank, str(tmp_path), procs=2, what="test")
    marks = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert marks == ["built-0", "got-0", "got-1", "hashed-0"]
    assert {(tmp_path / f"got-{r}").read_text() for r in (0, 1)} == {got}
    assert [p.name for p in (tmp_path / "dsa").iterdir()] == [Path(got).name]
    assert (Path(got) / "model.safetensors").exists()
    assert json.loads((Path(got) / "config.json").read_text())["index_warmup"]


# --------------------------------------------------------------------------- the model


def test_save_and_load_through_auto_model_same_logits(tmp_path):
    """save_pretrained -> AutoModelForCausalLM (registered model type, no remote code)
    and distill.models.load_model -> the same fp64 logits, sparse (top_k 4)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.models import load_model

    model = _dsa(_llama(), top_k=4)
    model.save_pretrained(tmp_path)
    register()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "distill_dsa"
    ids = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for loaded in (
            AutoModelForCausalLM.from_pretrained(tmp_path, dtype=F64),
            load_model(tmp_path, dtype=F64),
        ):
            assert type(loaded) is type(model) and loaded.config.index_top_k == 4
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, want)


def test_tokenizer_of_a_dsa_student_loads_without_a_config_warning(tmp_path):
    """A fresh process loading a DSA student's tokenizer first (the rl and eval stages do)
    registers the model type before AutoTokenizer reads config.json: no fallback to a base
    config ("a model of type `distill_dsa` to instantiate a model of type ``")."""
    _dsa(_llama(dtype=torch.float32), top_k=4).save_pretrained(tmp_path)
    make_tokenizer(tmp_path)
    code = (  # warnings on, as the stages' workers have them
        "import sys, transformers; transformers.logging.set_verbosity_warning(); "
        "from distill.models import load_tokenizer; load_tokenizer(sys.argv[1])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distill_dsa" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cached_decoding_matches_the_full_forward(kind):
    """Prefill then one token at a time through a DynamicCache or a StaticCache (the
    indexer's keys cached beside K/V; the static one longer than the sequence): the
    logits of one forward over the whole sequence."""
    from transformers import DynamicCache, StaticCache

    from distill.backends.hf import cache_kwarg

    model = _dsa(_llama(), top_k=4)
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(4))
    if kind == "static":
        cache = StaticCache(config=model.config, max_cache_len=40)
    else:
        cache = DynamicCache(config=model.config)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        kw = {cache_kwarg(model): cache, "use_cache": True}  # transformers 5.17 / later names
        parts = [model(input_ids=ids[:, :10], **kw).logits]
        for i in range(10, 24):
            parts.append(model(input_ids=ids[:, i : i + 1], **kw).logits)
    torch.testing.assert_close(torch.cat(parts, 1), want)


def test_layer_type_is_the_installed_transformers_name(monkeypatch):
    """transformers 5.17 calls the indexer-keeping cache layer deepseek_sparse_attention,
    later versions indexed_attention: a config, new or saved under either name, takes the
    installed version's name, so its caches keep indexer keys."""
    from transformers import cache_utils

    from distill.dsa.config import INDEXED_LAYER_NAMES, DSAConfig, indexed_layer_type
    from distill.errors import UserError

    shape = dict(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    installed = cache_utils.DYNAMIC_LAYER_TYPE_MAPPING
    for saved in (None, ["deepseek_sparse_attention"] * 2, ["indexed_attention"] * 2):
        types = DSAConfig(**shape, layer_types=saved).layer_types
        assert len(types) == 2 and all(
            installed[t].__name__ == "DynamicIndexedLayer" for t in types
        )
    # 5.17's mapping (later versions' configs rename the old name themselves, so only the
    # choice of name can be replayed here)
    old = {k: v for k, v in installed.items() if k not in INDEXED_LAYER_NAMES}
    old["deepseek_sparse_attention"] = installed[indexed_layer_type()]
    monkeypatch.setattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", old)
    assert indexed_layer_type() == "deepseek_sparse_attention"
    monkeypatch.setattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", {})
    with pytest.raises(UserError, match="no cache layer for indexer keys"):
        DSAConfig(**shape)


@pytest.mark.integration
def test_train_stage_converts_and_eval_serve_rl_run_unchanged(tmp_path, monkeypatch):
    """`distill train` with student.arch.attention: dsa (dense, warm-up, sparse phases),
    then the student through eval's backend (greedy = a manual greedy loop), serve's app
    (one chat completion) and the RL policy's forward and backward."""
    from fastapi.testclient import TestClient

    import distill.dsa.train as T
    import distill.train.loop as loop
    from distill.backends import Sampling
    from distill.backends.hf import HFBackend
    from distill.models import load_model
    from distill.recipe.schema import validate
    from distill.serve import create_app

    make_tokenizer(tmp_path / "tok")
    rng = random.Random(0)
    write_shards(tmp_path / "clean" / "math", "math", [math_trace(i, rng) for i in range(40)])
    arch = ARCH.model_dump() | {"attention": "dsa", "index_top_k": 8, "index_head_dim": 8}
    recipe = validate(
        {
            "name": "dsa",
            "output_dir": str(tmp_path),
            "tokenizer": {"kind": "pretrained", "path": str(tmp_path / "tok")},
            "domains": {"math": {}},
            "teachers": {"math": {}},
            "student": {"arch": arch},
            "train": {
                "max_steps": 4, "batch_tokens": 512, "micro_batch_tokens": 256,
                "max_length": 128, "precision": "fp32", "warmup_steps": 1,
                # a plateau test of one step a side that any second step passes (a KL
                # not 99% under the first): the warm-up ends there, short of its 3 steps
                "dsa": {"warmup_steps": 3, "sparse_steps": 3, "warmup_plateau": 0.99},
            },
        }
    )  # fmt: skip
    monkeypatch.setattr(loop, "DEFER", False)
    monkeypatch.setattr(T, "PLATEAU_WINDOW", 1)
    out = loop.run(recipe)
    assert out["complete"] and set(out["dsa"]) == {"dense", "warmup", "sparse"}
    assert out["dsa"]["warmup"]["steps"] == 2 and out["dsa"]["sparse"]["steps"] == 3
    student = tmp_path / "student"
    phases = tmp_path / "runs" / "student" / "dsa"
    assert (phases / "dense" / "model" / "model.safetensors").exists()
    assert len(list(phases.glob("warmup-*/model/model.safetensors"))) == 1
    assert not (student / "dense").exists()  # the model directory holds the model alone
    # eval's backend: greedy decoding through the cache equals greedy over full forwards
    backend = HFBackend(student, batch_size=2)
    assert backend.model.config.model_type == "distill_dsa"
    msgs = [[{"role": "user", "content": f"Problem {i}: what is 3 + {i}?"}] for i in range(2)]
    greedy = Sampling(temperature=0.0, max_new_tokens=12)
    got = backend.complete(msgs, [None, None], greedy)
    dev = backend.model.device  # cuda on a GPU host
    for conv, (c,) in zip(msgs, got, strict=True):
        ids = backend.render(conv)
        with torch.no_grad():
            for _ in range(c.completion_tokens):
                ids.append(
                    int(backend.model(torch.tensor([ids], device=dev)).logits[0, -1].argmax())
                )
        assert backend.tokenizer.decode(ids[-c.completion_tokens :]) == c.text
    # serve: one chat completion (the context manager runs the app's batcher)
    with TestClient(create_app(student, batch_size=2)) as client:
        body = {"messages": msgs[0], "max_tokens": 8, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] is not None
    # the RL policy: get_decoder() over right-padded rows, then the output embeddings
    model = load_model(student).train()
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids)
    att[1, 15:] = 0
    hidden = model.get_decoder()(input_ids=ids, attention_mask=att).last_hidden_state
    logits = model.get_output_embeddings()(hidden)
    logits[att.bool()].logsumexp(-1).sum().backward()
    assert model.lm_head.weight.grad is not None and torch.isfinite(logits).all()


def test_indexer_rope_uses_the_model_frequencies():
    """The indexer's RoPE: the score of a query and a key depends only on their distance
    (a shift of both positions leaves it unchanged), and does depend on it."""
    model = _dsa(_llama(), top_k=4)
    layer = model.attention_layers()[0]
    x = torch.randn(1, 2, 32, dtype=F64)
    scores = []
    for shift in (0, 17):
        pos = torch.tensor([[3 + shift, 10 + shift]])
        cos, sin = model.model.rotary_emb(x, pos)
        qi, ki, w = layer.indexer(x, cos, sin)
        scores.append(A.index_scores(qi, ki, w)[0, 1, 0])
    torch.testing.assert_close(scores[0], scores[1])
    cos, sin = model.model.rotary_emb(x, torch.tensor([[3, 5]]))
    qi, ki, w = layer.indexer(x, cos, sin)
    assert (A.index_scores(qi, ki, w)[0, 1, 0] - scores[0]).abs() > 1e-6  # distance 2, not 7
    assert layer.indexer.rope_dim == 4  # 2 * min(8 // 4, 8 // 2)


def test_compiled_layers_compile_no_graph_per_packing():
    """train.torch_compile compiles each decoder layer; the DSA attention inside runs eager
    (as the dense varlen attention does), so a new packing of the flat row, with its own
    trace boundaries and longest trace, compiles no new graph after the first two batches
    (the second marks the row's length dynamic) and gives the eager model's logits."""
    from torch._dynamo.utils import counters

    from distill.train.setup import compile_decoder_layers

    eager = _dsa(_llama(dtype=torch.float32), top_k=5).train()
    model = _dsa(_llama(dtype=torch.float32), top_k=5).train()
    torch._dynamo.reset()
    counters.clear()
    compile_decoder_layers(model)
    g = torch.Generator().manual_seed(0)
    graphs = []
    for lens in ([9, 14, 9], [20, 6, 6], [3, 3, 26], [10, 10, 12], [7, 7, 18]):
        row = torch.randint(0, 61, (1, sum(lens)), generator=g)
        pos = torch.cat([torch.arange(n) for n in lens])[None]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        kw = dict(input_ids=row, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=max(lens), max_length_k=max(lens))  # fmt: skip
        out = model(**kw).logits
        out.sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
        with torch.no_grad():
            torch.testing.assert_close(out.detach(), eager(**kw).logits, rtol=1e-4, atol=1e-5)
    assert graphs[1] > 0 and graphs[-1] == graphs[1], graphs


def test_warmup_plateau_waits_for_two_windows_then_ends_when_the_kl_stops_falling():
    from types import SimpleNamespace

    from distill.dsa.train import plateau

    until = plateau(0.02, window=3)
    falling = [2.0, 1.9, 1.8, 1.5, 1.4, 1.3]  # the last 3 are 20% under the 3 before
    assert until(SimpleNamespace(losses=falling[:5])) is None  # fewer than two windows
    assert until(SimpleNamespace(losses=falling)) is None
    flat = [1.0, 1.01, 0.99, 0.995, 0.99, 0.985]  # 1% under
    assert until(SimpleNamespace(losses=flat)) == "plateau"
    assert until(SimpleNamespace(losses=[1.0, 1.0, 1.0, 1.2, 1.2, 1.2])) == "plateau"  # rising


def test_all_keys_note_only_where_top_k_covers_every_trace():
    from distill.dsa.train import all_keys_note
    from distill.recipe.schema import ModelArch, TrainConfig

    cfg = TrainConfig(max_length=128)
    arch = ModelArch(**ARCH.model_dump() | {"attention": "dsa", "index_top_k": 127})
    assert all_keys_note(arch, cfg) is None  # a 128-token trace's last query skips a key
    for top_k in (128, 2048):
        note = all_keys_note(arch.model_copy(update={"index_top_k": top_k}), cfg)
        assert f"index_top_k {top_k} >= train.max_length 128" in note

"""The flat path: one flattened row per micro-batch with varlen attention (on CPU the
product's per-segment SDPA, checked against trainkit's reference; the CUDA kernel in
test_gpu_train.py), and the fused LM head whose gradients are taken in forward."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_artifacts import (
    ARCH,
    domain_data,
    make_tokenizer,
    math_trace,
    per_trace_loss_sum,
    segment_sdpa,
    small_cfg,
    tensors,
    tiny_model,
    tool_trace,
    write_shards,
)

import distill.models
import distill.train.loss
from distill.models import VARLEN, enable_checkpointing, use_varlen_attention
from distill.train.data import collate
from distill.train.loss import LinearCE, Objective, ce_and_grad

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "bounds",
    [
        [0, 37, 38, 100, 161],  # one length group padded (37 beside 61-62), one token alone
        [0, 5, 5, 9, 40, 41, 100, 122, 150, 151, 153, 161],  # many groups, an empty segment
    ],
)
def test_cpu_varlen_kernel_matches_the_reference(bounds):
    """The product's CPU kernel (causal SDPA per segment, similar lengths batched with
    right padding) against trainkit's reference, with grouped kv heads: outputs and
    gradients."""
    torch.manual_seed(0)
    cu = torch.tensor(bounds, dtype=torch.int32)
    q, k, v = (torch.randn(161, h, 16, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    got = distill.models._varlen_kernel(q, k, v, cu, 64, 0.3)
    g_got = torch.autograd.grad((got * got.detach().cos()).sum(), (q, k, v))
    want = segment_sdpa(q, k, v, cu, 64, 0.3)
    g_want = torch.autograd.grad((want * want.detach().cos()).sum(), (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    rng = random.Random(0)
    dd = domain_data(tok, "math", [math_trace(i, rng) for i in range(5)] + [tool_trace()])
    rows = [
        [("math", 0), ("math", 1), ("math", 5)],
        [("math", 2), ("math", 3), ("math", 4), ("math", 6)],
    ]
    return tok, dd, rows


def test_flat_collate_is_one_row_with_its_segments(setup):
    tok, dd, rows = setup
    lens = [int(dd.offsets[i + 1] - dd.offsets[i]) for i in range(7)]
    b = collate(rows, {"math": dd}, {"math": 0}, {}, tok.pad_token_id, flat=True)
    order = [i for r in rows for _, i in r]
    assert b["input_ids"].shape == (1, sum(lens))  # no padding at all without a width
    assert b["cu_seqlens"].dtype == np.int32
    assert b["cu_seqlens"].tolist() == np.cumsum([0] + [lens[i] for i in order]).tolist()
    starts = b["cu_seqlens"][:-1]
    assert (b["position_ids"][0, starts] == 0).all() and (b["position_ids"] == 0).sum() == 7
    rowwise = collate(rows, {"math": dd}, {"math": 0}, {}, tok.pad_token_id)
    assert np.array_equal(b["targets"], rowwise["targets"])  # same tokens, same order
    flat_ids = b["input_ids"].reshape(-1)
    assert np.array_equal(flat_ids[b["loss_pos"] + 1], b["targets"])  # logits at j-1 predict j
    # a static width: the tail padding is cut into segments no longer than max_segment
    w = collate(
        rows, {"math": dd}, {"math": 0}, {}, 0, width=sum(lens) + 50, flat=True, max_segment=16
    )
    seg = np.diff(w["cu_seqlens"])
    assert w["cu_seqlens"][-1] == sum(lens) + 50 and seg[7:].tolist() == [16, 16, 16, 2]
    assert w["position_ids"][0, -2:].tolist() == [0, 1]


@pytest.mark.parametrize("attn", ["sdpa", VARLEN])
def test_flat_row_loss_equals_sum_of_per_trace_losses(setup, attn):
    tok, dd, rows = setup
    model = tiny_model(tok).eval()
    want = per_trace_loss_sum(model, dd, range(7))
    if attn == VARLEN:
        use_varlen_attention(model)
    batch = tensors(collate(rows, {"math": dd}, {"math": 0}, {}, tok.pad_token_id, flat=True))
    with torch.no_grad():
        got, _, _ = Objective(model)(n_domains=1, norm=torch.tensor(1.0), **batch)
    assert abs(got.item() - want) < 1e-5 * max(1.0, want)
    if attn == VARLEN:  # the boundaries are what keeps traces apart: one segment leaks
        one = dict(batch, cu_seqlens=batch["cu_seqlens"][[0, -1]])
        with torch.no_grad():
            leaky, _, _ = Objective(model)(n_domains=1, norm=torch.tensor(1.0), **one)
        assert abs(leaky.item() - want) > 1e-3


def test_flat_varlen_gradients_equal_padded_rows(setup):
    tok, dd, rows = setup
    grads = {}
    for name in ("rows", "flat"):
        model = tiny_model(tok)
        if name == "flat":
            use_varlen_attention(model)
        b = collate(rows, {"math": dd}, {"math": 0}, {}, tok.pad_token_id, flat=name == "flat")
        loss, _, _ = Objective(model)(n_domains=1, norm=torch.tensor(100.0), **tensors(b))
        loss.backward()
        grads[name] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    assert abs(grads["rows"][0] - grads["flat"][0]) < 1e-6 * grads["rows"][0]
    for n, g in grads["rows"][1].items():
        torch.testing.assert_close(grads["flat"][1][n], g, rtol=0, atol=1e-6)


def test_varlen_attention_without_boundaries_is_an_error(setup):
    tok, dd, rows = setup
    model = tiny_model(tok)
    use_varlen_attention(model)
    b = tensors(collate(rows, {"math": dd}, {"math": 0}, {}, tok.pad_token_id))
    with pytest.raises(RuntimeError, match="cu_seq_lens_q"):
        Objective(model)(n_domains=1, norm=torch.tensor(1.0), **b)


def reference_head(hidden, weight, targets, scale):
    logits = hidden.double() @ weight.double().t()
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (ce * scale.double()).sum(), ce


@pytest.mark.parametrize("ce_fn", ["ce_and_grad", "ce_and_grad_pointwise"])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_fused_head_matches_autograd(monkeypatch, n, ce_fn):
    ce_and_grad = getattr(distill.train.loss, ce_fn)  # the eager form and the one compiled on GPU
    monkeypatch.setattr(distill.train.loss, "FUSED_CHUNK", 16)  # 37 tokens: three chunks
    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, 24, generator=g, requires_grad=True)
    weight = (torch.randn(50, 24, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, 50, (n,), generator=g)
    scale = torch.rand(n, generator=g)
    total, ce = LinearCE.apply(hidden, weight, targets, scale, ce_and_grad)
    (2.5 * total).backward()  # the incoming gradient scales both
    h2, w2 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want, want_ce = reference_head(h2, w2, targets, scale)
    (2.5 * want).backward()
    torch.testing.assert_close(total.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce.double(), want_ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w2.grad, rtol=1e-5, atol=1e-6)


def test_fused_head_under_bf16_autocast_keeps_fp32_loss_and_grads():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 32, generator=g, requires_grad=True)
    weight = (torch.randn(64, 32, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, 64, (40,), generator=g)
    scale = torch.full((40,), 1 / 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, ce = LinearCE.apply(hidden, weight, targets, scale, ce_and_grad)
    total.backward()
    assert total.dtype == ce.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    h2, w2 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want, _ = reference_head(h2, w2, targets, scale)
    want.backward()
    assert abs(total.item() - want.item()) < 2e-2 * want.item()  # bf16 matmuls
    for got, ref in ((hidden.grad, h2.grad), (weight.grad, w2.grad)):
        assert (got.double() - ref).norm() / ref.norm() < 2e-2


def test_frozen_head_gets_no_weight_gradient():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    total, _ = LinearCE.apply(hidden, weight, torch.arange(5), torch.ones(5), ce_and_grad)
    total.backward()
    assert hidden.grad is not None and weight.grad is None


def test_training_on_the_flat_path_gives_the_rows_losses(tmp_path, monkeypatch):
    """train() end to end on the flat path (the default on CPU and on GPU in bf16)."""
    from distill.train.loop import train

    make_tokenizer(tmp_path / "tok")
    rng = random.Random(0)
    shards = {
        "math": write_shards(tmp_path / "math", "math", [math_trace(i, rng) for i in range(30)]),
        "agents": write_shards(tmp_path / "agents", "agents", [tool_trace()] * 4),
    }
    losses = {}
    for attn in ("sdpa", VARLEN):
        monkeypatch.setenv("DISTILL_ATTN", attn)
        rep = train(
            init=ARCH,
            tokenizer_dir=tmp_path / "tok",
            shards=shards,
            out_dir=tmp_path / attn,
            cfg=small_cfg(max_steps=4),
            loss_weights={"math": 1.0, "agents": 2.0},
        )
        losses[attn] = rep["losses"]
    assert losses["sdpa"][-1] < losses["sdpa"][0]
    torch.testing.assert_close(
        torch.tensor(losses[VARLEN]), torch.tensor(losses["sdpa"]), rtol=0, atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_and_head_match_eager(setup, checkpointing):
    """train.compile (regional: decoder layers and the head's softmax pass) on the flat
    varlen path gives the eager loss and gradients, and compiles each graph once; with
    train.gradient_checkpointing too, the layers still compile (no checkpoint inside them)."""
    from distill.train.setup import compile_model

    tok, dd, rows = setup
    out = {}
    for name in ("eager", "compiled"):
        model = tiny_model(tok)
        use_varlen_attention(model)
        if checkpointing:
            model.train()  # transformers checkpoints in training mode only
            enable_checkpointing(model)
        obj = Objective(model, max_seqlen=128)
        if name == "compiled":
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            obj = compile_model(obj)
        for width in (None, 400, 400):  # exact, then a static width twice
            b = collate(
                rows, {"math": dd}, {"math": 0}, {}, 0, width=width, flat=True, max_segment=128
            )
            model.zero_grad()
            loss, _, _ = obj(n_domains=1, norm=torch.tensor(100.0), **tensors(b))
            loss.backward()
        out[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    # the varlen attention is left out by design (torch.compiler.disable); a checkpoint
    # inside the compiled region would break the graph as an "unsafe side effect"
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert not [b for b in breaks if "Unsafe side effect" in b], list(breaks)
    assert abs(out["eager"][0] - out["compiled"][0]) < 1e-5 * out["eager"][0]
    for n, g in out["eager"][1].items():
        torch.testing.assert_close(out["compiled"][1][n], g, rtol=1e-4, atol=1e-5)

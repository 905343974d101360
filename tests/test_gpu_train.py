"""The GPU fast path on a real GPU (skipped without CUDA): PyTorch's varlen flash
attention against per-segment SDPA, the fused LM head in bf16 (eager and compiled), and
a flattened row through a Qwen2-shaped model against its traces one by one."""

import pytest
import torch
import torch.nn.functional as F
from tiny_artifacts import segment_sdpa

from distill.layout import run_dir
from distill.models import _varlen_kernel, use_varlen_attention, varlen_supported
from distill.train.loss import LinearCE, Objective

pytestmark = pytest.mark.skipif(not varlen_supported(), reason="needs CUDA and torch varlen_attn")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_varlen_kernel_matches_segment_sdpa():
    g = torch.Generator(device="cuda").manual_seed(0)
    lens = [1, 7, 300, 64, 1000, 129]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    t = sum(lens)
    q = torch.randn(t, 14, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(t, 2, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2)
    )
    out = _varlen_kernel(q, k, v, cu, 4096, 64**-0.5)
    dout = torch.randn_like(out)
    out.backward(dout)
    q2, k2, v2 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = segment_sdpa(q2, k2, v2, cu, 4096, 64**-0.5)
    want.backward(dout.float())
    assert rel(out, want) < 1e-2
    for got, ref in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert rel(got, ref) < 2e-2


@pytest.mark.parametrize(
    "fn_name,compiled",
    [("ce_and_grad", False), ("ce_and_grad", True), ("ce_and_grad_pointwise", True)],
)
def test_fused_head_bf16_matches_fp64(fn_name, compiled):
    import distill.train.loss

    g = torch.Generator(device="cuda").manual_seed(1)
    n, h, vocab = 5000, 128, 32000  # three chunks of 2048
    hidden = torch.randn(n, h, device="cuda", generator=g, requires_grad=True)
    weight = (torch.randn(vocab, h, device="cuda", generator=g) * 0.1).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    scale = torch.full((n,), 1.0 / n, device="cuda")
    ce_fn = getattr(distill.train.loss, fn_name)
    fn = torch.compile(ce_fn, dynamic=True) if compiled else ce_fn
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, ce = LinearCE.apply(hidden, weight, targets, scale, fn)
    total.backward()
    h2, w2 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    want_ce = F.cross_entropy(h2 @ w2.t(), targets, reduction="none")
    (want_ce * scale.double()).sum().backward()
    assert rel(ce, want_ce) < 1e-2
    assert rel(hidden.grad, h2.grad) < 2e-2 and rel(weight.grad, w2.grad) < 2e-2


def test_flat_row_through_qwen2_matches_traces_one_by_one():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).cuda().eval()
    lens = [5, 300, 77, 1024]
    ids = [torch.randint(0, 1000, (n,), device="cuda") for n in lens]
    want = 0.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for x in ids:
            logits = model(x[None]).logits[0, :-1].float()
            want += F.cross_entropy(logits, x[1:], reduction="sum").item()
        use_varlen_attention(model)
        flat = torch.cat(ids)[None]
        starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        pos = torch.cat([torch.arange(n) for n in lens])[None].cuda()
        loss_pos = torch.cat(
            [torch.arange(s, e - 1) for s, e in zip(starts[:-1], starts[1:], strict=True)]
        )
        got, _, _ = Objective(model, max_seqlen=2048)(
            input_ids=flat,
            position_ids=pos,
            loss_pos=loss_pos.cuda(),
            targets=flat[0, loss_pos + 1],
            weights=torch.ones(len(loss_pos), device="cuda"),
            domain=torch.zeros(len(loss_pos), dtype=torch.long, device="cuda"),
            n_domains=1,
            norm=torch.tensor(1.0, device="cuda"),
            cu_seqlens=starts.to(torch.int32).cuda(),
        )
    assert abs(got.item() - want) < 1e-2 * want


def test_deferred_bookkeeping_on_the_gpu_trains_like_booking_every_step(tmp_path, monkeypatch):
    """The GPU loop reads step k's losses after queueing step k+1 (pinned, non-blocking
    copies; no sync a step): the same losses as the synchronous loop, checkpoints where
    asked, and a planned stop at the exact step."""
    import random

    from tiny_artifacts import ARCH, make_tokenizer, math_trace, small_cfg, write_shards

    import distill.train.loop

    make_tokenizer(tmp_path / "tok")
    rng = random.Random(0)
    shards = {"math": write_shards(tmp_path / "m", "math", [math_trace(i, rng) for i in range(40)])}
    cfg = small_cfg(precision="bf16", save_steps=3, save_total_limit=5)

    def run(out, defer, **kw):
        monkeypatch.setattr(distill.train.loop, "DEFER", defer)
        return distill.train.loop.train(
            init=ARCH, tokenizer_dir=tmp_path / "tok", shards=shards, out_dir=out, cfg=cfg, **kw
        )

    sync, late = run(tmp_path / "sync", False), run(tmp_path / "late", None)
    assert late["finished"] and late["steps"] == sync["steps"] == 6
    assert late["losses"] == pytest.approx(sync["losses"], rel=1e-3)
    assert sorted(p.name for p in (run_dir(tmp_path / "late") / "checkpoints").iterdir()) == [
        "step-000003",
        "step-000006",
    ]
    cut = run(tmp_path / "cut", None, stop_after_steps=2)
    assert not cut["finished"] and len(cut["losses"]) == 2

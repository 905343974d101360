"""The hand-written LM-head log-prob (distill.rl.head) against autograd through
token_logprobs: values, entropy and gradients (h, weight, bias) in fp64, with and without
the sampler's kept set; and the policy's forward with it against the autograd path."""

import pytest
import torch
import torch.nn.functional as F
from gen_fixtures import tiny_model_dir

from distill.rl.head import head_logprobs
from distill.rl.loss import token_logprobs

N, H, V, TEMP = 9, 6, 23, 0.7


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("policy"))


def _inputs(seed: int, bias: bool, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 2).to(device, dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(device, dtype) if bias else None
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    return h, w, b, targets


def _kept(targets: torch.Tensor, seed: int) -> torch.Tensor:
    """Each row's kept set holds its target among 1-5 ids, padded with -1; the last row
    keeps nothing (a padding row)."""
    g = torch.Generator().manual_seed(seed)
    kept = torch.full((N, 6), -1, dtype=torch.long)
    for i, t in enumerate(targets.tolist()[:-1]):
        others = [x for x in torch.randperm(V, generator=g).tolist() if x != t]
        ids = [t, *others[: int(torch.randint(0, 5, (1,), generator=g))]]
        ids = [ids[j] for j in torch.randperm(len(ids), generator=g).tolist()]
        kept[i, : len(ids)] = torch.tensor(ids)
    return kept


@pytest.mark.parametrize("use_kept", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_head_logprobs_equals_autograd_through_token_logprobs(use_kept, bias):
    g = torch.Generator().manual_seed(5)
    upstream = torch.randn(N, generator=g, dtype=torch.float64)
    results = []
    for fused in (True, False):
        h, w, b, targets = _inputs(0, bias)
        kept = _kept(targets, 1) if use_kept else None
        if fused:
            lp, ent = head_logprobs(h, w, b, targets, kept, TEMP)
        else:
            lp, ent = token_logprobs(F.linear(h, w, b), targets, TEMP, kept)
        valid = torch.isfinite(lp)
        (torch.where(valid, lp, 0.0) * upstream).sum().backward()
        grads = [x.grad for x in (h, w, b) if x is not None]
        results.append((lp, ent, grads, valid))
    (lp1, ent1, g1, v1), (lp0, ent0, g0, v0) = results
    assert torch.equal(v1, v0) and v1.sum() == (N - 1 if use_kept else N)
    torch.testing.assert_close(lp1[v1], lp0[v0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ent1, ent0, rtol=1e-9, atol=1e-9)
    assert not ent1.requires_grad
    for a, b_ in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-9)
    assert g1[0].abs().sum() > 0 and g1[1].abs().sum() > 0


def test_head_logprobs_gradient_is_the_true_derivative():
    """gradcheck: the hand-written backward against finite differences (fp64)."""
    h, w, b, targets = _inputs(2, True)
    kept = _kept(targets, 3)[:-1]

    def f(h, w, b):
        return head_logprobs(h[:-1], w, b, targets[:-1], kept, TEMP)[0]

    assert torch.autograd.gradcheck(f, (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w, b: head_logprobs(h, w, b, targets)[0], (h, w, b))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("use_kept", [False, True])
def test_head_logprobs_compiled_on_cuda_matches_cpu(use_kept):
    """On CUDA the elementwise parts are compiled: same values and gradients as the CPU
    (eager) path, fp32."""
    out = []
    for dev in ("cpu", "cuda"):
        h, w, b, targets = _inputs(4, True, torch.float32, dev)
        kept = _kept(targets.cpu(), 5)[:-1].to(dev) if use_kept else None
        n = N - 1 if use_kept else N
        lp, ent = head_logprobs(h[:n], w, b, targets[:n], kept, TEMP)
        lp.sum().backward()
        out.append([x.detach().cpu() for x in (lp, ent, h.grad, w.grad, b.grad)])
    for a, c in zip(*out, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    from distill.rl import head

    # the CUDA side ran compiled: a compiler failure falls back to eager with a warning,
    # which would pass the comparison above
    used = ("stats", "kept_grad" if use_kept else "dense_grad")
    assert all(head._compiled.get(n) not in (None, False) for n in used), head._compiled


def test_policy_forward_fused_head_equals_autograd_head(policy_dir):
    """PolicyLogprobs with the hand-written head gives the autograd path's log-probs and
    gradients on a real tiny model, over several head chunks."""
    from distill.models import load_model
    from distill.rl import policy as P
    from distill.rl.rollout import Sample

    g = torch.Generator().manual_seed(0)
    samples = [
        Sample(torch.randint(3, 60, (5 + i,), generator=g).tolist(),
               torch.randint(3, 60, (4 + 2 * i,), generator=g).tolist(), [0.0] * (4 + 2 * i),
               None, "math", i, advantage=1.0 - i)
        for i in range(3)
    ]  # fmt: skip
    mb = P.make_micro_batch(samples, 0, torch.device("cpu"))
    out = []
    old = P.HEAD_CHUNK
    P.HEAD_CHUNK = 5  # 18 completion tokens: 4 chunks
    try:
        for fused in (True, False):
            model = load_model(policy_dir, dtype=torch.float64)
            logp, ent = P.PolicyLogprobs(model, fused_head=fused)(mb, 0.7)
            (
                torch.where(mb.mask, logp, 0.0) * torch.arange(logp.numel()).view_as(logp)
            ).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            out.append((logp[mb.mask], ent[mb.mask], grads))
    finally:
        P.HEAD_CHUNK = old
    (lp1, e1, g1), (lp0, e0, g0) = out
    torch.testing.assert_close(lp1, lp0)
    torch.testing.assert_close(e1, e0)
    assert g1.keys() == g0.keys() and len(g1) > 3
    for n in g1:
        torch.testing.assert_close(g1[n], g0[n], msg=n)


def test_right_padded_rows_need_no_attention_mask(policy_dir):
    """The policy's forward runs causal attention with no padding mask: each row of a
    right-padded micro-batch gets exactly what it gets alone (padding only follows it)."""
    from distill.models import load_model
    from distill.rl import policy as P
    from distill.rl.rollout import Sample

    g = torch.Generator().manual_seed(1)
    samples = [
        Sample(torch.randint(3, 60, (3 + 4 * i,), generator=g).tolist(),
               torch.randint(3, 60, (9 - 3 * i,), generator=g).tolist(), [0.0] * (9 - 3 * i),
               None, "math", i, advantage=0.5)
        for i in range(3)
    ]  # fmt: skip
    model = load_model(policy_dir, dtype=torch.float64)
    policy = P.PolicyLogprobs(model)
    mb = P.make_micro_batch(samples, 0, torch.device("cpu"))
    assert policy._mask(mb) is None and not mb.attention_mask.all()  # rows were padded
    together = policy(mb, 0.7)[0]
    for i, s in enumerate(samples):
        alone = policy(P.make_micro_batch([s], 0, torch.device("cpu")), 0.7)[0][0]
        n = len(s.token_ids)
        torch.testing.assert_close(together[i, :n], alone[:n], rtol=1e-10, atol=1e-10)

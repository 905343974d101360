"""The objective: top-k KD against a dense reference, per-domain loss weights, and
gradients that do not depend on how the batch is split into micro-batches."""

import random

import numpy as np
import pytest
import torch
from tiny_artifacts import (
    domain_data,
    make_tokenizer,
    math_trace,
    tensors,
    tiny_model,
    tool_trace,
    trace_ce,
)

from distill.train.data import collate
from distill.train.loss import Objective, topk_kl

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_reference(logits, ids, lps, temperature):
    """KL over explicit (k + 1)-bucket distributions, one token at a time."""
    out = []
    for z, row_ids, row_lp in zip(logits, ids, lps, strict=True):
        q = torch.softmax(z.double() / temperature, -1)
        keep = [(int(i), float(lp)) for i, lp in zip(row_ids, row_lp, strict=True) if i >= 0]
        p = torch.tensor([np.exp(lp) for _, lp in keep], dtype=torch.float64)
        qk = torch.stack([q[i] for i, _ in keep])
        p_tail, q_tail = 1 - p.sum(), 1 - qk.sum()
        kl = (p * (p.log() - qk.log())).sum()
        if p_tail > 0:
            kl = kl + p_tail * (p_tail.log() - q_tail.log())
        out.append(kl)
    return torch.stack(out)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_matches_dense_reference(temperature):
    g = torch.Generator().manual_seed(0)
    n, v, k = 12, 50, 5
    logits = torch.randn(n, v, generator=g) * 3
    teacher = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1)
    lp, ids = teacher.topk(k, -1)
    ids, lp = ids.int(), lp.clone()
    ids[3, 3:] = -1  # a token whose teacher reported fewer entries
    lp[3, 3:] = float("-inf")
    got = topk_kl(logits, ids, lp, temperature)
    want = dense_reference(logits, ids, lp, temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert (got > 0).all()


def test_topk_kl_is_zero_when_student_is_the_teacher():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 40, generator=g)
    lp, ids = torch.log_softmax(logits, -1).topk(4, -1)
    torch.testing.assert_close(topk_kl(logits, ids, lp), torch.zeros(6), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    rng = random.Random(0)
    domains = {
        "math": domain_data(tok, "math", [math_trace(i, rng) for i in range(8)]),
        "agents": domain_data(tok, "agents", [tool_trace()]),
    }
    rows = [[("math", i)] for i in range(6)] + [[("agents", 0)], [("agents", 1), ("math", 7)]]
    return tok, domains, rows


def grads(model, tok, domains, rows, split, weights):
    index = {"agents": 0, "math": 1}
    obj = Objective(model)
    model.zero_grad()
    mbs = [
        collate(rows[i : i + split], domains, index, weights, tok.pad_token_id)
        for i in range(0, 8, split)
    ]
    norm = torch.tensor(float(sum(b["weights"].sum() for b in mbs)))
    total = 0.0
    for b in mbs:
        loss, _, _ = obj(n_domains=2, norm=norm, **tensors(b))
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_four_micro_batches_of_two_equal_one_batch_of_eight(setup):
    tok, domains, rows = setup
    model = tiny_model(tok)
    w = {"math": 1.0, "agents": 3.0}
    loss8, g8 = grads(model, tok, domains, rows, 8, w)
    loss2, g2 = grads(model, tok, domains, rows, 2, w)
    assert abs(loss8 - loss2) < 1e-6
    for name in g8:
        torch.testing.assert_close(g2[name], g8[name], rtol=0, atol=1e-6)


def test_loss_is_weighted_mean_over_all_loss_tokens(setup):
    tok, domains, rows = setup
    model = tiny_model(tok)
    w = {"math": 1.0, "agents": 3.0}
    got, _ = grads(model, tok, domains, rows, 8, w)
    num = den = 0.0
    with torch.no_grad():
        for row in rows:
            for d, i in row:
                ce = trace_ce(model, domains[d], i)
                num += w[d] * ce.sum().item()
                den += w[d] * len(ce)
    assert abs(got - num / den) < 1e-5
    # the weights matter: uniform weights give another value
    uniform, _ = grads(model, tok, domains, rows, 8, {"math": 1.0, "agents": 1.0})
    assert abs(uniform - got) > 1e-4

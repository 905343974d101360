"""The GRPO loss: against a naive loop over the formulas, the KL estimator's gradient by
exact enumeration, off-policy masking, the keep sampling mask, micro-batch and rank
invariance, group advantages, and TRL's loss where it is installed. All in fp64."""

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distill.rl.loss import global_denominator, group_advantages, grpo_loss, token_logprobs

AGGS = ["token_mean", "seq_mean_token_mean", "seq_sum_const"]
TEMP = 0.7
MAX_LEN = 12


pytestmark = pytest.mark.usefixtures("one_thread")


def top_p_kept(logits, temperature, top_p):
    """The sampler's truncation: the most probable tokens until their mass reaches top_p,
    as ids [N, K] padded with -1."""
    probs = torch.softmax(logits / temperature, -1)
    p_sorted, order = probs.sort(-1, descending=True)
    keep = (p_sorted.cumsum(-1) - p_sorted) < top_p  # mass before a token is below top_p
    ids = torch.where(keep, order, -1)
    return ids[:, : int(keep.sum(-1).max())]


def kept_mask(kept, v):
    """[N, V] bool: which ids each row's kept set holds."""
    return (kept[:, :, None] == torch.arange(v)).any(1)


def sampler_draw(logits, temperature, kept, gen):
    """Draw from the renormalised kept set and return (token, its log-probability), the way
    the sampler reports it: probabilities outside the set zeroed, the rest divided by their sum."""
    probs = torch.softmax(logits / temperature, -1)
    trunc = torch.where(kept_mask(kept, probs.shape[1]), probs, 0.0)
    trunc = trunc / trunc.sum(-1, keepdim=True)
    tok = torch.multinomial(trunc, 1, generator=gen).squeeze(1)
    return tok, trunc.gather(1, tok[:, None]).squeeze(1).log()


def naive_logp(z, target, kept_row):
    ids = range(z.shape[0]) if kept_row is None else [int(i) for i in kept_row if i >= 0]
    return z[target] / TEMP - torch.log(sum(torch.exp(z[j] / TEMP) for j in ids))


def naive_loss(lp, old, ref, adv, mask, beta, delta, agg):
    """The module docstring's formulas, one token at a time; also returns its counts."""
    total, n_tok, n_seq, n_clipped, n_masked = 0.0, 0, 0, 0, 0
    for i in range(lp.shape[0]):
        toks = [t for t in range(lp.shape[1]) if mask[i, t]]
        if not toks:
            continue
        a, keep = float(adv[i]), 1.0
        if delta is not None and a < 0:
            if sum(float(old[i, t] - lp[i, t].detach()) for t in toks) / len(toks) > delta:
                keep, n_masked = 0.0, n_masked + 1
        seq = 0.0
        for t in toks:
            r = torch.exp(lp[i, t] - old[i, t])
            pg = -torch.minimum(r * a, torch.clamp(r, 0.8, 1.28) * a) * keep
            if keep and ((r > 1.28 and a > 0) or (r < 0.8 and a < 0)):
                n_clipped += 1
            kl = 0.0
            if ref is not None:
                d = ref[i, t] - lp[i, t]
                kl = float(beta[i]) * r * (torch.exp(d) - d - 1)
            seq = seq + pg + kl
        total = total + (seq / len(toks) if agg == "seq_mean_token_mean" else seq)
        n_tok, n_seq = n_tok + len(toks), n_seq + 1
    denom = {"token_mean": n_tok, "seq_mean_token_mean": n_seq, "seq_sum_const": n_seq * MAX_LEN}
    return total / denom[agg], dict(tokens=n_tok, seqs=n_seq, clipped=n_clipped, masked=n_masked)


def batch(seed=0, s=5, t=6, v=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, t, v, generator=g, dtype=torch.float64) * 2
    old_logits = logits + torch.randn(s, t, v, generator=g, dtype=torch.float64) * 1.2
    ref_logits = torch.randn(s, t, v, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 0, 5, 1])  # row 2: a padding row
    mask = torch.arange(t)[None, :] < lengths[:, None]
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2, -0.3], dtype=torch.float64)
    return logits, old_logits, ref_logits, mask, adv, g


@pytest.mark.parametrize("use_kept", [False, True])
@pytest.mark.parametrize("delta", [None, "mid"])
@pytest.mark.parametrize("kl", [None, "float", "per_seq"])
@pytest.mark.parametrize("agg", AGGS)
def test_matches_naive_loops(agg, kl, delta, use_kept):
    logits, old_logits, ref_logits, mask, adv, g = batch()
    s, t, v = logits.shape
    flat_old = old_logits.reshape(-1, v)
    kept = top_p_kept(flat_old, TEMP, 0.8) if use_kept else None
    targets, old_lp = sampler_draw(flat_old, TEMP, top_p_kept(flat_old, TEMP, 0.8), g)
    if not use_kept:  # the untruncated sampler: its full-vocabulary log-probability
        old_lp = torch.log_softmax(flat_old / TEMP, -1).gather(1, targets[:, None]).squeeze(1)
    old_lp = old_lp.reshape(s, t)
    ref_lp, _ = token_logprobs(ref_logits.reshape(-1, v), targets, TEMP, kept)
    ref_lp = ref_lp.reshape(s, t) if kl else None
    beta = torch.tensor([0.1, 0.3, 0.2, 0.05, 0.4], dtype=torch.float64)
    kl_coef = {None: 0.0, "float": 0.1, "per_seq": beta}[kl]
    beta_rows = beta if kl == "per_seq" else torch.full((s,), float(kl_coef), dtype=torch.float64)

    x = logits.clone().requires_grad_()
    with torch.no_grad():
        div = (
            (old_lp - token_logprobs(logits.reshape(-1, v), targets, TEMP, kept)[0].reshape(s, t))
            * mask
        ).sum(-1) / mask.sum(-1).clamp(min=1)
    neg = sorted(float(div[i]) for i in range(s) if adv[i] < 0 and mask[i].any())
    offpolicy_delta = None if delta is None else (neg[-2] + neg[-1]) / 2  # masks one

    lp, _ = token_logprobs(x.reshape(-1, v), targets, TEMP, kept)
    denom = global_denominator([mask], agg, max_len=MAX_LEN)
    loss, stats = grpo_loss(
        lp.reshape(s, t),
        old_lp,
        adv,
        mask,
        ref_logp=ref_lp,
        kl_coef=kl_coef,
        offpolicy_delta=offpolicy_delta,
        agg=agg,
        denom=denom,
    )
    (grad,) = torch.autograd.grad(loss, x)

    y = logits.clone().requires_grad_()
    lp_naive = torch.stack(
        [
            torch.stack(
                [
                    naive_logp(
                        y[i, j], targets[i * t + j], None if kept is None else kept[i * t + j]
                    )
                    for j in range(t)
                ]
            )
            for i in range(s)
        ]
    )
    want, counts = naive_loss(lp_naive, old_lp, ref_lp, adv, mask, beta_rows, offpolicy_delta, agg)
    (want_grad,) = torch.autograd.grad(want, y)

    torch.testing.assert_close(loss, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-6)
    assert grad.abs().sum() > 0
    assert int(stats["tokens"]) == counts["tokens"] and int(stats["seqs"]) == counts["seqs"]
    assert int(stats["clipped_tokens"]) == counts["clipped"] > 0
    assert int(stats["masked_seqs"]) == counts["masked"] == (0 if delta is None else 1)
    assert stats["ratios"].shape == (counts["tokens"],)
    assert int(stats["ratio_outside_0.9_1.1"]) == int(((stats["ratios"] - 1).abs() > 0.1).sum())
    assert ("kl_sum" in stats) == (kl is not None)


def kl_grads(kl_coef_form):
    """Over V=5 tokens at one position with π_old ≠ π_θ ≠ π_ref: the π_old expectation of the
    gradient of the estimator, and ∇KL(π_θ‖π_ref) in closed form."""
    g = torch.Generator().manual_seed(3)
    z, z_old, z_ref = (torch.randn(5, generator=g, dtype=torch.float64) * 1.5 for _ in range(3))
    z = z.requires_grad_()
    logp, old, ref = (
        torch.log_softmax(z, 0),
        torch.log_softmax(z_old, 0),
        torch.log_softmax(z_ref, 0),
    )
    expected = 0.0
    for y in range(5):
        term = kl_coef_form(logp[y].reshape(1, 1), old[y].reshape(1, 1), ref[y].reshape(1, 1))
        expected = expected + old[y].exp() * term
    (grad,) = torch.autograd.grad(expected, z)
    p = logp.detach().exp()
    ell = logp.detach() - ref
    kl = (p * ell).sum()
    return grad, p * (ell - kl), expected.detach(), kl, p, ref.exp()


def test_kl_estimator_gradient_is_unbiased():
    def ours(lp, old, ref):
        ones = torch.ones(1, 1, dtype=torch.bool)
        adv = torch.zeros(1, dtype=torch.float64)  # no policy term: only the KL remains
        return grpo_loss(lp, old, adv, ones, ref_logp=ref, kl_coef=1.0, denom=1.0)[0]

    grad, want, value, kl, _, _ = kl_grads(ours)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(value, kl, rtol=0, atol=1e-12)  # the value is unbiased too

    def plain_k3(lp, old, ref):
        return (torch.exp(ref - lp) - (ref - lp) - 1).sum()

    def detached_ratio(lp, old, ref):
        return (torch.exp(lp - old).detach() * (torch.exp(ref - lp) - (ref - lp) - 1)).sum()

    assert (kl_grads(plain_k3)[0] - want).abs().max() > 1e-2
    grad_det, _, _, _, p, p_ref = kl_grads(detached_ratio)
    assert (grad_det - want).abs().max() > 1e-2
    # what a detached ratio estimates instead: ∇KL(π_ref‖π_θ) = p − p_ref w.r.t. the logits
    torch.testing.assert_close(grad_det, p - p_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "adv, token_divs, delta, masked",
    [
        (-1.0, [2.0, 0.0, -0.5], 0.25, True),  # A < 0, mean 0.5 > δ
        (-1.0, [1.0, 0.5, 0.0], 0.5, False),  # A < 0, mean exactly δ: kept
        (-1.0, [2.0, -0.5, -0.5], 0.5, False),  # a token above δ, the mean below
        (-1.0, [-1.0, -1.0, -1.0], 0.5, False),
        (1.0, [3.0, 3.0, 3.0], 0.5, False),  # A > 0: never
        (0.0, [3.0, 3.0, 3.0], 0.5, False),  # A = 0 counts as A ≥ 0
        (-1.0, [3.0, 3.0, 3.0], None, False),  # δ = None: never
    ],
)
def test_offpolicy_masking_truth_table(adv, token_divs, delta, masked):
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = (old - torch.tensor([token_divs], dtype=torch.float64)).requires_grad_()
    mask = torch.ones(1, 3, dtype=torch.bool)
    a = torch.tensor([adv], dtype=torch.float64)
    loss, stats = grpo_loss(logp, old, a, mask, offpolicy_delta=delta, denom=3.0)
    assert bool(stats["masked_seqs"]) == masked
    assert (loss == 0) == (masked or adv == 0)
    # M masks the policy term only: the KL term still pulls a masked sequence
    ref = torch.full((1, 3), -0.1, dtype=torch.float64)
    kl_loss, _ = grpo_loss(
        logp, old, a, mask, ref_logp=ref, kl_coef=0.5, offpolicy_delta=delta, denom=3.0
    )
    (g,) = torch.autograd.grad(kl_loss, logp)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_keep_sampling_mask_gives_ratio_one_on_policy(top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 30, generator=g, dtype=torch.float64) * 2
    kept = top_p_kept(logits, TEMP, top_p)
    targets, old_lp = sampler_draw(logits, TEMP, kept, g)
    mask = torch.ones(4, 4, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    for use_kept, ratio_one in [(True, True), (False, False)]:
        lp, ent = token_logprobs(logits, targets, TEMP, kept if use_kept else None)
        _, stats = grpo_loss(lp.reshape(4, 4), old_lp.reshape(4, 4), adv, mask, denom=16.0)
        off = (stats["ratios"] - 1).abs()
        if ratio_one:
            assert off.max() < 1e-12 and int(stats["ratio_outside_0.9_1.1"]) == 0
            inside = kept_mask(kept, logits.shape[1])
            probs = torch.where(inside, torch.softmax(logits / TEMP, -1), 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
            # the entropy is the truncated distribution's
            torch.testing.assert_close(ent, torch.special.entr(probs).sum(-1), rtol=0, atol=1e-12)
        else:  # the full-vocabulary ratio is the kept mass, below 1 wherever truncation cut
            assert off.min() > 1e-3


class FloatShapes(TorchDispatchMode):
    """Records the shape of every fp32/fp64 tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.float64):
                self.shapes.append(tuple(x.shape))
        return out


def test_kept_set_builds_no_full_vocab_floats_and_handles_bf16():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 50, generator=g)
    kept = top_p_kept(logits, 1.0, 0.6)
    targets = kept[:, 0]
    lp32, _ = token_logprobs(logits, targets, 1.0, kept)
    with FloatShapes() as seen:
        lp16, ent16 = token_logprobs(logits.bfloat16(), targets, 1.0, kept)
    assert (6, 50) not in seen.shapes and (6, kept.shape[1]) in seen.shapes
    with FloatShapes() as seen_full:  # the check can fail: the full-vocabulary path does
        token_logprobs(logits.bfloat16(), targets, 1.0)
    assert (6, 50) in seen_full.shapes
    assert lp16.dtype == torch.float32 and ent16.dtype == torch.float32
    torch.testing.assert_close(lp16, lp32, rtol=0, atol=5e-2)
    outside = torch.tensor([int(i) for i in range(50) if i not in set(kept[0].tolist())][:1])
    lp_out, _ = token_logprobs(logits[:1], outside, 1.0, kept[:1])
    assert lp_out.item() == float("-inf")  # a token outside the kept set has probability 0
    # a padding row with an empty kept set: -inf, entropy 0, and no nan in the gradient
    x = logits[:2].clone().requires_grad_()
    empty = torch.cat([kept[:1], torch.full_like(kept[:1], -1)])
    lp, ent = token_logprobs(x, targets[:2], 1.0, empty)
    assert lp[1].item() == float("-inf") and ent[1].item() == 0.0 and ent[0] > 0
    assert not ent.requires_grad  # a statistic: no second [N, V] kept for its backward
    (grad,) = torch.autograd.grad(torch.where(torch.isfinite(lp), lp, 0.0).sum(), x)
    assert torch.isfinite(grad).all() and grad[1].abs().sum() == 0 and grad[0].abs().sum() > 0


def test_full_vocab_path_upcasts_without_touching_the_logits():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 40, generator=g)
    logits[:, 3] = float("-inf")  # a masked vocabulary entry
    targets = torch.tensor([0, 1, 2, 4, 5])
    before16, before32 = logits.bfloat16(), logits.clone()
    x16, x32 = before16.clone().requires_grad_(), before32.clone().requires_grad_()
    lp16, ent16 = token_logprobs(x16, targets, TEMP)
    lp32, ent32 = token_logprobs(x32, targets, TEMP)
    assert torch.equal(x16, before16) and torch.equal(x32, before32)  # no in-place division
    want = torch.log_softmax(logits.double() / TEMP, -1)
    want_lp = want.gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(lp32.double(), want_lp, rtol=0, atol=1e-5)  # fp32 logits
    torch.testing.assert_close(
        ent32.double(), torch.special.entr(want.exp()).sum(-1), rtol=0, atol=1e-5
    )
    assert lp16.dtype == ent16.dtype == torch.float32 and torch.isfinite(ent16).all()
    torch.testing.assert_close(lp16, lp32, rtol=0, atol=5e-2)
    assert not ent32.requires_grad
    (grad,) = torch.autograd.grad(lp16.sum(), x16)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


def test_padding_may_hold_anything():
    logits, old_logits, ref_logits, mask, adv, g = batch(seed=4)
    s, t, v = logits.shape
    lp = torch.log_softmax(logits, -1)[..., 0]
    old, ref = torch.log_softmax(old_logits, -1)[..., 0], torch.log_softmax(ref_logits, -1)[..., 0]
    junk = torch.where(mask, 0.0, float("-inf"))
    losses, grads = [], []
    for pad in (torch.zeros_like(junk), junk, torch.where(mask, 0.0, torch.nan)):
        x = (lp + pad).clone().requires_grad_()
        loss, _ = grpo_loss(
            x,
            old + pad,
            adv,
            mask,
            ref_logp=ref - pad,
            kl_coef=0.1,
            offpolicy_delta=0.1,
            agg="seq_mean_token_mean",
            denom=global_denominator([mask], "seq_mean_token_mean"),
        )
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, x)[0])
    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, losses[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, grads[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("agg", AGGS)
def test_microbatches_and_ranks_sum_to_the_whole_batch(agg):
    g = torch.Generator().manual_seed(5)
    s, h, v = 7, 4, 9
    lengths = torch.tensor([9, 2, 5, 7, 1, 4, 3])
    w0 = torch.randn(h, v, generator=g, dtype=torch.float64)
    feats = torch.randn(s, 9, h, generator=g, dtype=torch.float64)
    with torch.no_grad():
        old_lg = feats @ (w0 + 0.3 * torch.randn(h, v, generator=g, dtype=torch.float64))
        ref_lg = feats @ (w0 + 0.5 * torch.randn(h, v, generator=g, dtype=torch.float64))
    kept = top_p_kept(old_lg.reshape(-1, v), TEMP, 0.9)
    targets, old_lp = sampler_draw(old_lg.reshape(-1, v), TEMP, kept, g)
    targets, old_lp, kept = targets.reshape(s, 9), old_lp.reshape(s, 9), kept.reshape(s, 9, -1)
    ref_lp = token_logprobs(ref_lg.reshape(-1, v), targets.reshape(-1), TEMP, kept.flatten(0, 1))
    ref_lp = ref_lp[0].reshape(s, 9)
    adv = torch.randn(s, generator=g, dtype=torch.float64)
    beta = torch.rand(s, generator=g, dtype=torch.float64)
    # one sequence masked whatever torch's multinomial draws (its stream differs between
    # releases): a negative advantage on a row the policy has since moved well away from
    adv[3], old_lp[3] = -1.0, old_lp[3] + 2.0

    def chunk(rows, width):
        """Rows of the batch, padded (or cut) to ``width`` positions; padding is junk."""
        pad = max(0, width - 9)
        mask = torch.arange(width)[None, :] < lengths[rows, None]

        def fit(x, fill):
            x = x[rows][:, :width]
            return torch.cat([x, x.new_full((len(rows), pad, *x.shape[2:]), fill)], 1)

        return dict(
            feats=fit(feats, 0.5),
            targets=fit(targets, 0),
            kept=fit(kept, -1),
            mask=mask,
            old=fit(old_lp, -3.0),
            ref=fit(ref_lp, 2.0),
            adv=adv[rows],
            beta=beta[rows],
        )

    def run(chunks):
        w = w0.clone().requires_grad_()
        denom = global_denominator([c["mask"] for c in chunks], agg, max_len=MAX_LEN)
        total, sums = 0.0, defaultdict(float)
        for c in chunks:
            n, width = c["targets"].shape
            logits = (c["feats"] @ w).reshape(n * width, v)
            lp, _ = token_logprobs(
                logits, c["targets"].reshape(-1), TEMP, c["kept"].reshape(n * width, -1)
            )
            loss, stats = grpo_loss(
                lp.reshape(n, width),
                c["old"],
                c["adv"],
                c["mask"],
                ref_logp=c["ref"],
                kl_coef=c["beta"],
                offpolicy_delta=0.05,
                agg=agg,
                denom=denom,
            )
            total = total + loss
            for k, x in stats.items():
                if k != "ratios":
                    sums[k] += float(x)
        (grad,) = torch.autograd.grad(total, w)
        return total.detach(), grad, denom, dict(sums)

    whole = run([chunk(list(range(s)), 9)])
    rank0 = [chunk([0, 1], 9), chunk([2, 3, 4], 7)]
    rank1 = [chunk([5], 11), chunk([6], 3)]  # one padded past the batch, one to its own length
    split = run(rank0 + rank1)
    assert whole[2] == split[2]
    torch.testing.assert_close(split[0], whole[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(split[1], whole[1], rtol=0, atol=1e-12)
    assert split[3].keys() == whole[3].keys()
    for k in whole[3]:
        assert split[3][k] == pytest.approx(whole[3][k], abs=1e-12), k
    assert whole[1].abs().sum() > 0 and whole[3]["masked_seqs"] > 0


def test_global_denominator():
    a = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 1, 1, 1]], dtype=torch.bool)
    assert global_denominator([a, b], "token_mean") == 6.0
    assert global_denominator([a, b], "seq_mean_token_mean") == 2.0  # the empty row is padding
    assert global_denominator([a, b], "seq_sum_const", max_len=10) == 20.0
    with pytest.raises(ValueError):
        global_denominator([a], "seq_sum_const")
    with pytest.raises(ValueError):
        global_denominator([a], "mean")


def test_group_advantages():
    groups = [[1.0, 0.0, 0.0], [0.1, 0.1, 0.1], [3.0, 1.0, 2.0], [-1.0, 5.0, 0.5]]
    rewards = torch.tensor(sum(groups, []), dtype=torch.float64)
    flat = sum(groups, [])
    for scale in ("none", "group", "batch"):
        adv, zero_var = group_advantages(rewards, 3, scale)
        assert zero_var.tolist() == [False, True, False, False]
        want = []
        for grp in groups:
            mean = sum(grp) / 3
            std = {"none": None, "group": statistics.stdev(grp), "batch": statistics.stdev(flat)}
            for r in grp:
                d = 0.0 if len(set(grp)) == 1 else r - mean
                want.append(d if scale == "none" else d / (std[scale] + 1e-4))
        torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
        assert (adv[3:6] == 0).all()  # exactly: 0.1 - mean(0.1, 0.1, 0.1) is 1e-17 in floats
        for i in range(0, 12, 3):
            assert abs(float(adv[i : i + 3].sum())) < 1e-12
    assert group_advantages(rewards, 3, "group")[0][0] == pytest.approx(
        (1 - 1 / 3) / (math.sqrt(1 / 3) + 1e-4)
    )
    with pytest.raises(ValueError):
        group_advantages(rewards, 5)
    with pytest.raises(ValueError):
        group_advantages(rewards, 3, "std")


TRL_MODES = {  # TRL loss_type -> our aggregation, for one micro-batch on one process
    "dapo": "token_mean",
    "bnpo": "token_mean",
    "grpo": "seq_mean_token_mean",
    "dr_grpo": "seq_sum_const",
}


@pytest.mark.parametrize("loss_type", list(TRL_MODES))
def test_matches_trl_grpo_loss(loss_type):
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    g = torch.Generator().manual_seed(6)
    s, t = 6, 8
    old = -torch.rand(s, t, generator=g, dtype=torch.float64) * 3
    lp0 = old + torch.randn(s, t, generator=g, dtype=torch.float64) * 0.4
    ref = old + torch.randn(s, t, generator=g, dtype=torch.float64) * 0.4
    mask = torch.arange(t)[None, :] < torch.tensor([8, 3, 5, 1, 7, 6])[:, None]
    adv = torch.tensor([1.0, -0.6, 0.3, -1.4, -0.2, 0.8], dtype=torch.float64)
    beta, delta = 0.05, 0.1

    x = lp0.clone().requires_grad_()
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (x, torch.zeros_like(x), None),
        get_off_policy_mask=trl_grpo.GRPOTrainer.get_off_policy_mask,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=delta,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        max_completion_length=MAX_LEN,
        _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(
            num_processes=1,
            gather=lambda a: a,
            gather_for_metrics=lambda a: a,
            reduce=lambda a, reduction: a,
            sync_gradients=True,
        ),
    )
    inputs = dict(
        prompt_ids=torch.zeros(s, 0, dtype=torch.long),
        prompt_mask=torch.zeros(s, 0),
        completion_ids=torch.zeros(s, t, dtype=torch.long),
        completion_mask=mask.double(),
        advantages=adv,
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        num_items_in_batch=mask.sum().double(),
    )
    want = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    (want_grad,) = torch.autograd.grad(want, x)

    agg = TRL_MODES[loss_type]
    y = lp0.clone().requires_grad_()
    loss, _ = grpo_loss(
        y,
        old,
        adv,
        mask,
        ref_logp=ref,
        kl_coef=beta,
        offpolicy_delta=delta,
        agg=agg,
        denom=global_denominator([mask], agg, max_len=MAX_LEN),
    )
    (grad,) = torch.autograd.grad(loss, y)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-10)

"""The GRPO objective as DeepSeek-V3.2 runs it: token log-probabilities, the clipped policy
term with its KL penalty, the global denominator, and group advantages.

Per loss token t of sequence i, with r = π_θ/π_old at the sampled token (π_old is the
sampler's own probability, renormalised over the kept set of its top-k/top-p truncation;
the same set is applied to π_θ, "keep sampling mask", so r = 1 exactly at θ = θ_old):

    pg  = −min(r·A_i, clip(r, 1−ε_lo, 1+ε_hi)·A_i) · M_i
    kl  = β_i · r · (π_ref/π_θ − log(π_ref/π_θ) − 1)
    M_i = 0 iff A_i < 0 and mean_t log(π_old/π_θ) > δ   (off-policy sequence masking)

    token_mean, seq_sum_const:  L = Σ_i Σ_t (pg + kl) / D
    seq_mean_token_mean:        L = Σ_i (Σ_t (pg + kl) / n_i) / D

D is global: the loss tokens, the sequences, or sequences × max_len of the whole optimizer
step (every micro-batch on every rank). It depends only on the loss masks, so it is known
before any forward pass; each micro-batch then returns its own sum over D and the summed
gradient is exactly the whole batch's, however the batch is split. A per-micro-batch
mean would weight a token by the size of the micro-batch it happened to land in.

**r carries gradient in the KL term.** With y ~ π_old (one position, given its prefix),
E[r·k3] = Σ_y π_θ·k3 = KL(π_θ‖π_ref), and because π_old does not depend on θ the expected
gradient is ∇KL exactly: per sample ∇(r·k3) = r·log(π_θ/π_ref)·∇log π_θ, whose π_old
expectation is Σ π_θ log(π_θ/π_ref) ∇log π_θ = ∇KL(π_θ‖π_ref). With r detached the
expectation is Σ π_θ ∇k3 = −Σ π_ref ∇log π_θ = ∇KL(π_ref‖π_θ), the other direction; the
plain K3 (no r) gives Σ π_old (1 − π_ref/π_θ) ∇log π_θ, neither.

**M masks the policy term only.** M keeps a negative-advantage sequence that the policy
has already moved away from out of the policy gradient, where its clipped ratio would
push it further still. The KL term is importance weighted, so it stays unbiased on
off-policy samples; dropping sequences picked by their own ratio and advantage would bias
that estimate. V3.2 applies M inside the policy
term and adds the KL outside it (as TRL's ``off_policy_mask_threshold`` does).
"""

from __future__ import annotations

import torch
from torch import Tensor

RL_LOSS_VERSION = "1"
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum_const")
ADVANTAGE_SCALES = ("none", "group", "batch")


def compute_dtype(t: Tensor) -> torch.dtype:
    """fp32, or fp64 where the input already is (the tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def token_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, kept: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Log-probability [N] of ``targets`` [N] under softmax(``logits`` [N, V] / temperature),
    and that distribution's entropy [N], in fp32 whatever the logits' dtype
    (:func:`logprob_stats` without the normaliser)."""
    logp, entropy, _ = logprob_stats(logits, targets, temperature, kept)
    return logp, entropy


def logprob_stats(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, kept: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probability [N] of ``targets`` [N] under softmax(``logits`` [N, V] / temperature),
    that distribution's entropy [N], and its log-normaliser (log-sum-exp) [N], in fp32
    whatever the logits' dtype. The LM head's hand-written backward
    (:mod:`distill.rl.head`) keeps the normaliser instead of the logits.

    ``kept`` [N, K] (distinct token ids, padded with -1) is the set the sampler's top-k/top-p
    truncation kept at each position: the distribution is then renormalised over it, from
    the gathered [N, K] logits only, with no [N, V] float copy. A target outside its row's
    kept set has probability 0 (logp = -inf); the sampler never draws one.

    The entropy is detached (a statistic): taking its gradient would keep another [N, V].
    """
    dt = compute_dtype(logits)
    t = targets[:, None].long()
    if kept is None:
        z = logits.to(dt)
        if temperature != 1.0:
            # a fresh fp32 copy (bf16 logits) is divided in place; never the caller's tensor
            z = z.div_(temperature) if z is not logits else z / temperature
        lse = torch.logsumexp(z, -1)
        logp = z.gather(1, t).squeeze(1) - lse
        with torch.no_grad():
            p = (z - lse[:, None]).exp_()
            entropy = torch.special.entr(p, out=p).sum(-1)  # entr(0) = 0 where a logit is -inf
        return logp, entropy, lse
    valid = kept >= 0
    zk = logits.gather(1, kept.clamp(min=0).long()).to(dt) / temperature
    zk = zk.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(zk, -1)
    zt = logits.gather(1, t).to(dt).squeeze(1) / temperature
    in_kept = ((kept == t) & valid).any(-1)
    logp = torch.where(in_kept, zt - lse, float("-inf"))
    with torch.no_grad():
        # a row with no kept id (padding) has lse = -inf: entropy 0, not nan
        entropy = torch.special.entr((zk - lse[:, None]).exp()).sum(-1).nan_to_num(0.0)
    return logp, entropy, lse


def global_denominator(masks: list[Tensor], agg: str, max_len: int | None = None) -> float:
    """D from every micro-batch's loss mask ([S, T] bool) of one optimizer step on this rank;
    the caller sums it across ranks. token_mean: loss tokens; seq_mean_token_mean: sequences
    with at least one loss token; seq_sum_const (Dr. GRPO): those sequences × ``max_len``
    (the completion length limit). "Sequences" never counts empty padding rows, so padding a
    micro-batch with them changes nothing."""
    if agg == "token_mean":
        return float(sum(m.sum() for m in masks))  # one device sync, not one per micro-batch
    n_seq = int(sum(m.bool().any(-1).sum() for m in masks))
    if agg == "seq_mean_token_mean":
        return float(n_seq)
    if agg == "seq_sum_const":
        if max_len is None:
            raise ValueError("seq_sum_const needs max_len (the completion length limit)")
        return float(n_seq * max_len)
    raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    kl_coef: float | Tensor = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    offpolicy_delta: float | None = None,
    agg: str = "token_mean",
    denom: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the loss in the module docstring, and its statistics.

    ``logp`` [S, T] carries the gradient; ``old_logp``, ``ref_logp`` [S, T], ``adv`` [S] and
    ``kl_coef`` (a float, or β per sequence [S]) are treated as constants; ``mask`` [S, T]
    marks loss tokens (padding may hold anything, -inf included). ``denom`` is
    :func:`global_denominator` of the whole step, so summing every micro-batch's loss gives
    the whole-batch loss and gradient.

    Stats are detached sums and counts, to add across micro-batches and ranks: tokens, seqs
    (with a loss token), masked_seqs (M = 0), clipped_tokens (loss tokens of kept sequences
    whose clip zeroes the gradient: r > 1+ε_hi with A > 0, r < 1−ε_lo with A < 0),
    ratio_outside_0.9_1.1, pg_loss_sum and kl_sum (Σ r·k3 over loss tokens, without β; only
    with ``ref_logp``), and ``ratios``, the loss tokens' r, for percentiles.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")
    if ref_logp is None and (isinstance(kl_coef, Tensor) or kl_coef != 0.0):
        raise ValueError("kl_coef is set but ref_logp is None")
    dt = compute_dtype(logp)
    m = mask.bool()
    n_tok = m.sum(-1)
    # padding is zeroed before exp, so neither inf nor nan reaches the backward pass
    logp = torch.where(m, logp.to(dt), 0.0)
    old = torch.where(m, old_logp.detach().to(dt), 0.0)
    a = adv.detach().to(dt)[:, None]

    r = torch.exp(logp - old)
    pg = -torch.minimum(r * a, r.clamp(1 - clip_low, 1 + clip_high) * a)
    keep = torch.ones_like(n_tok, dtype=torch.bool)
    if offpolicy_delta is not None:
        div = (old - logp.detach()).sum(-1) / n_tok.clamp(min=1)
        keep = ~((a[:, 0] < 0) & (div > offpolicy_delta))
    pg = pg * keep[:, None]
    term = pg
    kl = None
    if ref_logp is not None:
        d = torch.where(m, ref_logp.detach().to(dt), 0.0) - logp
        kl = r * (d.exp() - d - 1)  # r keeps its gradient: see the module docstring
        beta = torch.as_tensor(kl_coef, dtype=dt, device=logp.device)
        term = term + (beta[:, None] if beta.ndim == 1 else beta) * kl
    term = torch.where(m, term, 0.0)

    if agg == "seq_mean_token_mean":
        total = (term.sum(-1) / n_tok.clamp(min=1)).sum()
    else:
        total = term.sum()
    # an empty global batch has every term zero: return 0, not 0/0
    loss = total / (denom if denom > 0 else 1.0)

    with torch.no_grad():
        clipped = ((r > 1 + clip_high) & (a > 0)) | ((r < 1 - clip_low) & (a < 0))
        stats = {
            "tokens": n_tok.sum(),
            "seqs": (n_tok > 0).sum(),
            "masked_seqs": (~keep & (n_tok > 0)).sum(),
            "clipped_tokens": (clipped & m & keep[:, None]).sum(),
            "ratio_outside_0.9_1.1": (((r < 0.9) | (r > 1.1)) & m).sum(),
            "pg_loss_sum": torch.where(m, pg, 0.0).sum(),
            "ratios": r[m],
        }
        if kl is not None:
            stats["kl_sum"] = torch.where(m, kl, 0.0).sum()
    return loss, stats


def group_advantages(
    rewards: Tensor, group_size: int, scale: str = "none"
) -> tuple[Tensor, Tensor]:
    """Advantages [B*G] = reward − its group's mean, for ``rewards`` [B*G] ordered group by
    group, and zero_var [B]: groups whose rewards are all equal (their advantages are exactly
    0, so they carry no policy gradient). ``scale``: 'none' (V3.2, Dr. GRPO), 'group' (÷ group
    std + 1e-4, the GRPO paper), 'batch' (÷ std of all the rewards given + 1e-4: pass the
    whole gathered batch). Stds are unbiased, as in TRL."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {ADVANTAGE_SCALES}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.detach().to(compute_dtype(rewards)).reshape(-1, group_size)
    adv = g - g.mean(-1, keepdim=True)
    zero_var = (g == g[:, :1]).all(-1)
    if scale == "group":
        adv = adv / (g.std(-1, keepdim=True) + 1e-4)
    elif scale == "batch":
        adv = adv / (g.std() + 1e-4)
    # equal rewards whose float mean is off by an ulp give exactly 0, not ±1e-17 / 1e-4
    adv = adv.masked_fill(zero_var[:, None], 0.0)
    return adv.reshape(-1), zero_var

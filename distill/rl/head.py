"""The LM head's log-probability of each sampled token, with its gradient written by hand.

Through autograd, ``token_logprobs(head(h), ...)`` keeps or recomputes a handful of
[tokens, vocab] tensors per chunk (the logits, their fp32 copy, the softmax, the gather's
scattered gradient, the cast back), each 1.2 GB for 2,048 tokens of a 151,936-word vocabulary:
on a GPU the head's memory traffic, not its matmuls, was most of its time. Here the
forward keeps only h and each row's log-sum-exp, and the backward recomputes the logits
once and turns them in place into their gradient, (onehot(target) − softmax) · g / T
(over the kept set when the sampler truncated), before the two matmuls. On CUDA the
elementwise parts are compiled, so each is one pass over the bf16 logits.

The values are :func:`distill.rl.loss.logprob_stats` (the same function as
``token_logprobs``): log π(target) under softmax(logits / T), renormalised over ``kept``
when given, and the (detached) entropy of that distribution; the gradients equal
autograd's through it (tested in fp64).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.rl.loss import compute_dtype, logprob_stats

log = logging.getLogger(__name__)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    z = logits.to(compute_dtype(logits))  # no copy when already fp32/fp64
    return z / temperature if temperature != 1.0 else z


def _dense_grad(logits: Tensor, targets: Tensor, lse: Tensor, g: Tensor, temperature: float):
    """d(Σ g · logp)/d logits = g · (onehot(target) − softmax(z)) / T, in the logits' dtype
    (written in place: one [N, V] buffer besides the logits)."""
    gt = g / temperature
    p = (_scaled(logits, temperature) - lse[:, None]).exp_().mul_(-gt[:, None])
    p.scatter_add_(1, targets[:, None], gt[:, None].to(p.dtype))
    return p.to(logits.dtype)


def _kept_grad(logits: Tensor, targets: Tensor, kept: Tensor, lse: Tensor, g: Tensor,
               temperature: float) -> Tensor:  # fmt: skip
    valid = kept >= 0
    zk = logits.gather(1, kept.clamp(min=0)).to(compute_dtype(logits)) / temperature
    pk = torch.where(valid, torch.exp(zk - lse[:, None]), 0.0).nan_to_num(0.0)
    hit = ((kept == targets[:, None]) & valid).to(pk.dtype)
    # a target outside the kept set has logp = -inf and no gradient (the sampler never draws one)
    g = torch.where(hit.any(-1), g, 0.0)
    gk = (hit - pk) * (g[:, None] / temperature)
    out = torch.zeros(logits.shape, dtype=gk.dtype, device=logits.device)
    return out.scatter_add_(1, kept.clamp(min=0), gk).to(logits.dtype)


# the values are token_logprobs' own (logprob_stats); only the gradient is written here
_EAGER = {"stats": logprob_stats, "dense_grad": _dense_grad, "kept_grad": _kept_grad}
_compiled: dict[str, object] = {}


def _fn(name: str, device: torch.device):
    """The elementwise helper ``name``, compiled on CUDA (once per process; eager if
    compiling fails, with a warning)."""
    eager = _EAGER[name]
    if device.type != "cuda" or _compiled.get(name) is False:
        return eager
    if name not in _compiled:
        _compiled[name] = torch.compile(eager, dynamic=True)
    compiled = _compiled[name]

    def run(*args):
        try:
            return compiled(*args)
        except Exception as e:  # noqa: BLE001 (any compiler failure: go on, eagerly)
            log.warning("torch.compile of %s failed, running it eagerly: %s", name, str(e)[:300])
            _compiled[name] = False
            return eager(*args)

    return run


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, kept, temperature):
        with torch.no_grad():
            logits = F.linear(h, weight, bias)
            logp, ent, lse = _fn("stats", h.device)(logits, targets, temperature, kept)
        ctx.save_for_backward(h, weight, bias, targets, kept, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, _g_ent):
        h, weight, bias, targets, kept, lse = ctx.saved_tensors
        t = ctx.temperature
        with torch.no_grad():
            logits = F.linear(h, weight, bias)
            g = g_logp.to(lse.dtype)
            if kept is None:
                gz = _fn("dense_grad", h.device)(logits, targets, lse, g, t)
            else:
                gz = _fn("kept_grad", h.device)(logits, targets, kept, lse, g, t)
            del logits
            need = ctx.needs_input_grad
            gh = gz @ weight if need[0] else None
            gw = gz.t() @ h if need[1] else None
            gb = gz.sum(0) if bias is not None and need[2] else None
        return gh, gw, gb, None, None, None


def head_logprobs(
    h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
    kept: Tensor | None = None, temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Log-probability [N] of ``targets`` [N] under softmax((h @ weightᵀ + bias) / T), over
    ``kept`` [N, K] (ids padded with -1) when given, and the detached entropy [N]; both
    in fp32 (fp64 for fp64 inputs)."""
    return _HeadLogprobs.apply(
        h, weight, bias, targets.long(), None if kept is None else kept.long(), float(temperature)
    )

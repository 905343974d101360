"""The training objective: per-domain weighted token cross-entropy and top-k logit KD.

``L = Σ_i w_d(i) ℓ_i / Σ_i w_d(i)`` over every loss token of the global batch. The
denominator is known before any forward pass (it depends only on the batch's loss masks
and domains), so each micro-batch contributes ``Σ w ℓ / norm`` and the accumulated
gradient is exactly that of the whole batch, however it is split across micro-batches
and ranks.

Without KD, training uses a fused LM head (:class:`LinearCE`): logits in chunks of
``FUSED_CHUNK`` tokens, in the autocast dtype, with both gradients taken in forward, so
the backward pass neither keeps nor recomputes logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LOSS_VERSION = "1"
LOGIT_CHUNK = 8192  # loss tokens per LM-head chunk: bounds logits memory at large vocabularies
FUSED_CHUNK = 2048  # the fused head's chunk: 2048 x 151,936 bf16 logits are 0.6 GB
FUSED_CE = True  # False: the chunked, checkpointed head that KD uses (for benchmarks)


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32; ``logits`` [N, V], ``targets`` [N]."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def topk_kl(
    logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token KL(teacher || student) over the teacher's top-k plus one tail bucket.

    ``teacher_ids`` [N, K] (-1 = no entry) and ``teacher_logprobs`` [N, K] are what the
    teacher reported; its remaining mass ``1 - Σ exp(logprobs)`` is one bucket, compared
    with the student's mass outside those ids. ``temperature`` divides the student logits.
    """
    z = logits.float() / temperature
    logz = torch.logsumexp(z, dim=-1, keepdim=True)
    valid = teacher_ids >= 0
    # pad entries point at the row's first id: scattering -inf twice at one place is harmless
    ids = torch.where(valid, teacher_ids, teacher_ids[:, :1].clamp(min=0)).long()
    log_q = torch.gather(z, 1, ids) - logz
    lp = torch.where(valid, teacher_logprobs.float(), torch.zeros_like(log_q))
    p = torch.where(valid, lp.exp(), torch.zeros_like(log_q))
    head = (p * (lp - log_q)).sum(-1)
    has_any = valid.any(-1, keepdim=True)
    z_tail = torch.where(has_any, z.scatter(1, ids, float("-inf")), z)
    log_q_tail = torch.logsumexp(z_tail, dim=-1) - logz.squeeze(-1)
    p_tail = (1.0 - p.sum(-1)).clamp(min=0.0)
    tail = torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    return head + tail


def ce_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of ``logits`` [N, V] in fp32, and the gradient of
    ``Σ scale · ce`` with respect to the logits, ``scale · (softmax − onehot)``, in the
    logits' dtype. Three passes over [N, V] in eager mode (log-softmax, exp, scale); under
    ``train.torch_compile`` the trainer compiles :func:`ce_and_grad_pointwise` instead."""
    lp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    ce = -lp.gather(1, targets[:, None]).squeeze(1)
    p = lp.exp_()
    p.scatter_add_(1, targets[:, None], torch.full_like(ce[:, None], -1.0))
    grad = torch.empty_like(logits)
    torch.mul(p, scale[:, None], out=grad)
    return ce, grad


def ce_and_grad_pointwise(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ce_and_grad` written for torch.compile: a logsumexp and one pointwise
    expression (the one-hot an index comparison, not a scatter), which inductor fuses
    into one reduction kernel that keeps nothing in fp32 (18 against 30 ms a step for the
    compiled :func:`ce_and_grad` on the H200 benchmark). Eager, it would materialise
    several fp32 copies of the logits: there :func:`ce_and_grad` is the faster form."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    ce = lse.squeeze(1) - x.gather(1, targets[:, None]).squeeze(1)
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    grad = (torch.exp(x - lse) - onehot.to(x.dtype)) * scale[:, None]
    return ce, grad.to(logits.dtype)


_MM_OUT_DTYPE = [True]  # torch.addmm(out_dtype=) works here; cleared at its first failure


def _add_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc``, without rounding a bf16 product first where
    the backend can (CUDA, torch >= 2.8)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE[0] = False
    acc.add_(a @ b)


class LinearCE(torch.autograd.Function):
    """``Σ scale · CE(hidden @ weightᵀ, targets)`` and the per-token CE, chunk by chunk.

    Both gradients are computed in forward (they need only this chunk's softmax), kept,
    and scaled by the incoming gradient in backward: no logits are stored or recomputed.
    Under autocast the matmuls run in the autocast dtype; the CE is fp32 and the weight
    gradient is accumulated in the weight's dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, ce_fn):
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(dev, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros_like(weight) if need_w else None
            ces = [torch.zeros(0, device=hidden.device)]
            for s in range(0, h.shape[0], FUSED_CHUNK):
                sl = slice(s, s + FUSED_CHUNK)
                ce, g = ce_fn(h[sl] @ w.t(), targets[sl], scale[sl])
                if need_h:
                    torch.mm(g, w, out=grad_h[sl])
                if need_w:
                    _add_mm(grad_w, g.t(), h[sl])
                ces.append(ce)
            ce = torch.cat(ces)
            total = (ce * scale).sum()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(ce)
        return total, ce

    @staticmethod
    def backward(ctx, grad_total, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h.to(ctx.hidden_dtype) * grad_total
        gw = None if grad_w is None else grad_w.mul_(grad_total)
        return gh, gw, None, None, None


def _chunk_losses(lm_head, hidden, targets, kd_ids, kd_lp, alpha: float, temperature: float):
    logits = lm_head(hidden)
    ce = token_ce(logits, targets)
    if kd_ids is None:
        return ce, ce
    kl = topk_kl(logits, kd_ids, kd_lp, temperature)
    return (1 - alpha) * ce + alpha * kl, ce


class Objective(nn.Module):
    """The model plus its loss, in one forward so DDP/FSDP see every parameter use.

    Logits are computed only at loss positions, in chunks (fused with their gradient in
    training, see :class:`LinearCE`; recomputed in backward under KD), so a 150k
    vocabulary costs no [tokens x vocab] activation for prompt tokens. A batch with
    ``cu_seqlens`` is one flattened row: the boundaries go to every attention layer,
    ``max_seqlen`` (a bound on every segment) with them.
    """

    def __init__(
        self,
        model: nn.Module,
        kd_alpha: float = 0.0,
        kd_temperature: float = 1.0,
        max_seqlen: int | None = None,
    ):
        super().__init__()
        self.model = model
        self.kd_alpha = kd_alpha
        self.kd_temperature = kd_temperature
        self.max_seqlen = max_seqlen
        self.ce_fn = ce_and_grad  # the trainer swaps in a compiled one under train.torch_compile

    @property
    def _no_split_modules(self) -> list[str] | None:
        # FSDP's transformer wrap policy reads the prepared module's layer classes: the
        # wrapped model's (Llama, Qwen2, DSA ... layers), not a name fixed in a config file
        return getattr(self.model, "_no_split_modules", None)

    def forward(
        self,
        input_ids,
        position_ids,
        loss_pos,
        targets,
        weights,
        domain,
        n_domains: int,
        norm,
        kd_ids=None,
        kd_lp=None,
        cu_seqlens=None,
    ):
        body = self.model.get_decoder()
        segs = {}
        if cu_seqlens is not None:
            # a constant bound keeps compiled layers from specialising on each batch's longest
            m = self.max_seqlen or int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
            segs = dict(
                cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=m, max_length_k=m
            )
        hidden = body(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, **segs
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[loss_pos]
        head = self.model.get_output_embeddings()
        fused = (
            FUSED_CE
            and kd_ids is None
            and self.training
            and torch.is_grad_enabled()
            and getattr(head, "bias", None) is None
        )
        if fused:
            total, ce = LinearCE.apply(hidden, head.weight, targets, weights / norm, self.ce_fn)
        else:
            total, ce = self._chunked(head, hidden, targets, weights, norm, kd_ids, kd_lp)
        dom_loss = torch.zeros(n_domains, device=ce.device).index_add_(0, domain, ce)
        dom_tokens = torch.zeros(n_domains, device=ce.device).index_add_(
            0, domain, torch.ones_like(ce)
        )
        return total, dom_loss, dom_tokens

    def _chunked(self, head, hidden, targets, weights, norm, kd_ids, kd_lp):
        losses, ces = [], []
        for s in range(0, hidden.shape[0], LOGIT_CHUNK):
            sl = slice(s, s + LOGIT_CHUNK)
            args = (
                head,
                hidden[sl],
                targets[sl],
                None if kd_ids is None else kd_ids[sl],
                None if kd_lp is None else kd_lp[sl],
                self.kd_alpha,
                self.kd_temperature,
            )
            if self.training and hidden.shape[0] > LOGIT_CHUNK:
                loss, ce = checkpoint(_chunk_losses, *args, use_reentrant=False)
            else:
                loss, ce = _chunk_losses(*args)
            losses.append(loss)
            ces.append(ce)
        total = (torch.cat(losses) * weights).sum() / norm
        return total, torch.cat(ces).detach()

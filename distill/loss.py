"""The training objective: per-domain weighted token cross-entropy and top-k logit KD.

``L = Σ_i w_d(i) ℓ_i / Σ_i w_d(i)`` over every loss token of the global batch. The
denominator is known before any forward pass (it depends only on the batch's loss masks
and domains), so each micro-batch contributes ``Σ w ℓ / norm`` and the accumulated
gradient is exactly that of the whole batch, however it is split across micro-batches
and ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LOSS_VERSION = "1"
LOGIT_CHUNK = 8192  # loss tokens per LM-head chunk: bounds logits memory at large vocabularies


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


def _chunk_losses(lm_head, hidden, targets, kd_ids, kd_lp, alpha: float, temperature: float):
    logits = lm_head(hidden)
    ce = token_ce(logits, targets)
    if kd_ids is None:
        return ce, ce
    kl = topk_kl(logits, kd_ids, kd_lp, temperature)
    return (1 - alpha) * ce + alpha * kl, ce


class Objective(nn.Module):
    """The model plus its loss, in one forward so DDP/FSDP see every parameter use.

    Logits are computed only at loss positions, in chunks recomputed in backward, so a
    150k vocabulary costs no [tokens x vocab] activation for prompt tokens.
    """

    def __init__(self, model: nn.Module, kd_alpha: float = 0.0, kd_temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.kd_alpha = kd_alpha
        self.kd_temperature = kd_temperature

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
    ):
        body = self.model.get_decoder()
        hidden = body(
            input_ids=input_ids, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[loss_pos]
        head = self.model.get_output_embeddings()
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
        tok_loss = torch.cat(losses)
        ce = torch.cat(ces).detach()
        total = (tok_loss * weights).sum() / norm
        dom_loss = torch.zeros(n_domains, device=ce.device).index_add_(0, domain, ce)
        dom_tokens = torch.zeros(n_domains, device=ce.device).index_add_(
            0, domain, torch.ones_like(ce)
        )
        return total, dom_loss, dom_tokens

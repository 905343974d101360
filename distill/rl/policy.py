"""The policy's log-probabilities of sampled tokens, as the GRPO loss needs them.

:class:`PolicyLogprobs` wraps the causal LM so that one forward returns, for every
completion token of a micro-batch, log π_θ(token) under the sampling temperature and
renormalised over the sampler's kept set. It is the module accelerate prepares (DDP
sees one forward), while decoding uses the bare model: both read the same parameters.
The LM head runs only on completion positions, in chunks whose logits are recomputed in
backward (:mod:`distill.rl.head`, the gradient written by hand), so the [tokens, vocab]
logits never exist for a whole micro-batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from distill.dsa.config import is_dsa
from distill.models import enable_checkpointing
from distill.rl.head import head_logprobs
from distill.rl.loss import token_logprobs
from distill.rl.rollout import Sample
from distill.train.setup import compile_decoder_layers

HEAD_CHUNK = 2048  # completion tokens per LM-head chunk


@dataclass
class MicroBatch:
    """Right-padded rows of prompt + completion, and where the completion tokens are."""

    input_ids: Tensor  # [S, T]
    attention_mask: Tensor  # [S, T]
    rows: Tensor  # [N] row of each completion token
    cols: Tensor  # [N] position whose logits predict it (its own position − 1)
    targets: Tensor  # [N]
    kept: Tensor | None  # [N, K] kept ids padded with -1; None without truncation
    old_logp: Tensor  # [S, Tc]
    mask: Tensor  # [S, Tc] bool: loss tokens
    slots: Tensor  # [S, Tc] long: index into the flat [N] tokens (or 0 where masked)
    adv: Tensor  # [S]
    domains: list[str]


def make_micro_batch(samples: list[Sample], pad_id: int, device: torch.device) -> MicroBatch:
    """Pack ``samples`` into one micro-batch on ``device``."""
    width = max(len(s.prompt_ids) + len(s.token_ids) for s in samples)
    tc = max(len(s.token_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(samples), width), dtype=torch.long)
    old = torch.zeros((len(samples), tc))
    mask = torch.zeros((len(samples), tc), dtype=torch.bool)
    slots = torch.zeros((len(samples), tc), dtype=torch.long)
    rows, cols, targets, kept = [], [], [], []
    truncated = any(s.kept is not None for s in samples)
    for i, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.token_ids)
        ids[i, : p + c] = torch.tensor(s.prompt_ids + s.token_ids)
        att[i, : p + c] = 1
        old[i, :c] = torch.tensor(s.old_logp)
        mask[i, :c] = s.loss
        slots[i, :c] = torch.arange(len(targets), len(targets) + c)
        rows += [i] * c
        cols += range(p - 1, p + c - 1)
        targets += s.token_ids
        if truncated:
            kept += s.kept if s.kept is not None else [[t] for t in s.token_ids]
    kept_t = None
    if truncated:
        k = max(len(x) for x in kept)
        kept_t = torch.full((len(kept), k), -1, dtype=torch.long)
        for j, x in enumerate(kept):
            kept_t[j, : len(x)] = torch.tensor(x)
    to = dict(device=device)
    return MicroBatch(
        input_ids=ids.to(**to),
        attention_mask=att.to(**to),
        rows=torch.tensor(rows, **to),
        cols=torch.tensor(cols, **to),
        targets=torch.tensor(targets, **to),
        kept=kept_t.to(**to) if kept_t is not None else None,
        old_logp=old.to(**to),
        mask=mask.to(**to),
        slots=slots.to(**to),
        adv=torch.tensor([s.advantage for s in samples], **to),
        domains=[s.domain for s in samples],
    )


class PolicyLogprobs(nn.Module):
    """``forward(mb, temperature)`` → (logp [S, Tc], entropy [S, Tc]) of the sampled tokens."""

    def __init__(
        self,
        model: nn.Module,
        checkpointing: bool = False,
        fused_head: bool = True,
        compile_layers: bool = False,
    ):
        super().__init__()
        self.model = model
        # the hand-written head reads the head's weight directly; FSDP, which gathers a
        # sharded weight in the head module's own hooks, takes the autograd path (False)
        self.fused_head = fused_head
        if checkpointing:
            enable_checkpointing(model)
        compiled = compile_layers and compile_decoder_layers(model)
        # transformers' checkpointing runs in training mode only (forward switches to it);
        # compiled layers checkpoint themselves in any mode (compile_decoder_layers)
        self.checkpointing = checkpointing and not compiled

    @property
    def _no_split_modules(self) -> list[str] | None:
        # FSDP wraps the model's own decoder layers (see distill.train.loss.Objective)
        return getattr(self.model, "_no_split_modules", None)

    def forward(self, mb: MicroBatch, temperature: float) -> tuple[Tensor, Tensor]:
        body = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        # transformers checkpoints its layers only in training mode; the model stays in eval
        # mode otherwise, so that generate() on it keeps its KV cache
        recompute = self.checkpointing and torch.is_grad_enabled() and not body.training
        if recompute:
            body.train()
        try:
            hidden = body(
                input_ids=mb.input_ids, attention_mask=self._mask(mb), use_cache=False
            ).last_hidden_state
        finally:
            if recompute:
                body.eval()
        h = hidden[mb.rows, mb.cols]  # [N, H]: only positions that predict a completion token
        logps, ents = [], []
        fused = self.fused_head and type(head) is nn.Linear
        for a in range(0, h.shape[0], HEAD_CHUNK):
            sl = slice(a, a + HEAD_CHUNK)
            kept = mb.kept[sl] if mb.kept is not None else None
            if fused:
                lp, ent = head_logprobs(
                    h[sl], head.weight, head.bias, mb.targets[sl], kept, temperature
                )
            else:
                args = (h[sl], mb.targets[sl], kept)
                fn = _HeadChunk(head, temperature)
                lp, ent = (
                    checkpoint(fn, *args, use_reentrant=False) if h.requires_grad else fn(*args)
                )
            logps.append(lp)
            ents.append(ent)
        flat_lp, flat_ent = torch.cat(logps), torch.cat(ents)
        return flat_lp[mb.slots], flat_ent[mb.slots]

    def _mask(self, mb: MicroBatch) -> Tensor | None:
        """None for a standard decoder: rows are right-padded, so causal attention alone
        gives every real position exactly its row's keys (padding only ever follows them),
        and SDPA takes its causal flash kernel instead of a masked one. A DSA model builds
        its selection from the mask, and gets it."""
        return mb.attention_mask if is_dsa(self.model) else None


class _HeadChunk:
    def __init__(self, head: nn.Module, temperature: float):
        self.head, self.temperature = head, temperature

    def __call__(self, h: Tensor, targets: Tensor, kept: Tensor | None):
        return token_logprobs(self.head(h), targets, self.temperature, kept)


class AdapterOff:
    """The reference policy of a LoRA run: the policy's own modules with its adapters
    switched off, i.e. the model it started from (the adapters' B starts at 0), so the KL
    term needs no second copy of the model. Called like :class:`PolicyLogprobs`, under
    ``torch.no_grad``."""

    def __init__(self, peft_model, policy: PolicyLogprobs):
        self.peft_model, self.policy = peft_model, policy

    def __call__(self, mb: MicroBatch, temperature: float) -> tuple[Tensor, Tensor]:
        with self.peft_model.disable_adapter():
            return self.policy(mb, temperature)

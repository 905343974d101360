"""Token sampling that depends only on (row seed, step): counter-based Gumbel noise.

A row's output is then the same whatever batch it is decoded in (and after a resume),
which per-batch ``torch.Generator`` state cannot give. The noise of a token is a pure
function of (seed, step, token id), so it can be computed for a few candidates (after
top-k) or for the whole vocabulary with the same result.

:func:`draw` also returns what an RL trainer needs: the sampled token's log-probability
under the distribution it was drawn from (softmax(logits / temperature) renormalised over
the kept set of the top-k/top-p truncation) and that kept set.
"""

from __future__ import annotations

import torch
from torch import Tensor

# With sampler_logprobs, top_p < 1 and no top_k, the nucleus is looked for among this
# many most likely tokens (with the probabilities of the whole vocabulary): a recorded
# kept set must fit a fixed width on the GPU. A wider nucleus is cut to these tokens, and
# the record says so (its kept set is the tokens actually kept).
KEPT_MAX = 1024


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_C1, _C2 = _signed(0x9E3779B97F4A7C15), _signed(0xD1B54A32D192ED03)
_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic: it copies the sign)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def hash_uniform(seeds: Tensor, step: int | Tensor, tok: Tensor) -> Tensor:
    """Uniform (0, 1) floats from a splitmix64 hash of (seed, step, token id), for token ids
    ``tok`` [V] (every row) or [rows, K]; int64 arithmetic wraps, which is what the hash
    wants. ``step`` may be a 0-d device tensor (a captured graph's step counter)."""
    if isinstance(step, int):
        offset: int | Tensor = _signed(((step + 1) * _C1) % (1 << 64))
    else:
        offset = (step.to(torch.int64) + 1) * _C1  # wraps exactly like the int above
    tok = tok.to(torch.int64)
    z = seeds.to(torch.int64)[:, None] + offset + (tok[None, :] if tok.ndim == 1 else tok) * _C2
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    z = z ^ _shr(z, 31)
    bits = _shr(z, 40)
    return (bits.to(torch.float32) + 0.5) / float(1 << 24)


def uniform_noise(seeds: Tensor, step: int | Tensor, vocab: int) -> Tensor:
    """:func:`hash_uniform` of every token id: shape (rows, vocab)."""
    return hash_uniform(seeds, step, torch.arange(vocab, device=seeds.device))


def _gumbel(u: Tensor) -> Tensor:
    return -torch.log(-torch.log(u))


def kept_width(vocab: int, temperature: float, top_p: float, top_k: int, record: bool) -> int:
    """Candidates :func:`draw` keeps per row (0: the whole vocabulary, no kept set)."""
    if temperature <= 0:
        return 0
    if 0 < top_k < vocab:
        return top_k
    return min(KEPT_MAX, vocab) if record and top_p < 1.0 else 0


def draw(
    logits: Tensor,
    seeds: Tensor,
    step: int | Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    record: bool = False,
    vocab_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Next token per row [B]; with ``record`` also its log-probability [B] (fp32) under the
    sampling distribution and the kept set [B, K] (token ids, -1 where dropped; None when
    nothing is truncated).

    Greedy at temperature 0 (the log-probability is then softmax(logits)'s). Otherwise
    Gumbel-max over softmax(logits / temperature), truncated to the ``top_k`` most likely
    tokens first, then to the nucleus of ``top_p`` (renormalised over the top-k), as vLLM
    and transformers order them.

    ``vocab_ids`` (``arange(vocab)``) is for compiled callers: built inside a compiled
    graph, inductor folds the ids into an index expression times a 64-bit constant, which
    it miscompiles (seen on CPU, torch 2.13: wrong noise, then a crash); as data it is fine.
    """
    if temperature <= 0:
        tok = logits.argmax(-1)
        if not record:
            return tok, None, None
        z = logits.float()
        return tok, z.gather(-1, tok[:, None])[:, 0] - z.logsumexp(-1), None
    scaled = logits.float() / temperature
    k = kept_width(scaled.shape[-1], temperature, top_p, top_k, record)
    if k:
        vals, ids = scaled.topk(k, dim=-1)  # sorted, most likely first
        if top_p < 1.0:
            # a user's top_k renormalises; the KEPT_MAX cut keeps the vocabulary's probabilities
            norm = vals if 0 < top_k < scaled.shape[-1] else scaled
            probs = (vals - norm.logsumexp(-1, keepdim=True)).exp()
            vals = vals.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
        pick = (vals + _gumbel(hash_uniform(seeds, step, ids))).argmax(-1, keepdim=True)
        tok = ids.gather(-1, pick)[:, 0]
        if not record:
            return tok, None, None
        lp = vals.gather(-1, pick)[:, 0] - vals.logsumexp(-1)
        return tok, lp, ids.masked_fill(vals == float("-inf"), -1)
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    if vocab_ids is None:
        vocab_ids = torch.arange(scaled.shape[-1], device=scaled.device)
    tok = (scaled + _gumbel(hash_uniform(seeds, step, vocab_ids))).argmax(-1)
    if not record:
        return tok, None, None
    return tok, scaled.gather(-1, tok[:, None])[:, 0] - scaled.logsumexp(-1), None


def sample_next(
    logits: Tensor,
    seeds: Tensor,
    step: int | Tensor,
    temperature: float,
    top_p: float,
    top_k: int = 0,
) -> Tensor:
    """Next token per row: greedy at temperature 0, else Gumbel-max over the truncation."""
    return draw(logits, seeds, step, temperature, top_p, top_k)[0]

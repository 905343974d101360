"""Token sampling that depends only on (row seed, step): counter-based Gumbel noise.

A row's output is then the same whatever batch it is decoded in (and after a resume),
which per-batch ``torch.Generator`` state cannot give.
"""

from __future__ import annotations

import torch


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_C1, _C2 = _signed(0x9E3779B97F4A7C15), _signed(0xD1B54A32D192ED03)
_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic: it copies the sign)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def uniform_noise(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) floats of shape (rows, vocab) from a splitmix64 hash of
    (seed, step, token id); int64 arithmetic wraps, which is what the hash wants."""
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    offset = _signed(((step + 1) * _C1) % (1 << 64))
    z = seeds.to(torch.int64)[:, None] + offset + tok[None, :] * _C2
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    z = z ^ _shr(z, 31)
    bits = _shr(z, 40)
    return (bits.to(torch.float32) + 0.5) / float(1 << 24)


def sample_next(
    logits: torch.Tensor, seeds: torch.Tensor, step: int, temperature: float, top_p: float
) -> torch.Tensor:
    """Next token per row: greedy at temperature 0, else Gumbel-max over the nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, step, scaled.shape[-1])))
    return (scaled + gumbel).argmax(-1)

"""Rewards of one rollout: the domain verifier's score plus the recipe's shaping terms.

    r = score                                   the verifier (0..1)
        − overlong_penalty · ramp(len)          DAPO soft overlong: 0 up to limit − buffer,
                                                then linear to the full penalty at the limit
        − efficiency · len / limit   (passed)   token efficiency: shorter correct answers score
                                                higher; a wrong answer is never paid for brevity
        + length_group · λ                      Kimi k1.5's length reward, relative to the group:
                                                λ = 0.5 − (len − min) / (max − min) over the
                                                group's lengths; a wrong answer gets min(0, λ)

A completion cut at the limit is either scored 0 (``truncated: zero``) or kept with its
reward but given no loss (``truncated: mask``, DAPO's overlong filtering). Pure functions
with a version the lineage records: a changed reward is a changed experiment.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.recipe.rl import RewardConfig

REWARD_VERSION = "2"  # 2: the group-relative length reward


@dataclass(frozen=True)
class Reward:
    """The reward of one rollout and whether its tokens carry loss."""

    value: float
    loss: bool  # False: a truncated completion under ``truncated: mask``


def overlong_penalty(length: int, limit: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment (≥ 0, subtracted): 0 while ``length`` ≤ limit −
    buffer, growing linearly to ``penalty`` at ``limit`` (and staying there beyond it)."""
    if buffer <= 0 or length <= limit - buffer:
        return 0.0
    return penalty * min(1.0, (length - (limit - buffer)) / buffer)


def shaped_reward(
    score: float, passed: bool, length: int, limit: int, truncated: bool, cfg: RewardConfig
) -> Reward:
    """The reward of a rollout of ``length`` completion tokens out of ``limit``."""
    if truncated and cfg.truncated == "zero":
        return Reward(0.0, True)
    r = score - overlong_penalty(length, limit, cfg.overlong_buffer, cfg.overlong_penalty)
    if passed and cfg.efficiency:
        r -= cfg.efficiency * min(1.0, length / max(limit, 1))
    return Reward(r, not (truncated and cfg.truncated == "mask"))


def group_length_rewards(lengths: list[int], passed: list[bool], weight: float) -> list[float]:
    """Kimi k1.5's length reward for one group of completions of the same prompt, scaled by
    ``weight``: λ = 0.5 − (len − min) / (max − min), the shortest 0.5 and the longest −0.5;
    a passing completion gets λ, a failing one min(0, λ) (never paid for being short). All
    0 when the lengths are equal. Why relative: ``efficiency`` pays len / limit, a few
    thousandths between two correct answers of 40 and 60 tokens under a 256-token limit,
    which the correctness advantages (±0.5) drown; here the shortest and longest correct
    answers of a group differ by ``weight``, whatever the limit."""
    if not weight or not lengths:
        return [0.0] * len(lengths)
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    lam = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [weight * (x if ok else min(0.0, x)) for x, ok in zip(lam, passed, strict=True)]

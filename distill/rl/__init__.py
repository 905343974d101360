"""Reinforcement learning: GRPO with DeepSeek-V3.2's refinements, rollouts on the live
policy through our own decoder, rewards from the domain verifiers.

- :mod:`~distill.rl.loss`: the objective as pure functions (ratio, clip, unbiased KL, masks)
- :mod:`~distill.rl.rewards`: verifier score plus overlong and token-efficiency shaping
- :mod:`~distill.rl.rollout`: a step's prompts, G episodes each, their rewards
- :mod:`~distill.rl.policy`: per-token log-probabilities of the sampled tokens
- :mod:`~distill.rl.trainer`: the loop (:func:`train_rl`)
- :mod:`~distill.rl.stage`: the ``rl`` stage (mixed RL on the student) and the one-off
"""

from distill.rl.stage import one_off, run

__all__ = ["one_off", "run"]

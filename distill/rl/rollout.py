"""Rollouts for RL: a step's prompts, G episodes each from the live policy, their rewards.

An agent episode has several assistant turns; each turn is trained on as its own sample,
with the exact prompt ids it was sampled from and the sampler's own log-probabilities, so
π_old and π_θ see the same context token for token (re-rendering a finished conversation
need not reproduce the sampled ids). All turns of an episode share its advantage; in the
``seq_*`` aggregations a "sequence" is one turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.backends import Sampling, mix_seed
from distill.recipe.rl import RewardConfig, RLConfig
from distill.rl.rewards import group_length_rewards, shaped_reward
from distill.rollout import Episode, run_episodes
from distill.verify import verify_many
from teachers.base import Task, get_domain


@dataclass
class Sample:
    """One assistant turn to train on."""

    prompt_ids: list[int]
    token_ids: list[int]
    old_logp: list[float]
    kept: list[list[int]] | None
    domain: str
    episode: int  # index of its episode in the step's batch
    advantage: float = 0.0
    loss: bool = True  # False: no loss (truncated under ``truncated: mask``)


@dataclass
class Outcome:
    """One episode's result: what the logs and the advantages are made of."""

    domain: str
    passed: bool
    reward: float
    tokens: int  # completion tokens over all its turns
    truncated: bool
    loss: bool


def step_prompts(
    pools: dict[str, list[Task]], weights: dict[str, float], n: int, step: int, seed: int
) -> list[tuple[str, Task]]:
    """The ``n`` prompts of RL step ``step``: each domain's share of ``n`` follows its
    weight (largest remainder), and each domain walks a seeded permutation of its pool,
    so step ``s`` always gets the same prompts (a resumed run continues exactly)."""
    import random

    total = sum(weights[d] for d in pools)
    if total <= 0:
        raise ValueError("every RL domain has weight 0: no prompts")
    quota = {d: n * weights[d] / total for d in pools}
    counts = {d: int(q) for d, q in quota.items()}
    for d in sorted(quota, key=lambda d: counts[d] - quota[d])[: n - sum(counts.values())]:
        counts[d] += 1
    out = []
    for d, pool in pools.items():
        order = list(range(len(pool)))
        random.Random(mix_seed(seed, "rl-prompts", d)).shuffle(order)
        start = step * counts[d]
        out += [(d, pool[order[(start + i) % len(pool)]]) for i in range(counts[d])]
    return out


def sampling_of(cfg: RLConfig, max_new_tokens: int, seed: int, step: int) -> Sampling:
    return Sampling(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=max_new_tokens,
        seed=mix_seed(seed, "rl-step", step),
        sampler_logprobs=True,
    )


def rollout_step(
    backend,
    prompts: list[tuple[str, Task]],
    cfg: RLConfig,
    *,
    limits: dict[str, tuple[int, int, int]],
    seed: int,
    step: int,
) -> tuple[list[Sample], list[Outcome], dict[str, float]]:
    """G episodes of every prompt, scored, and the seconds spent generating and scoring.
    ``limits[domain]`` is (max_new_tokens, max_turns, max_episode_tokens). Episodes of
    prompt i are group i, in order."""
    import time

    times = {"generate": 0.0, "score": 0.0}
    samples: list[Sample] = []
    outcomes: list[Outcome | None] = [None] * (len(prompts) * cfg.num_generations)
    by_domain: dict[str, list[int]] = {}
    for i, (d, _) in enumerate(prompts):
        by_domain.setdefault(d, []).append(i)
    for d, idx in by_domain.items():
        dom = get_domain(d)
        new_tokens, turns, episode_tokens = limits[d]
        pairs = [(prompts[i][1], j) for i in idx for j in range(cfg.num_generations)]
        t0 = time.perf_counter()
        episodes = run_episodes(
            backend, dom, pairs, sampling=sampling_of(cfg, new_tokens, seed, step),
            max_turns=turns, max_episode_tokens=episode_tokens,
        )  # fmt: skip
        t1 = time.perf_counter()
        verdicts = verify_many(d, [(e.task, e.messages) for e in episodes], workers=1)
        times["generate"] += t1 - t0
        times["score"] += time.perf_counter() - t1
        shaping = cfg.domain(d).reward
        for k, (e, v) in enumerate(zip(episodes, verdicts, strict=True)):
            slot = idx[k // cfg.num_generations] * cfg.num_generations + k % cfg.num_generations
            outcomes[slot] = _outcome(e, v, d, new_tokens, turns, shaping)
            samples += _samples(e, d, slot, outcomes[slot].loss)
        if shaping.length_group:
            for i in idx:
                _add_length_rewards(outcomes, i * cfg.num_generations, cfg.num_generations, shaping)
    return samples, outcomes, times  # type: ignore[return-value]


def _add_length_rewards(outcomes: list, start: int, g: int, shaping: RewardConfig) -> None:
    """The group-relative length reward of group ``outcomes[start:start + g]``, added in
    place; completions scored 0 for truncation (``truncated: zero``) keep their 0."""
    group = outcomes[start : start + g]
    bonus = group_length_rewards(
        [o.tokens for o in group], [o.passed for o in group], shaping.length_group
    )
    for o, b in zip(group, bonus, strict=True):
        if not (o.truncated and shaping.truncated == "zero"):
            o.reward += b


def _outcome(e: Episode, v, domain: str, new_tokens: int, turns: int, shaping: RewardConfig):
    # an agent episode may use up to max_turns turns of max_new_tokens each
    limit = new_tokens * (turns if e.task.tools else 1)
    truncated = e.finish_reason in ("length", "turn_limit")
    r = shaped_reward(v.score, v.passed, e.completion_tokens, limit, truncated, shaping)
    return Outcome(domain, v.passed, r.value, e.completion_tokens, truncated, r.loss)


def _samples(e: Episode, domain: str, slot: int, loss: bool) -> list[Sample]:
    return [
        Sample(
            prompt_ids=list(c.prompt_ids),
            token_ids=list(c.token_ids),
            old_logp=list(c.logprobs),
            kept=c.kept,
            domain=domain,
            episode=slot,
            loss=loss,
        )
        for c in e.completions
        if c.token_ids
    ]

"""The ``rl`` stage: one mixed RL run on the distilled student over every enabled domain
(per-domain prompt weights, KL coefficients and reward shaping from ``recipe.rl``), so
that ``eval`` scores the final student. Writes the RL-trained student to ``<out>/rl/``.
With ``rl.enabled: false`` the stage records that it is off and eval scores the
distilled student alone."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from distill import layout
from distill.errors import UserError
from distill.recipe import Recipe
from distill.recipe.rl import RLConfig
from distill.stages import stage_dir
from distill.tasks import tasks_for


def limits_for(recipe: Recipe, domain: str, cfg: RLConfig) -> tuple[int, int, int]:
    """(max_new_tokens, max_turns, max_episode_tokens) of a domain's rollouts: the RL
    section's, else what generate uses for that domain."""
    gen, dc = recipe.generate, recipe.domains[domain]
    new = cfg.max_new_tokens or dc.max_new_tokens or gen.max_new_tokens
    return new, cfg.max_turns or gen.max_turns, gen.max_episode_tokens


def prompt_pools(recipe: Recipe, cfg: RLConfig, domains: list[str]) -> dict[str, list]:
    """Training-split tasks of every domain with a positive RL weight."""
    pools = {}
    for d in domains:
        dcfg = cfg.domain(d)
        if dcfg.weight > 0:
            pools[d] = tasks_for(d, recipe.domains[d], recipe.seed, "train", n=dcfg.tasks)
    if not pools:
        raise UserError("rl.domains: every enabled domain has weight 0; nothing to train on")
    return pools


def heldout_for(recipe: Recipe, cfg: RLConfig, domains: list[str]) -> tuple | None:
    """The held-out tasks and limits ``rl.eval_steps`` scores (None when off): each
    domain's first ``eval_tasks`` eval tasks, decoded as the eval stage decodes them."""
    from distill.eval.stage import decode_limits, eval_tasks

    if not cfg.eval_steps:
        return None
    dcs = {d: recipe.domains[d] for d in domains}
    tasks = {d: eval_tasks(d, dc, recipe.seed, n=cfg.eval_tasks) for d, dc in dcs.items()}
    return tasks, {d: decode_limits(dc, recipe.generate) for d, dc in dcs.items()}


def run(recipe: Recipe) -> dict[str, Any]:
    """Mixed RL on ``<out>/student`` → ``<out>/rl``. On a multi-core CPU it runs in one
    process per core (distill/launch.py), each rolling out its share of the prompts."""
    from distill import launch
    from distill.rl.trainer import train_rl

    out = stage_dir(recipe, "rl")
    if not recipe.rl.enabled:
        if (out / "config.json").exists():  # an earlier run's RL student must not be scored
            shutil.rmtree(out)
        return {"record": {"enabled": False}}
    if (procs := launch.cpu_procs()) > 1:
        return launch.spawn(run, recipe, procs=procs, what="rl")
    student = recipe.out / "student"
    if not (student / "config.json").exists():
        raise UserError(f"{student}: no student to train (run `distill train` first)")
    domains = recipe.active_domains()
    pools = prompt_pools(recipe, recipe.rl, domains)
    report = train_rl(
        init=student,
        tasks=pools,
        cfg=recipe.rl,
        limits={d: limits_for(recipe, d, recipe.rl) for d in domains},
        out_dir=out,
        run_dir=layout.run_dir(out, recipe.out),
        seed=recipe.seed,
        desc="student rl",
        heldout=heldout_for(recipe, recipe.rl, list(pools)),
    )
    record = {"enabled": True, "steps": report["steps"], "last": report["last"]}
    return {**report, "record": record}


def one_off(
    model: Path, domains: list[str], out: Path, cfg: RLConfig, seed: int = 0, difficulty: int = 1
) -> dict[str, Any]:
    """``distill rl --model DIR``: GRPO on any HF causal LM directory with a chat template,
    over the named domains' generated training tasks (default domain settings)."""
    from distill.recipe import DomainConfig, GenerateConfig
    from distill.rl.trainer import train_rl
    from teachers.base import REGISTRY

    unknown = [d for d in domains if d not in REGISTRY]
    if unknown:
        raise UserError(
            f"--domains: unknown domain {', '.join(unknown)} (known: {', '.join(REGISTRY)})"
        )
    dcfg = DomainConfig(difficulty=difficulty)
    pools = {d: tasks_for(d, dcfg, seed, "train", n=cfg.domain(d).tasks) for d in domains}
    gen = GenerateConfig()  # what generate would use: the recipe defaults
    new = cfg.max_new_tokens or gen.max_new_tokens
    limits = {d: (new, cfg.max_turns or gen.max_turns, gen.max_episode_tokens) for d in domains}
    heldout = None
    if cfg.eval_steps:  # decoded as `distill eval --model` would (default domain settings)
        from distill.eval.stage import decode_limits, eval_tasks

        heldout = (
            {d: eval_tasks(d, dcfg, seed, n=cfg.eval_tasks) for d in domains},
            {d: decode_limits(dcfg, gen) for d in domains},
        )
    return train_rl(
        init=model, tasks=pools, cfg=cfg, limits=limits, out_dir=out, seed=seed, heldout=heldout
    )

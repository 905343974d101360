"""Held-out greedy pass@1 while RL trains (``rl.eval_steps``), as verl's ``test_freq`` and
TRL's ``eval_steps`` give it.

GRPO maximises the reward of samples at the rollout temperature; the eval stage judges
greedy answers. The two can part: from a policy whose samples at temperature 1 nearly
all failed (3.7% sampled, 85.5% greedy), 120 GRPO steps doubled the sampled pass rate and
cut greedy pass@1 to 38.5% (docs/rl.md, "Watching held-out accuracy"). The training log's
``pass`` only shows the first; this shows the second while the run goes on.

The tasks are the eval split's, decoded greedily on the live weights with the eval
stage's limits, so that the last figure is what the eval stage measures on those tasks
(equal at both seeds tried on a CPU; tests/test_rl_learning.py checks it to one task).
It monitors and selects nothing: no checkpoint is chosen by it, and it draws no random
numbers, so a run's weights are the same with it or without it.
"""

from __future__ import annotations

from typing import Any

from distill.backends import Sampling
from distill.rollout import run_episodes
from distill.verify import verify_many
from teachers.base import Task, get_domain


def heldout_scores(
    acc, backend, tasks: dict[str, list[Task]], limits: dict[str, tuple[int, int, int]]
) -> dict[str, Any]:
    """Greedy pass@1 and mean completion tokens of the live policy on ``tasks`` (held-out,
    per domain; each rank decodes its share), as log keys ``eval/pass1/<d>``,
    ``eval/tokens/<d>`` and ``eval/pass1`` (the mean over domains, each weighted equally).
    ``limits[domain]`` is (max_new_tokens, max_turns, max_episode_tokens)."""
    rows: list[tuple[str, bool, int]] = []
    for d, ts in tasks.items():
        mine = ts[acc.process_index :: acc.num_processes]
        if not mine:
            continue
        new_tokens, turns, episode_tokens = limits[d]
        episodes = run_episodes(
            backend, get_domain(d), [(t, 0) for t in mine],
            sampling=Sampling(temperature=0.0, max_new_tokens=new_tokens),
            max_turns=turns, max_episode_tokens=episode_tokens,
        )  # fmt: skip
        verdicts = verify_many(d, [(e.task, e.messages) for e in episodes], workers=1)
        rows += [
            (d, v.passed, e.completion_tokens) for e, v in zip(episodes, verdicts, strict=True)
        ]
    if acc.num_processes > 1:
        import torch.distributed as dist

        got: list[Any] = [None] * acc.num_processes
        dist.all_gather_object(got, rows)
        rows = [r for g in got for r in g]
    return summarize(rows)


def summarize(rows: list[tuple[str, bool, int]]) -> dict[str, Any]:
    """The log keys of (domain, passed, completion tokens) rows."""
    out: dict[str, Any] = {}
    doms = sorted({d for d, _, _ in rows})
    for d in doms:
        mine = [r for r in rows if r[0] == d]
        out[f"eval/pass1/{d}"] = sum(r[1] for r in mine) / len(mine)
        out[f"eval/tokens/{d}"] = sum(r[2] for r in mine) / len(mine)
    if doms:
        out["eval/pass1"] = sum(out[f"eval/pass1/{d}"] for d in doms) / len(doms)
    return out


def due(step: int, every: int, last: bool) -> bool:
    """Whether the held-out tasks are scored after step ``step`` (1-based; 0 = before the
    first update): every ``every`` steps and after the run's last step; never when 0."""
    return every > 0 and (step % every == 0 or last)

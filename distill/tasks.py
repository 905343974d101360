"""A domain's tasks for one split, as every stage lists them: generate and RL take the
train split, the filter's decontamination and eval the held-out one."""

from __future__ import annotations

from itertools import islice
from typing import Literal

from distill.errors import UserError
from distill.recipe.schema import DomainConfig
from teachers.base import Task, get_domain


def tasks_for(
    domain: str, cfg: DomainConfig, seed: int, split: Literal["train", "eval"], n: int | None = None
) -> list[Task]:
    """The ``split`` tasks of ``domain`` (``n`` of them; default the recipe's
    ``train_tasks`` / ``eval_tasks``): its generator's split, or real records. Eval on
    real records reads ``source.eval_path``, else the eval half of the hash split of
    ``source.path``."""
    n = n or (cfg.train_tasks if split == "train" else cfg.eval_tasks)
    dom = get_domain(domain)
    if cfg.source.kind == "file":
        path = (cfg.source.eval_path if split == "eval" else None) or cfg.source.path
        if not path:
            raise UserError(f"domains.{domain}.source.path: required for source.kind=file")
        part = "all" if split == "eval" and cfg.source.eval_path else split
        tasks = list(islice(dom.load_records(path, split=part), n))
    else:
        tasks = list(dom.tasks(split, n, seed, cfg.difficulty))
    if not tasks:
        what = "training" if split == "train" else "eval"
        raise UserError(f"domains.{domain}: no {what} tasks")
    return tasks

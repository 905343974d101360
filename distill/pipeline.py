"""``distill run``: every stage in order, skipping those whose recipe sections and
upstream stages are unchanged since their last complete run, saying why each runs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from distill.recipe import Recipe
from distill.stages import (
    STAGES,
    UPSTREAM,
    invalidate,
    peak_rss_mb,
    record_of,
    sections_read,
    timed,
    up_to_date,
)

console = Console(stderr=True)
INPUTS = "_inputs.json"  # per stage: hash of each section and upstream fingerprint it ran with


def stage_fn(stage: str) -> Callable[[Recipe], Any]:
    """The ``run(recipe)`` of a stage's module (imported lazily: heavy imports)."""
    if stage == "teachers":
        from distill.bootstrap import run
    elif stage == "generate":
        from distill.generate import run
    elif stage == "filter":
        from distill.filter import run
    elif stage == "train":
        from distill.train import run
    else:
        from distill.evaluate import run
    return run


def inputs_of(recipe: Recipe, stage: str) -> dict[str, str | None]:
    """What a stage's fingerprint is made of, one hash per part, to explain a rerun."""
    parts: dict[str, str | None] = {}
    for s, value in sections_read(recipe, stage).items():
        blob = json.dumps(value, sort_keys=True, separators=(",", ":"))
        parts[s] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    for up in UPSTREAM[stage]:
        rec = record_of(recipe, up)
        parts[f"<{up}>"] = rec["fingerprint"] if rec else None
    return parts


def why_run(recipe: Recipe, stage: str) -> str:
    """Why a stage that is not up to date has to run."""
    if record_of(recipe, stage) is None:
        return "never completed"
    path = recipe.out / "_pipeline" / f"{stage}{INPUTS}"
    try:
        before = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "inputs changed"
    now = inputs_of(recipe, stage)
    changed = [k for k in now if before.get(k) != now[k]]
    sections = [k for k in changed if not k.startswith("<")]
    upstream = [k.strip("<>") for k in changed if k.startswith("<")]
    why = []
    if sections:
        why.append("recipe section " + ", ".join(sections) + " changed")
    if upstream:
        why.append("upstream " + ", ".join(upstream) + " reran")
    return "; ".join(why) or "inputs changed"


def _save_inputs(recipe: Recipe, stage: str) -> None:
    d = recipe.out / "_pipeline"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{stage}{INPUTS}.tmp"
    tmp.write_text(json.dumps(inputs_of(recipe, stage), indent=1))
    os.replace(tmp, d / f"{stage}{INPUTS}")


def run(
    recipe: Recipe, force: bool = False, stages: list[str] | None = None
) -> list[dict[str, Any]]:
    """Run ``stages`` (all by default) in order; returns what ran and what was skipped."""
    console.print(
        f"[bold]distill run[/] {recipe.name} → {recipe.out} (recipe fingerprint {recipe.fingerprint()})"
    )
    recipe.out.mkdir(parents=True, exist_ok=True)
    (recipe.out / "recipe.resolved.json").write_text(
        json.dumps(recipe.model_dump(mode="json"), indent=1)
    )
    summary = []
    t_all = time.time()
    for stage in stages or STAGES:
        if not force and up_to_date(recipe, stage):
            console.print(f"[dim]skip {stage}: up to date (inputs unchanged since its last run)[/]")
            summary.append({"stage": stage, "status": "skipped", "seconds": 0.0})
            continue
        reason = "--force" if force else why_run(recipe, stage)
        console.rule(f"{stage}: {reason}")
        if force:
            invalidate(recipe, stage)
        t0 = time.time()
        if stage == "teachers":  # its own per-teacher skip must yield to --force too
            timed(recipe, stage, stage_fn(stage), recipe, force=force)
        else:
            timed(recipe, stage, stage_fn(stage), recipe)
        _save_inputs(recipe, stage)
        summary.append(
            {"stage": stage, "status": "ran", "seconds": time.time() - t0, "why": reason}
        )
    _print_summary(summary, time.time() - t_all)
    return summary


def _print_summary(summary: list[dict[str, Any]], total: float) -> None:
    table = Table(title=f"distill run: {total:.0f} s wall, peak memory {peak_rss_mb():.0f} MB")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    for s in summary:
        table.add_row(s["stage"], s["status"], f"{s['seconds']:.0f}")
    console.print(table)

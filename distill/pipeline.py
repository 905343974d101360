"""``distill run``: every stage in order, skipping those whose recipe sections and
upstream stages are unchanged since their last complete run, saying why each runs."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from distill.files import atomic_write_json, json_hash
from distill.recipe.schema import Recipe
from distill.stages import (
    BY_NAME,
    STAGES,
    invalidate,
    peak_rss_mb,
    record_of,
    run_stage,
    sections_read,
    up_to_date,
)

console = Console(stderr=True)
INPUTS = "_inputs.json"  # per stage: hash of each section and upstream fingerprint it ran with


def inputs_of(recipe: Recipe, stage: str) -> dict[str, str | None]:
    """What a stage's fingerprint is made of, one hash per part, to explain a rerun."""
    parts: dict[str, str | None] = {}
    for s, value in sections_read(recipe, stage).items():
        parts[s] = json_hash(value)
    for up in BY_NAME[stage].upstream:
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
    atomic_write_json(d / f"{stage}{INPUTS}", inputs_of(recipe, stage))


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
        run_stage(recipe, stage, force=force)  # --force also overrides a stage's own skips
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

"""``distill run``: every stage in order, skipping those whose recipe sections and
upstream stages are unchanged since their last complete run, saying why each runs.

Why a stage runs is read off what it ran with last time: each completed stage leaves
``<out>/_pipeline/<stage>_inputs.json`` (the values of the recipe sections it read, the
fingerprints of its upstream stages, digests of their weights and shards), and
:func:`why_run` compares that with what it would read now, down to the recipe keys that
changed (``train.learning_rate: 0.003 → 0.001``), which every stage's header prints.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from distill.errors import storage_errors
from distill.files import atomic_write_json, json_hash
from distill.progress import console
from distill.recipe.schema import Recipe
from distill.stages import (
    BY_NAME,
    STAGES,
    input_manifests,
    invalidate,
    missing_outputs,
    peak_rss_mb,
    record_of,
    run_stage,
    sections_read,
    up_to_date,
)

INPUTS = "_inputs.json"  # per stage: what its last complete run read (see inputs_of)
MAX_SHOWN = 8  # changed keys a header lists; the rest are counted
MAX_VALUE = 60  # characters of one value in a header line
_ABSENT = object()  # a key one side of a diff does not have


def inputs_of(recipe: Recipe, stage: str) -> dict[str, Any]:
    """What a stage reads, as it stands now: the values of its recipe sections, the
    fingerprint of each upstream stage, and digests of the upstream weights and shards
    (everything its fingerprint hashes, kept so that a rerun can say what changed)."""
    upstream, weights = {}, {}
    for up in BY_NAME[stage].upstream:
        rec = record_of(recipe, up) or {}
        upstream[up] = rec.get("fingerprint")
        if rec.get("weights"):
            weights[up] = json_hash(rec["weights"])
    manifests = input_manifests(recipe, stage)
    return {
        "sections": sections_read(recipe, stage),
        "upstream": upstream,
        "weights": weights,
        "shards": json_hash(manifests) if manifests else None,
    }


@dataclass
class Why:
    """Why a stage runs: a short reason, and the recipe keys that changed since its last
    complete run as ``(dotted key, old value, new value)``."""

    reason: str
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)

    def lines(self, limit: int = MAX_SHOWN) -> list[str]:
        """The changes as ``key: old → new`` lines, at most ``limit`` of them."""
        out = [f"{k}: {_show(old)} → {_show(new)}" for k, old, new in self.changes[:limit]]
        if len(self.changes) > limit:
            out.append(f"… and {len(self.changes) - limit} more changed keys")
        return out


def why_run(recipe: Recipe, stage: str, force: bool = False) -> Why:
    """Why ``stage`` runs now: ``--force``, its first run, an incomplete last run, or what
    changed since its last complete run (recipe keys, upstream stages, weights, shards)."""
    path = recipe.out / "_pipeline" / f"{stage}{INPUTS}"
    try:
        before = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        before = None
    if not isinstance(before, dict) or "sections" not in before:
        before = None  # absent, or written by an older version (hashes only)
    done = record_of(recipe, stage) is not None
    if before is None:
        if force:
            return Why("--force")
        return Why("inputs changed" if done else "first run (never completed here)")
    now = inputs_of(recipe, stage)
    changes = diff(before["sections"], now["sections"])
    sections = [s for s in now["sections"] if any(_under(k, s) for k, _, _ in changes)]
    why = []
    if force:
        why.append("--force")
    elif not done:
        why.append("its last run did not complete")
    if sections:
        why.append("recipe section " + ", ".join(sections) + " changed")
    upstream = [u for u, fp in now["upstream"].items() if before["upstream"].get(u) != fp]
    if upstream:
        why.append("upstream " + ", ".join(upstream) + " reran")
    weights = [
        u
        for u, w in now["weights"].items()
        if u not in upstream and before.get("weights", {}).get(u) != w
    ]
    if weights:
        why.append("weights of " + ", ".join(weights) + " changed")
    if not upstream and before.get("shards") != now["shards"]:
        why.append("input shards changed")
    if done and (missing := missing_outputs(recipe, stage)):
        why.append(f"its outputs are incomplete ({missing})")
    if not why:
        why.append("up to date; run as asked" if up_to_date(recipe, stage) else "inputs changed")
    return Why("; ".join(why), changes)


def diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Every leaf that differs between two JSON values, as ``(dotted key, old, new)``;
    a key only one side has shows the other side as absent. Lists compare whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            key = f"{prefix}.{k}" if prefix else str(k)
            out += diff(old.get(k, _ABSENT), new.get(k, _ABSENT), key)
        return out
    return [] if old == new else [(prefix, old, new)]


def _under(key: str, section: str) -> bool:
    return key == section or key.startswith(section + ".")


def _show(value: Any) -> str:
    from distill.recipe.yaml import scalar

    text = "(absent)" if value is _ABSENT else scalar(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def save_inputs(recipe: Recipe, stage: str) -> None:
    """Keep what ``stage`` read in the run that just completed (see :func:`why_run`)."""
    d = recipe.out / "_pipeline"
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / f"{stage}{INPUTS}", inputs_of(recipe, stage))


def run(
    recipe: Recipe, force: bool = False, stages: list[str] | None = None
) -> list[dict[str, Any]]:
    """Run ``stages`` (all by default) in order; returns what ran and what was skipped."""
    console.print(
        f"[bold]distill run[/] {recipe.name} → {recipe.out} "
        f"(recipe fingerprint {recipe.fingerprint()})",
        highlight=False,
    )
    recipe.require_domains()  # before anything is written
    with storage_errors(recipe.out):  # a read-only or full output: one line, exit 2
        recipe.out.mkdir(parents=True, exist_ok=True)
        (recipe.out / "recipe.resolved.json").write_text(
            json.dumps(recipe.model_dump(mode="json"), indent=1)
        )
    summary = []
    t_all = time.time()
    for stage in stages or STAGES:
        if not force and up_to_date(recipe, stage):
            console.print(f"[dim]── {stage} · skipped: up to date (inputs unchanged)[/]")
            summary.append({"stage": stage, "status": "skipped", "seconds": 0.0})
            continue
        reason = why_run(recipe, stage, force=force).reason  # the header prints it in full
        if force:
            invalidate(recipe, stage)
        t0 = time.time()
        run_stage(recipe, stage, force=force)  # --force also overrides a stage's own skips
        summary.append(
            {"stage": stage, "status": "ran", "seconds": time.time() - t0, "why": reason}
        )
    _print_summary(summary, time.time() - t_all)
    return summary


def _print_summary(summary: list[dict[str, Any]], total: float) -> None:
    table = Table(title=None, box=None, padding=(0, 2), show_edge=False)
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("why")
    for s in summary:
        table.add_row(s["stage"], s["status"], f"{s['seconds']:.0f}", s.get("why", ""))
    console.print(
        f"\n[bold]distill run[/]: {total:.0f} s wall, peak memory {peak_rss_mb():.0f} MB",
        highlight=False,
    )
    console.print(table)

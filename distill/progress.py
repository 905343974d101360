"""Shared console output: rich progress bars and the resolved-recipe log every stage
prints when it starts. Everything goes to stderr so stdout stays machine-readable."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from distill.recipe import Recipe

T = TypeVar("T")
console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, in the task's ``unit`` field (default "it")."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        return Text(f"{task.speed:,.1f} {unit}/s" if task.speed else f"- {unit}/s")


def progress(transient: bool = False) -> Progress:
    """A rich Progress with the project's columns; use as a context manager."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def track(
    items: Iterable[T], description: str, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    """Iterate ``items`` under a progress bar showing the rate in ``unit``/s."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress() as bar:
        task = bar.add_task(description, total=total, unit=unit)
        for item in items:
            yield item
            bar.update(task, advance=1)


def log_recipe(recipe: Recipe, stage: str, sections: list[str] | None = None) -> None:
    """Log the resolved recipe at the start of ``stage``.

    Prints the sections the stage reads (one line each) and writes the whole resolved
    recipe, with field descriptions, to ``<out>/<stage dir>/_recipe.yaml`` so every
    output directory says exactly what produced it.
    """
    from distill.recipe_doc import show_yaml
    from distill.stages import SECTIONS, fingerprint, stage_dir

    fp = fingerprint(recipe, stage) if stage in SECTIONS else recipe.fingerprint()
    console.rule(f"[bold]{stage}[/] · recipe {recipe.name} · fingerprint {fp}")
    data = recipe.model_dump(mode="json")
    for s in sections or SECTIONS.get(stage, list(data)):
        console.print(
            f"  {s}: {json.dumps(data[s], separators=(', ', ': '))}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
    d = stage_dir(recipe, stage) if stage in SECTIONS else Path(recipe.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "_recipe.yaml").write_text(show_yaml(recipe))

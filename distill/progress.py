"""Shared console output: the project's one progress bar. Everything goes to stderr so
stdout stays machine-readable."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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

T = TypeVar("T")
console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, in the task's ``unit`` field (default "it")."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        return Text(f"{task.speed:,.1f} {unit}/s" if task.speed else f"- {unit}/s")


class InfoColumn(ProgressColumn):
    """The task's ``info`` field (loss, tokens/s ...), empty when it has none."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("info", "")))


def progress(transient: bool = False, disable: bool = False, auto_refresh: bool = True) -> Progress:
    """The project's one progress bar (a rich Progress on stderr; use as a context
    manager): description, bar, done/total, rate in the task's ``unit``, its ``info``
    field, elapsed and remaining time. ``auto_refresh=False`` where processes fork while
    the bar is live (a refresh thread holding the console lock would leak it)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        InfoColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=disable,
        auto_refresh=auto_refresh,
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

"""Shared console output: the project's one console and progress bar.

Human output (headers, bars, tables, warnings, "wrote ..." status lines) goes to stderr,
so stdout carries only what a command produces: `recipe show` and `reference`, `recipe
validate`'s verdict, `verify`'s verdicts, `shards inspect`'s report, `--version`. When
stderr is not a terminal (a log file, a pipe) lines are never hard-wrapped and bars print
their final state once instead of redrawing. Third-party progress bars (transformers'
"Loading weights", "Writing model shards") are switched off by :func:`quiet_libraries`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

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
LOG_WIDTH = 200  # tables and bars in a log file: their natural width, up to this


def make_console() -> Console:
    """A console on stderr: rich's usual one in a terminal; otherwise one that never
    wraps a line (rich would cut at 80 columns) and lays tables out up to LOG_WIDTH."""
    terminal = Console(stderr=True)
    if terminal.is_terminal:
        return terminal
    return Console(stderr=True, soft_wrap=True, width=LOG_WIDTH)


console = make_console()


def quiet_libraries() -> None:
    """Switch off other libraries' progress bars, in this process and in every process
    it starts (the environment is inherited): our own bar already says what runs."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by transformers at import
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()


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
    the bar is live (a refresh thread holding the console lock would leak it). A
    transient bar is not shown outside a terminal (it would leave a blank line)."""
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
        disable=disable or (transient and not console.is_terminal),
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


def _group() -> tuple[int, int, Any]:
    """(rank, world size, the process group's key-value store or None)."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.distributed_c10d import _get_default_store

            return dist.get_rank(), dist.get_world_size(), _get_default_store()
    return 0, 1, None


class StageBar:
    """One progress bar over a stage's work on every rank, drawn by rank 0.

    Each rank adds what it finished (items, tokens) to counters in the process group's
    key-value store (no collective: ranks need not be in step) and rank 0 shows the
    sums, so two ranks of 750 tasks each read 1,500/1,500. Leaving the ``with`` block,
    rank 0 keeps the bar moving until every rank has left it. In one process it is a
    plain bar."""

    _made = 0  # per process; ranks make their bars in the same order, so the keys match

    def __init__(self, description: str, total: int, unit: str = "it", auto_refresh: bool = True):
        self.description, self.total, self.unit = description, total, unit
        self.auto_refresh = auto_refresh  # False: redrawn on each advance (forks while live)
        self.rank, self.world, self.store = _group()
        StageBar._made += 1
        self.key = f"distill/bar{StageBar._made}"
        self.done = self.tokens = 0  # this process's counts (all counts without a store)
        self.what, self.t0 = "", time.time()
        self.bar: Progress | None = None  # outside a ``with`` block it only counts

    def __enter__(self) -> StageBar:
        self.t0 = time.time()
        self.bar = progress(disable=self.rank != 0, auto_refresh=self.auto_refresh)
        self.bar.__enter__()
        self.task = self.bar.add_task(self.description, total=self.total, unit=self.unit)
        return self

    def advance(self, n: int = 1, tokens: int = 0, what: str | None = None) -> None:
        """Count ``n`` finished items (and ``tokens`` generated) of this rank; ``what``
        names the part under way (a domain), shown beside the bar."""
        self.done, self.tokens = self.done + n, self.tokens + tokens
        self.what = self.what if what is None else what
        if self.store is not None:
            self.store.add(f"{self.key}/done", n)
            self.store.add(f"{self.key}/tokens", tokens)
        self._draw()

    def _draw(self) -> None:
        if self.rank != 0 or self.bar is None:
            return
        done, tokens = self.done, self.tokens
        if self.store is not None:
            done = self.store.add(f"{self.key}/done", 0)
            tokens = self.store.add(f"{self.key}/tokens", 0)
        info = [self.what] if self.what else []
        if tokens:
            info.append(f"{tokens / max(time.time() - self.t0, 1e-9):,.0f} tok/s")
        self.bar.update(self.task, completed=done, info="  ".join(info))
        if not self.auto_refresh:
            self.bar.refresh()

    def __exit__(self, *exc: object) -> None:
        if self.bar is None:
            return
        if exc[0] is None and self.store is not None:
            self.store.add(f"{self.key}/finished", 1)
            while self.rank == 0 and self.store.add(f"{self.key}/finished", 0) < self.world:
                self._draw()
                time.sleep(0.2)
        if exc[0] is None:
            self.what = ""
            self._draw()
        self.bar.__exit__(*exc)

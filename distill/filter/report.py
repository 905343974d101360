"""The filter's funnel: per domain, how many traces entered and left each step and why.

Written as ``clean/filter_report.json`` (machine-readable) and ``clean/filter_report.md``,
and printed as a rich table. Counts are checked as they are recorded: what enters a step
is what left the previous one, and what leaves is what entered minus what was dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from distill.files import atomic_write_text
from distill.filter.steps import Dropped


@dataclass
class Funnel:
    """The steps one domain's traces went through, in order."""

    domain: str
    raw: int
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def current(self) -> int:
        return self.steps[-1]["out"] if self.steps else self.raw

    def add(self, step: str, kept: int, dropped: Dropped | dict[str, int], **notes: Any) -> None:
        counts = {r: v if isinstance(v, int) else len(v) for r, v in sorted(dropped.items())}
        entered = self.current
        if entered - sum(counts.values()) != kept:  # a bug in a step, never bad input
            raise AssertionError(
                f"{self.domain}/{step}: {entered} in, {kept} out, dropped {counts}"
            )
        self.steps.append({"step": step, "in": entered, "out": kept, "dropped": counts, **notes})


def summary(
    funnel: Funnel, kept_tokens: list[int], passed: int, tasks: int, tasks_kept: int, **extra: Any
) -> dict[str, Any]:
    """One domain's entry in the report."""
    return {
        "raw": funnel.raw,
        "kept": funnel.current,
        "passed": passed,
        "pass_rate": passed / funnel.raw if funnel.raw else 0.0,
        "mean_tokens": sum(kept_tokens) / len(kept_tokens) if kept_tokens else 0.0,
        "tasks": tasks,
        "tasks_kept": tasks_kept,
        **extra,
        "steps": funnel.steps,
    }


def write_report(directory: Path, report: dict[str, Any]) -> None:
    """``filter_report.json`` and ``filter_report.md`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        directory / "filter_report.json", json.dumps(report, indent=1, sort_keys=True)
    )
    atomic_write_text(directory / "filter_report.md", to_markdown(report))


def _why(step: dict[str, Any]) -> str:
    if step.get("skipped"):
        return "skipped (off in the recipe)"
    if "passed" in step:
        return f"{step['passed']} passed, {step['failed']} failed (verdict stored)"
    return ", ".join(f"{r} {n}" for r, n in step["dropped"].items()) or "-"


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["# Filter report", ""]
    for domain, d in report["domains"].items():
        lines += [
            f"## {domain}",
            "",
            f"{d['raw']} raw -> {d['kept']} kept; teacher pass rate {d['pass_rate']:.1%}; "
            f"mean tokens per kept trace {d['mean_tokens']:.1f}; tasks {d['tasks_kept']}/{d['tasks']}; "
            f"verifier {d.get('verifier')} v{d.get('verifier_version')}.",
            "",
            "| step | in | out | dropped (why) |",
            "|---|---:|---:|---|",
        ]
        lines += [f"| {s['step']} | {s['in']} | {s['out']} | {_why(s)} |" for s in d["steps"]]
        lines.append("")
    lines += [
        "## Settings",
        "",
        "```json",
        json.dumps(report["settings"], indent=1, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def to_table(report: dict[str, Any]) -> Table:
    """The funnel as a rich table, one row per domain: raw rows, how many passed the
    verifier, the rows each step dropped ("off": not run), what was kept. The reasons of
    every drop are in filter_report.md."""
    table = Table(title="filter funnel: rows dropped at each step (why: filter_report.md)")
    domains = report["domains"]
    steps = [s["step"] for s in next(iter(domains.values()))["steps"][1:]] if domains else []
    table.add_column("domain")
    for col in ["raw", "passed", *steps, "kept", "pass rate", "tokens/row"]:
        table.add_column(col, justify="right")
    for domain, d in domains.items():
        by = {s["step"]: s for s in d["steps"]}
        row = [str(d["raw"]), str(by["verify"]["passed"])]
        row += ["off" if by[s].get("skipped") else str(by[s]["in"] - by[s]["out"]) for s in steps]
        row += [f"[b]{d['kept']}[/b]", f"{d['pass_rate']:.1%}", f"{d['mean_tokens']:.1f}"]
        table.add_row(domain, *row)
    return table

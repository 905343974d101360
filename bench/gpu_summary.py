"""Where a `distill run` spent its time, from the records its stages leave: one line per
stage, with the part that set its length (the last teacher, a domain's decoding, the
filter's slowest domain). `bench/gpu_recipe.sh` prints it after each seed, so a device
call's output says where the minutes went without unpacking its tarball.

    python bench/gpu_summary.py data/gpu-s0
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _teachers(out: Path) -> str:
    rec = _json(out / "runs" / "teachers" / "_stage.json")
    parts = []
    for d, t in (rec.get("teachers") or {}).items():
        rep = _json(out / "runs" / "teachers" / d / "train_report.json")
        first = (rep.get("step_elapsed_s") or [None])[0]
        oracle = f"oracle {t['oracle_s']:.0f} s + " if t.get("oracle_s") is not None else ""
        parts.append(
            f"{d} {oracle}train call {t.get('train_s') or 0:.0f} s "
            f"({rep.get('steps', '?')} steps in {rep.get('seconds', 0):.0f} s, "
            f"{(rep.get('tokens_per_s') or 0) / 1e3:.0f}k tok/s"
            + (f", first step at {first:.1f} s" if first is not None else "")
            + ")"
        )
    return f"teachers {rec.get('seconds', 0):.0f} s: " + "; ".join(parts)


def _generate(out: Path) -> str:
    rec = _json(out / "runs" / "raw" / "_stage.json")
    parts = [
        f"{d} {v.get('seconds', 0):.1f} s + {v.get('setup_s', 0):.1f} s setup "
        f"({v.get('rows', 0):,} rows, {v.get('tokens', 0) / max(v.get('seconds') or 1, 1e-9) / 1e3:.0f}k tok/s)"
        for d, v in (rec.get("domains") or {}).items()
    ]
    return f"generate {rec.get('seconds', 0):.0f} s: " + "; ".join(parts)


def _filter(out: Path) -> str:
    rep = _json(out / "clean" / "filter_report.json")
    rec = _json(out / "runs" / "clean" / "_stage.json")
    doms = {
        d: sum((v.get("seconds") or {}).values()) for d, v in (rep.get("domains") or {}).items()
    }
    if not doms:
        return f"filter {rec.get('seconds', 0):.0f} s"
    slow = max(doms, key=doms.get)
    laps = ", ".join(f"{k} {v:.1f}" for k, v in rep["domains"][slow]["seconds"].items())
    return f"filter {rec.get('seconds', 0):.0f} s: slowest {slow} {doms[slow]:.1f} s ({laps})"


def _train(out: Path) -> str:
    rec = _json(out / "runs" / "student" / "_stage.json")
    rep = _json(out / "runs" / "student" / "train_report.json")
    first = (rep.get("step_elapsed_s") or [0])[0]
    return (
        f"train {rec.get('seconds', 0):.0f} s: {rep.get('steps', '?')} steps in "
        f"{rep.get('seconds', 0):.0f} s ({(rep.get('tokens_per_s') or 0) / 1e6:.2f}M tok/s, "
        f"first step at {first:.1f} s)"
    )


def _rl(out: Path) -> str:
    rec = _json(out / "runs" / "rl" / "_stage.json")
    rows = []
    log = out / "runs" / "rl" / "rl_log.jsonl"
    if log.exists():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [r.get("time_step_s", 0) for r in rows]
    detail = (
        f", first {steps[0]:.1f} s, then {sum(steps[1:]) / max(len(steps) - 1, 1):.1f} s"
        if steps
        else ""
    )
    return f"rl {rec.get('seconds', 0):.0f} s: {len(rows)} steps{detail}"


def summary(out: Path) -> str:
    report = _json(out / "eval" / "report.json")
    cost = report.get("cost") or {}
    total = sum(v.get("seconds", 0) for v in cost.values())
    met = [t for t in report.get("targets", []) if t.get("met")]
    head = (
        f"{out}: {total:.0f} s of stages, {len(met)} of {len(report.get('targets', []))} targets"
        if report
        else f"{out}: no eval report (the run did not finish)"
    )
    lines = [head, _teachers(out), _generate(out), _filter(out), _train(out), _rl(out)]
    if "eval" in cost:
        lines.append(f"eval {cost['eval']['seconds']:.0f} s")
    return "\n  ".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["data/gpu-s0"]:
        print(summary(Path(arg)))

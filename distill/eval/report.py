"""The evaluation report: scores per domain and model, the student's recovery of each
specialist, tokens per correct answer, the recipe's targets; as Markdown, JSON, a PNG
chart and a rich table.

Everything scored here is a pure function of per-task outcomes (:func:`pass_at_k`,
:func:`score`, :func:`recovery`, :func:`check_targets`), so the numbers in the report can
be recomputed from ``report.json`` alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_VERSION = "1"
STUDENT = "student"  # the final student: after mixed RL when the recipe runs it
STUDENT_SFT = "student:distilled"  # the distilled student before RL (only when RL runs)


@dataclass
class Outcome:
    """What one model did on one eval task."""

    task_id: str
    greedy_passed: bool
    greedy_tokens: int
    samples_passed: list[bool] = field(default_factory=list)


@dataclass
class Score:
    """One (model, domain) cell of the report."""

    model: str
    domain: str
    tasks: int
    pass1: float  # greedy (temperature 0) accuracy
    passk: float | None  # unbiased pass@k from the sampled runs
    k: int
    sampled_pass1: float | None  # mean pass rate of the samples
    tokens_per_correct: float | None  # mean completion tokens of correct greedy answers
    mean_tokens: float  # mean completion tokens of all greedy answers
    # task kind -> [greedy passes, tasks], when the domain's tasks name their kind
    by_kind: dict[str, list[int]] | None = None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score(model: str, domain: str, outcomes: Sequence[Outcome], k: int) -> Score:
    """Aggregate per-task outcomes into one report cell."""
    n_tasks = len(outcomes)
    if n_tasks == 0:
        return Score(model, domain, 0, 0.0, None, k, None, None, 0.0)
    correct = [o for o in outcomes if o.greedy_passed]
    sampled = [o for o in outcomes if o.samples_passed]
    passk = sampled_p1 = None
    if sampled:
        n = len(sampled[0].samples_passed)
        kk = min(k, n)
        passk = _mean([pass_at_k(n, sum(o.samples_passed), kk) for o in sampled])
        sampled_p1 = _mean([sum(o.samples_passed) / len(o.samples_passed) for o in sampled])
        k = kk
    return Score(
        model=model,
        domain=domain,
        tasks=n_tasks,
        pass1=len(correct) / n_tasks,
        passk=passk,
        k=k,
        sampled_pass1=sampled_p1,
        tokens_per_correct=_mean([o.greedy_tokens for o in correct]) if correct else None,
        mean_tokens=_mean([o.greedy_tokens for o in outcomes]),
    )


def by_kind(kinds: Sequence[str | None], passed: Sequence[bool]) -> dict[str, list[int]] | None:
    """kind -> [passes, tasks], most frequent kind first (None when no task names one)."""
    out: dict[str, list[int]] = {}
    for k, ok in zip(kinds, passed, strict=True):
        if k is not None:
            cell = out.setdefault(k, [0, 0])
            cell[0] += int(ok)
            cell[1] += 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1][1])) or None


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def stderr(p: float, n: int) -> float | None:
    """One standard error of a pass rate ``p`` measured on ``n`` tasks: sqrt(p(1-p)/n).
    A difference between two models is decided when it exceeds about two of them."""
    return math.sqrt(p * (1 - p) / n) if n else None


def recovery(student_acc: float, teacher_acc: float) -> float | None:
    """Share of the specialist's accuracy the student recovered; None when the teacher
    solved nothing (the ratio means nothing then)."""
    return student_acc / teacher_acc if teacher_acc > 0 else None


def teacher_name(domain: str) -> str:
    return f"teacher:{domain}"


def sft_name(teacher: str) -> str:
    """The supervised teacher's name in the report, when the final one had RL."""
    return f"{teacher}:supervised"


def build(
    scores: Sequence[Score],
    *,
    name: str,
    models: dict[str, dict[str, Any]],
    target_teacher_acc: float | None = None,
    target_recovery: float | None = None,
    target_tokens_ratio: float | None = None,
    cost: dict[str, dict[str, Any]] | None = None,
    target_wall_s: float | None = None,
    target_peak_gb: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-able dict: every cell, recovery per domain, targets; with
    ``cost`` (stage -> seconds and peak_rss_mb of its last run), what the pipeline took."""
    cell = {(s.model, s.domain): s for s in scores}
    domains = list(dict.fromkeys(s.domain for s in scores))
    rec = {}
    for d in domains:
        t, s = cell.get((teacher_name(d), d)), cell.get((STUDENT, d))
        if t and s:
            rec[d] = {
                "teacher": t.pass1,
                "student": s.pass1,
                "ratio": recovery(s.pass1, t.pass1),
                "teacher_tokens_per_correct": t.tokens_per_correct,
                "student_tokens_per_correct": s.tokens_per_correct,
            }
            if sup := cell.get((sft_name(teacher_name(d)), d)):  # before specialist RL
                rec[d].update(
                    teacher_supervised=sup.pass1,
                    teacher_supervised_tokens_per_correct=sup.tokens_per_correct,
                )
            if sft := cell.get((STUDENT_SFT, d)):  # recovery before mixed RL too
                rec[d].update(
                    distilled=sft.pass1,
                    distilled_ratio=recovery(sft.pass1, t.pass1),
                    distilled_tokens_per_correct=sft.tokens_per_correct,
                )
    report = {
        "version": REPORT_VERSION,
        "name": name,
        "models": models,
        "domains": domains,
        "scores": [{**asdict(s), "stderr": stderr(s.pass1, s.tasks)} for s in scores],
        "recovery": rec,
        "targets": check_targets(scores, rec, target_teacher_acc, target_recovery)
        + token_targets(rec, target_tokens_ratio),
    }
    if cost is not None:
        report["cost"] = cost
        report["targets"] += cost_targets(cost, target_wall_s, target_peak_gb)
    report.update(extra or {})
    return report


def cost_targets(
    cost: dict[str, dict[str, Any]], wall_s: float | None, peak_gb: float | None
) -> list[dict[str, Any]]:
    """The time and memory targets (lower is better): the stages' seconds added up and
    the largest peak; not measured when a stage's record has no figure (an old run)."""
    out = []
    for goal, key, what, unit, scale in (
        (wall_s, "seconds", "pipeline time (stage seconds added up)", "s", 1.0),
        (peak_gb, "peak_rss_mb", "peak memory (largest of any stage)", "GB", 1 / 1024),
    ):
        if goal is None:
            continue
        missing = [s for s, c in cost.items() if c.get(key) is None]
        values = [c.get(key) for c in cost.values()]
        value = None if missing else (sum(values) if key == "seconds" else max(values)) * scale
        out.append(_at_most(what, goal, unit, value, "no figure for " + ", ".join(missing)))
    return out


def check_targets(
    scores: Sequence[Score],
    rec: dict[str, dict[str, Any]],
    target_teacher_acc: float | None,
    target_recovery: float | None,
) -> list[dict[str, Any]]:
    """Each target with the measured value, met or missed, and the gap when missed."""
    out = []
    if target_teacher_acc is not None:
        for s in scores:
            if s.model == teacher_name(s.domain):
                out.append(_target(f"{s.model} pass@1 on {s.domain}", s.pass1, target_teacher_acc))
    if target_recovery is not None:
        for d, r in rec.items():
            what = f"student recovery of teacher:{d} on {d}"
            if r["ratio"] is None:  # teacher at 0%: student >= goal * teacher holds trivially
                out.append(
                    {
                        "target": what,
                        "goal": target_recovery,
                        "value": None,
                        "met": None,  # a ratio to 0% means nothing: neither met nor missed
                        "gap": None,
                        "note": "not applicable: the teacher solved nothing",
                    }
                )
            else:
                out.append(_target(what, r["ratio"], target_recovery))
    return out


def token_targets(rec: dict[str, dict[str, Any]], goal: float | None) -> list[dict[str, Any]]:
    """Tokens per correct answer (lower is better): the student's over the supervised
    teacher's (the teacher before specialist RL, or the teacher when it had none), per
    domain. Not measured where either solved nothing (no correct answer to count)."""
    out = []
    for d, r in rec.items() if goal is not None else ():
        teacher = r.get("teacher_supervised_tokens_per_correct", r["teacher_tokens_per_correct"])
        student = r["student_tokens_per_correct"]
        value = None if not teacher or student is None else student / teacher
        what = f"student tokens per correct / supervised teacher:{d}'s on {d}"
        out.append(_at_most(what, goal, "x", value, "no correct answer to count"))
    return out


def _at_most(
    what: str, goal: float, unit: str, value: float | None, missing: str
) -> dict[str, Any]:
    """A lower-is-better target (time, memory, tokens): met when ``value`` <= ``goal``;
    ``value`` None = not measured, neither met nor missed, and the note says why."""
    t = {"target": what, "goal": goal, "unit": unit, "value": value, "met": None, "gap": None}
    if value is None:
        t["note"] = "not measured: " + missing
    else:
        t.update(met=value <= goal, gap=max(0.0, value - goal))
    return t


def _target(what: str, value: float, goal: float) -> dict[str, Any]:
    return {
        "target": what,
        "goal": goal,
        "value": value,
        "met": value >= goal,
        "gap": max(0.0, goal - value),
    }


# --------------------------------------------------------------------------- rendering


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def model_names(report: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(s["model"] for s in report["scores"]))


def to_markdown(report: dict[str, Any]) -> str:
    """report.md: accuracy matrix, recovery, tokens per correct answer, targets."""
    cell = {(s["model"], s["domain"]): s for s in report["scores"]}
    models = model_names(report)
    lines = [f"# Evaluation report: {report['name']}", ""]
    if report.get("created"):
        lines += [
            f"Created {report['created']}"
            + (f" in {report['eval_s']:.0f} s" if report.get("eval_s") else "")
            + ".",
            "",
        ]
    lines += ["## Greedy pass@1 (domain × model)", ""]
    lines += ["| domain | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for d in report["domains"]:
        row = [_pct_se(cell[(m, d)]) if (m, d) in cell else "—" for m in models]
        lines.append(f"| {d} | " + " | ".join(row) + " |")
    lines += ["", "± one standard error, sqrt(p(1−p)/n) over the n eval tasks of the domain."]
    k = next((s["k"] for s in report["scores"] if s["passk"] is not None), None)
    if k is not None:
        lines += ["", f"## Sampled pass@{k} (domain × model)", ""]
        lines += ["| domain | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        for d in report["domains"]:
            row = [_pct(cell[(m, d)]["passk"]) if (m, d) in cell else "—" for m in models]
            lines.append(f"| {d} | " + " | ".join(row) + " |")
    if report["recovery"]:
        lines += ["", "## Recovery: student vs each specialist on its domain", ""]
        lines += [
            "| domain | teacher pass@1 | student pass@1 | recovery | teacher tokens/correct | student tokens/correct |",
            "|---|---|---|---|---|---|",
        ]
        for d, r in report["recovery"].items():
            lines.append(
                f"| {d} | {_pct(r['teacher'])} | {_pct(r['student'])} | {_pct(r['ratio'])} | "
                f"{_num(r['teacher_tokens_per_correct'])} | {_num(r['student_tokens_per_correct'])} |"
            )
        lines += [
            "",
            "Recovery = student pass@1 / teacher pass@1. Tokens/correct = mean completion "
            "tokens of the correct greedy answers (lower is cheaper).",
        ]
    lines += _bought_markdown(report)
    lines += ["", "## Tokens per correct answer (domain × model)", ""]
    lines += ["| domain | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for d in report["domains"]:
        row = [_num(cell[(m, d)]["tokens_per_correct"]) if (m, d) in cell else "—" for m in models]
        lines.append(f"| {d} | " + " | ".join(row) + " |")
    lines += _cost_markdown(report)
    lines += _targets_markdown(report["targets"])
    lines += _kinds_markdown(report, models, cell)
    counts = {s["domain"]: s["tasks"] for s in report["scores"]}
    lines += [
        "",
        "Eval tasks per domain: " + ", ".join(f"{d} {n}" for d, n in counts.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def _pct_se(s: dict[str, Any]) -> str:
    se = s.get("stderr")
    return _pct(s["pass1"]) + (f" ±{100 * se:.1f}" if se is not None else "")


def _acc_tok(r: dict[str, Any], acc: str, tok: str) -> str:
    return f"{_pct(r[acc])} ({_num(r[tok])})" if r.get(acc) is not None else "—"


def _bought_markdown(report: dict[str, Any]) -> list[str]:
    """What each step bought, per domain: specialist RL (supervised → sharpened teacher),
    distillation (teacher → distilled student) and mixed RL (distilled → final student)."""
    rec = report["recovery"]
    if not any("distilled" in r or "teacher_supervised" in r for r in rec.values()):
        return []
    lines = ["", "## What each step bought (greedy pass@1, tokens per correct answer)", ""]
    lines += [
        "| domain | supervised teacher | + specialist RL | distilled student | + mixed RL | recovery distilled → + RL |",
        "|---|---|---|---|---|---|",
    ]
    for d, r in rec.items():
        sup = _acc_tok(r, "teacher_supervised", "teacher_supervised_tokens_per_correct")
        final_t = _acc_tok(r, "teacher", "teacher_tokens_per_correct")
        dist = _acc_tok(r, "distilled", "distilled_tokens_per_correct")
        final_s = _acc_tok(r, "student", "student_tokens_per_correct")
        ratios = f"{_pct(r.get('distilled_ratio'))} → {_pct(r['ratio'])}"
        lines.append(
            f"| {d} | {sup} | {final_t if sup != '—' else '—'} | {dist} | {final_s} | {ratios} |"
        )
    lines += [
        "",
        "A teacher without specialist RL shows — in its first two columns; its one score is "
        "the teacher column of the recovery table.",
    ]
    return lines


MAX_KINDS = 24  # a domain with more kinds of task (agents' combinations) stays in report.json


def _kinds_markdown(report: dict[str, Any], models: list[str], cell: dict) -> list[str]:
    """Greedy pass@1 per kind of task, per domain whose tasks name their kind: where a
    model fails. The rollouts themselves are in samples/<model>.<domain>.jsonl."""
    lines = []
    for d in report["domains"]:
        ms = [m for m in models if (cell.get((m, d)) or {}).get("by_kind")]
        kinds: dict[str, int] = {}
        for m in ms:
            for k, (_, n) in cell[(m, d)]["by_kind"].items():
                kinds[k] = max(kinds.get(k, 0), n)
        if not kinds or len(kinds) > MAX_KINDS:
            continue
        if not lines:
            lines += ["", "## Greedy pass@1 by kind of task (passed/tasks)", ""]
        lines += [f"**{d}**", "", "| kind | " + " | ".join(ms) + " |", "|---" * (len(ms) + 1) + "|"]
        for k in sorted(kinds, key=lambda k: -kinds[k]):
            row = []
            for m in ms:
                p, n = cell[(m, d)]["by_kind"].get(k, (0, 0))
                row.append(f"{p}/{n}" if n else "—")
            lines.append(f"| {k} | " + " | ".join(row) + " |")
        lines.append("")
    if lines:
        lines.append("Every greedy rollout with its verdict: `samples/<model>.<domain>.jsonl`.")
    return lines


def _status(t: dict[str, Any], missed: str) -> str:
    if t["met"] is None:
        return t.get("note") or "not applicable"
    if t["met"]:
        return "met"
    if t.get("unit"):
        return f"{missed} by {_amount(t['gap'], t['unit'])}"
    return f"{missed} by {100 * t['gap']:.1f} points"


def _amount(x: float | None, unit: str | None) -> str:
    """A target's value: a percentage, or seconds / GB / a ratio for the lower-is-better targets."""
    if unit is None or x is None:
        return _pct(x)
    if unit == "x":  # a ratio
        return f"{x:.2f}x"
    return f"{x:.0f} s" if unit == "s" else f"{x:.2f} {unit}"


def _goal(t: dict[str, Any]) -> str:
    return f"<= {_amount(t['goal'], t['unit'])}" if t.get("unit") else f">= {_pct(t['goal'])}"


def _cost_markdown(report: dict[str, Any]) -> list[str]:
    cost = report.get("cost")
    if not cost:
        return []
    lines = ["", "## What the pipeline took (each stage's last run)", ""]
    # ru_maxrss: a process's peak since it started, so within one `distill run` each
    # stage shows the peak up to its end; the largest is the run's peak
    lines += ["| stage | seconds | peak memory so far |", "|---|---|---|"]
    for stage, c in cost.items():
        sec = "—" if c.get("seconds") is None else f"{c['seconds']:.0f}"
        mem = "—" if c.get("peak_rss_mb") is None else f"{c['peak_rss_mb'] / 1024:.2f} GB"
        lines.append(f"| {stage} | {sec} | {mem} |")
    secs = [c.get("seconds") for c in cost.values()]
    if all(s is not None for s in secs):
        lines.append(f"| all | {sum(secs):.0f} | |")
    return lines


def _targets_markdown(targets: list[dict[str, Any]]) -> list[str]:
    if not targets:
        return []
    met = sum(t["met"] is True for t in targets)
    applicable = sum(t["met"] is not None for t in targets)
    na = len(targets) - applicable
    lines = [
        "",
        f"## Targets: {met} of {applicable} met" + (f" ({na} not applicable)" if na else ""),
        "",
    ]
    lines += ["| target | goal | measured | status |", "|---|---|---|---|"]
    for t in targets:
        status = _status(t, "**MISSED**")
        value = _amount(t["value"], t.get("unit"))
        lines.append(f"| {t['target']} | {_goal(t)} | {value} | {status} |")
    return lines


def write(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and report.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    paths["json"].write_text(json.dumps(report, indent=1))
    paths["md"].write_text(to_markdown(report))
    chart(report, paths["png"])
    return paths


def chart(report: dict[str, Any], path: str | Path) -> None:
    """report.png: the :func:`figure` of ``report``."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path)
    plt.close(fig)


TEACHER_COLOR, DISTILLED_COLOR, STUDENT_COLOR = "#4C72B0", "#C9A27E", "#DD8452"
OTHER_COLORS = ("#55A868", "#8172B2", "#64B5CD", "#C44E52", "#937860", "#DA8BC3")


def series(report: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any] | None]]]:
    """The bars the chart draws, as ``(label, color, one cell per domain)``: only what
    was evaluated. A pipeline's report: each domain's teacher, then the student (the
    distilled one and the one after mixed RL, when RL ran); a one-off report: each model
    it evaluated, by its name."""
    cell = {(s["model"], s["domain"]): s for s in report["scores"]}
    domains, models = report["domains"], model_names(report)

    def cells(model: str) -> list[dict[str, Any] | None]:
        return [cell.get((model, d)) for d in domains]

    out = []
    teachers = [cell.get((teacher_name(d), d)) for d in domains]
    pipeline = any(teachers) or STUDENT_SFT in models
    if any(teachers):
        out.append(("teacher", TEACHER_COLOR, teachers))
    if STUDENT_SFT in models:  # what distillation bought, then mixed RL
        out.append(("student (distilled)", DISTILLED_COLOR, cells(STUDENT_SFT)))
        out.append(("student (+ RL)", STUDENT_COLOR, cells(STUDENT)))
    elif pipeline and STUDENT in models:
        out.append(("student", STUDENT_COLOR, cells(STUDENT)))
    drawn = {STUDENT, STUDENT_SFT} if pipeline else set()
    named = [m for m in models if not m.startswith("teacher:") and m not in drawn]
    for i, m in enumerate(named):
        out.append((m, OTHER_COLORS[i % len(OTHER_COLORS)], cells(m)))
    return out


def figure(report: dict[str, Any]):
    """Greedy pass@1 and tokens per correct answer per domain, one bar per evaluated
    model, every bar labelled with its value (0% included); the student's recovery of
    each specialist under the domain's name when there are specialists."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    domains = report["domains"]
    bars = series(report)
    x = list(range(len(domains)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=90)
    w = 0.8 / max(len(bars), 1)
    for i, (label, color, cells) in enumerate(bars):
        at = [(xi + (i - (len(bars) - 1) / 2) * w, c) for xi, c in zip(x, cells, strict=True) if c]
        xs = [a for a, _ in at]
        acc = ax1.bar(xs, [100 * c["pass1"] for _, c in at], w, label=label, color=color)
        ax1.bar_label(acc, [f"{100 * c['pass1']:.0f}%" for _, c in at], fontsize=7, padding=1)
        tok = ax2.bar(xs, [c["tokens_per_correct"] or 0 for _, c in at], w, color=color)
        ax2.bar_label(tok, [_tokens(c["tokens_per_correct"]) for _, c in at], fontsize=7, padding=1)
    ticks = []
    for d in domains:
        r = report["recovery"].get(d)
        ticks.append(
            f"{d}\nrecovery {100 * r['ratio']:.0f}%" if r and r["ratio"] is not None else d
        )
    ax1.set(title="Greedy pass@1", ylabel="accuracy %", ylim=(0, 112))
    none = any(c and c["tokens_per_correct"] is None for _, _, cs in bars for c in cs)
    ax2.set(
        title="Tokens per correct answer" + (" (n/a: none correct)" if none else ""),
        ylabel="completion tokens",
    )
    ax2.margins(y=0.12)  # room for the labels above the tallest bar
    for ax in (ax1, ax2):
        ax.set_xticks(x, ticks if ax is ax1 else domains)
    title = f"{report['name']}: " + (
        "student vs specialists"
        if any(label == "teacher" for label, _, _ in bars)
        else "held-out evaluation"
    )
    fig.suptitle(title, fontsize=11)
    if len(bars) > 1:
        fig.legend(loc="lower center", ncol=len(bars), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    return fig


def _tokens(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def print_table(report: dict[str, Any], console=None) -> None:
    """One row per (model, domain): pass@1, pass@k, tokens per correct answer and, for
    the student, its recovery of that domain's teacher; then the targets."""
    from rich.table import Table

    if console is None:
        from distill.progress import console
    k = next((s["k"] for s in report["scores"] if s["passk"] is not None), None)
    table = Table(title=f"{report['name']}: held-out evaluation")
    cols = ["domain", "model", "pass@1", f"pass@{k or 'k'}", "tokens/correct"]
    for col in cols + (["recovery"] if report["recovery"] else []):
        left = col in ("domain", "model")
        table.add_column(col, justify="left" if left else "right", no_wrap=col == "model")
    order = {m: i for i, m in enumerate(model_names(report))}
    rows = sorted(
        report["scores"], key=lambda s: (report["domains"].index(s["domain"]), order[s["model"]])
    )
    for s in rows:
        r = report["recovery"].get(s["domain"]) or {}
        # the student's recovery of the domain's teacher (before mixed RL too, when it ran)
        ratio = {STUDENT: "ratio", STUDENT_SFT: "distilled_ratio"}.get(s["model"])
        row = [s["domain"], s["model"], _pct(s["pass1"]), _pct(s["passk"])]
        row.append(_num(s["tokens_per_correct"]))
        if report["recovery"]:
            row.append(_pct(r.get(ratio)) if ratio and ratio in r else "")
        table.add_row(*row)
    console.print(table)
    for t in report["targets"]:
        mark = _status(t, "MISSED")
        mark = f"[green]{mark}[/]" if t["met"] else f"[red]{mark}[/]" if t["met"] is False else mark
        console.print(
            f"  target {t['target']} {_goal(t)}: {_amount(t['value'], t.get('unit'))} {mark}"
        )

"""The eval stage: held-out tasks of every domain, each teacher on its own domain (or on
all), the student on all; greedy pass@1, sampled pass@k and tokens per correct answer;
the recovery report in ``<out>/eval/`` (report.md, report.json, report.png).

:func:`evaluate_model` also serves the one-off ``distill eval --model DIR`` on any HF
model directory or OpenAI-compatible endpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import UserError
from distill.eval import report as rep
from distill.progress import StageBar, console
from distill.recipe.schema import DomainConfig, EvalConfig, GenerateConfig, Recipe, TeacherConfig
from distill.rl.specialist import base_dir, teacher_dir
from distill.tasks import tasks_for
from teachers.base import Task, get_domain


@dataclass
class ModelSpec:
    """A model to evaluate: an HF directory (``path``) or an endpoint (``teacher``)."""

    name: str
    path: Path | None = None
    teacher: TeacherConfig | None = None
    kind: str = "hf"

    def describe(self) -> dict[str, Any]:
        if self.path is not None:
            return {"kind": self.kind, "path": str(self.path), "params": count_params(self.path)}
        t = self.teacher
        return {"kind": t.kind, "base_url": t.base_url, "model": t.model, "path": t.path}


def count_params(path: str | Path) -> int | None:
    """Parameters of an HF directory, from the safetensors headers (no weights loaded)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total, seen = 0, set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key not in seen:
                    seen.add(key)
                    n = 1
                    for dim in st.get_slice(key).get_shape():
                        n *= dim
                    total += n
    return total


def eval_tasks(domain: str, cfg: DomainConfig, seed: int, n: int | None = None) -> list[Task]:
    """The held-out tasks of ``domain`` (:func:`distill.tasks.tasks_for`)."""
    return tasks_for(domain, cfg, seed, "eval", n)


def decode_limits(cfg: DomainConfig, gen: GenerateConfig) -> tuple[int, int, int]:
    """(max_new_tokens, max_turns, max_episode_tokens) of a domain's eval rollouts: the
    domain's token limit, else generate's (RL's held-out scores use the same)."""
    return cfg.max_new_tokens or gen.max_new_tokens, gen.max_turns, gen.max_episode_tokens


def _verify(domain: str, tasks: list[Task], traces: list) -> list:
    """Verdict of every trace against its task (the domain's own verifier)."""
    from distill.verify import verify_many

    by_id = {t.id: t for t in tasks}
    items = [(by_id[tr.task_id], tr.messages) for tr in traces]
    # a process pool costs seconds to start: not worth it for a handful of traces
    workers = 1 if len(items) <= 16 else None
    return verify_many(domain, items, workers=workers)


def task_kind(task: Task) -> str | None:
    """A short name of what a task asks for, when its generator says (``meta.kind``, or
    the operations of an agents task): per-kind failure counts show where a model fails."""
    meta = task.meta or {}
    if meta.get("kind"):
        return str(meta["kind"])
    ops = meta.get("ops")
    if isinstance(ops, list) and ops and all(isinstance(o, dict) for o in ops):
        return "+".join(str(o.get("op")) for o in ops)
    return None


def sample_records(
    tasks: list[Task], traces: list, verdicts: list, sampled: dict[str, list[bool]] | None = None
) -> list[dict[str, Any]]:
    """One JSON-able record per greedy eval rollout: what was asked, what the model did,
    and the verifier's reason (``eval/samples/*.jsonl``, for reading failures); with
    ``eval.pass_k`` > 1 also the task's sampled verdicts, so that two models' sampled
    pass rates can be compared task by task."""
    by_id = {t.id: t for t in tasks}
    return [
        {
            "task_id": tr.task_id,
            "kind": task_kind(by_id[tr.task_id]),
            "passed": v.passed,
            "reason": v.reason,
            "finish_reason": tr.finish_reason,
            "completion_tokens": tr.completion_tokens,
            "messages": tr.messages,
            **({"sampled_passed": sampled[tr.task_id]} if sampled else {}),
        }
        for tr, v in zip(traces, verdicts, strict=True)
    ]


def score_domain(
    backend,
    spec: ModelSpec,
    domain: str,
    cfg: DomainConfig,
    tasks: list[Task],
    gen: GenerateConfig,
    ev: EvalConfig,
    seed: int,
) -> tuple[rep.Score, list[dict[str, Any]]]:
    """Greedy and sampled rollouts of one model on one domain's eval tasks: its report
    cell and a record of every greedy rollout."""
    from distill.backends import Sampling
    from distill.rollout import rollout

    dom = get_domain(domain)
    max_new, max_turns, max_episode_tokens = decode_limits(cfg, gen)
    common = dict(
        max_turns=max_turns,
        max_episode_tokens=max_episode_tokens,
        teacher=spec.name,
        split="eval",
    )
    greedy = rollout(
        backend,
        dom,
        tasks,
        n=1,
        sampling=Sampling(temperature=0.0, max_new_tokens=max_new, seed=seed),
        **common,
    )
    g_verdicts = _verify(domain, tasks, greedy)
    g_pass = [v.passed for v in g_verdicts]
    samples: dict[str, list[bool]] = {t.id: [] for t in tasks}
    if ev.pass_k > 1:
        top_p = cfg.top_p or gen.top_p
        s = Sampling(temperature=ev.temperature, top_p=top_p, max_new_tokens=max_new, seed=seed + 1)
        sampled = rollout(backend, dom, tasks, n=ev.pass_k, sampling=s, **common)
        for tr, v in zip(sampled, _verify(domain, tasks, sampled), strict=True):
            samples[tr.task_id].append(v.passed)
    outcomes = [
        rep.Outcome(tr.task_id, ok, int(tr.completion_tokens or 0), samples.get(tr.task_id, []))
        for tr, ok in zip(greedy, g_pass, strict=True)
    ]
    records = sample_records(tasks, greedy, g_verdicts, samples if ev.pass_k > 1 else None)
    out = rep.score(spec.name, domain, outcomes, ev.pass_k)
    out.by_kind = rep.by_kind([r["kind"] for r in records], g_pass)
    return out, records


def write_samples(path: Path, records: list[dict[str, Any]]) -> None:
    """The per-task records of one (model, domain), written whole then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


def evaluate_model(
    spec: ModelSpec,
    domains: dict[str, DomainConfig],
    *,
    gen: GenerateConfig,
    ev: EvalConfig,
    seed: int = 0,
    tasks: dict[str, list[Task]] | None = None,
    samples_dir: Path | None = None,
    bar: StageBar | None = None,
) -> list[rep.Score]:
    """Scores of one model on each of ``domains`` (one backend for all of them); with
    ``samples_dir``, every greedy rollout goes to ``<samples_dir>/<model>.<domain>.jsonl``.
    Each domain done advances ``bar``, or prints a line without one."""
    from distill.backends import make_backend

    tasks = tasks or {}
    backend = make_backend(spec.teacher, path=spec.path, batch_size=ev.batch_size)
    scores = []
    try:
        for d, cfg in domains.items():
            t0 = time.time()
            if bar is not None:
                bar.advance(0, what=f"{spec.name} on {d}")
            ts = tasks.get(d) or eval_tasks(d, cfg, seed)
            s, records = score_domain(backend, spec, d, cfg, ts, gen, ev, seed)
            if samples_dir is not None:
                write_samples(samples_dir / f"{_slug(spec.name)}.{d}.jsonl", records)
            if bar is not None:  # the stage's table shows every score at the end
                bar.advance(1)
            else:
                console.print(
                    f"eval {spec.name} on {d}: pass@1 {s.pass1:.1%}"
                    + (f", pass@{s.k} {s.passk:.1%}" if s.passk is not None else "")
                    + f" ({s.tasks} tasks, {time.time() - t0:.0f} s)"
                )
            scores.append(s)
    finally:
        backend.close()
    return scores


def models_of(recipe: Recipe) -> list[tuple[ModelSpec, list[str]]]:
    """Every teacher with the domains it is evaluated on, then the student on all."""
    active = recipe.active_domains()
    out = []
    for d in active:
        t = recipe.teachers[d]
        on = active if recipe.eval.teachers_on_all_domains else [d]
        name = rep.teacher_name(d)
        if t.kind == "openai":
            out.append((ModelSpec(name, teacher=t, kind="openai"), on))
            continue
        if t.rl.enabled:  # the supervised teacher too: what its RL bought
            out.append((ModelSpec(rep.sft_name(name), path=base_dir(recipe, d), kind=t.kind), [d]))
        out.append((ModelSpec(name, path=teacher_dir(recipe, d), teacher=t, kind=t.kind), on))
    if recipe.rl.enabled:  # the final student is the RL-trained one; the distilled one beside it
        out.append(
            (ModelSpec(rep.STUDENT_SFT, path=recipe.out / "student", kind="student"), active)
        )
        out.append((ModelSpec(rep.STUDENT, path=recipe.out / "rl", kind="student"), active))
    else:
        out.append((ModelSpec(rep.STUDENT, path=recipe.out / "student", kind="student"), active))
    return out


def run(recipe: Recipe) -> dict[str, Any]:
    """The eval stage (``distill eval RECIPE``): writes and prints the recovery report."""
    from distill.rollout import turn_budget_warning
    from distill.train.save import add_eval, eval_markdown  # here: it imports torch

    t0 = time.time()
    active = recipe.active_domains()
    tasks = {d: eval_tasks(d, recipe.domains[d], recipe.seed) for d in active}
    for d, ts in tasks.items():
        if warning := turn_budget_warning(get_domain(d), ts, recipe.generate.max_turns):
            console.print(f"[yellow]warning[/]: {warning}")
    scores, models = [], {}
    out = recipe.out / "eval"
    samples = out / "samples"
    shutil.rmtree(samples, ignore_errors=True)  # no rollouts of an earlier run's models
    specs = models_of(recipe)
    for spec, _ in specs:
        if spec.path is not None and not (spec.path / "config.json").exists():
            stage = {
                rep.STUDENT: "rl" if recipe.rl.enabled else "train",
                rep.STUDENT_SFT: "train",
            }.get(spec.name, "teachers")
            raise UserError(f"{spec.path}: no model (run `distill {stage}` first)")
    # one bar over every (model, domain); no refresh thread: the verifiers' pool forks
    total = sum(len(on) for _, on in specs)
    with StageBar("eval", total=total, unit="evals", auto_refresh=False) as bar:
        for spec, on in specs:
            models[spec.name] = spec.describe()
            doms = {d: recipe.domains[d] for d in on}
            scores += evaluate_model(
                spec, doms, gen=recipe.generate, ev=recipe.eval, seed=recipe.seed, tasks=tasks,
                samples_dir=samples, bar=bar,
            )  # fmt: skip
    report = rep.build(
        scores,
        name=recipe.name,
        models=models,
        target_teacher_acc=recipe.eval.target_teacher_acc,
        target_recovery=recipe.eval.target_recovery,
        target_tokens_ratio=recipe.eval.target_tokens_ratio,
        cost=stage_costs(recipe, time.time() - t0),
        target_wall_s=recipe.eval.target_wall_s,
        target_peak_gb=recipe.eval.target_peak_gb,
        extra={
            "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "eval_s": time.time() - t0,
        },
    )
    paths = rep.write(report, out)
    for spec, _ in specs:  # a model this run wrote carries its scores in its model card
        if spec.path is not None and spec.path.is_relative_to(recipe.out):
            own = [s for s in scores if s.model == spec.name]
            add_eval(spec.path, eval_markdown(own, paths["md"]))
    rep.print_table(report)
    console.print(f"report: {paths['md']} (chart {paths['png']})")
    return {**report, "record": {"report": str(paths["json"])}}


def stage_costs(recipe: Recipe, eval_s: float) -> dict[str, dict[str, Any]]:
    """Seconds and peak memory of each stage's last run (from its record; None when it
    was not measured), and this eval's own."""
    from distill.stages import STAGES, peak_rss_mb, record_of

    cost = {}
    for stage in STAGES[:-1]:
        rec = record_of(recipe, stage) or {}
        cost[stage] = {"seconds": rec.get("seconds"), "peak_rss_mb": rec.get("peak_rss_mb")}
    cost["eval"] = {"seconds": round(eval_s, 1), "peak_rss_mb": round(peak_rss_mb())}
    return cost


def one_off(
    *,
    model: str | None = None,
    base_url: str | None = None,
    model_name: str | None = None,
    domains: list[str],
    n_tasks: int,
    out_dir: str | Path | None = None,
    recipe: Recipe | None = None,
) -> dict[str, Any]:
    """``distill eval --model DIR`` (or ``--base-url URL --model-name NAME``): one model,
    any domains, report written to ``out_dir``."""
    if bool(model) == bool(base_url):
        raise UserError("eval: give either --model DIR or --base-url URL --model-name NAME")
    if model:
        if not (Path(model) / "config.json").exists():
            raise UserError(f"--model {model}: not an HF model directory (no config.json)")
        spec = ModelSpec(Path(model).name or "model", path=Path(model), kind="hf")
    else:
        if not model_name:
            raise UserError("eval: --base-url needs --model-name")
        t = TeacherConfig(kind="openai", base_url=base_url, model=model_name)
        spec = ModelSpec(model_name, teacher=t, kind="openai")
    unknown = [d for d in domains if d not in _known()]
    if unknown:
        raise UserError(f"--domains: unknown domain {unknown[0]!r}; known: {', '.join(_known())}")
    base = recipe.domains if recipe else {}
    doms = {
        d: (base.get(d) or DomainConfig()).model_copy(update={"eval_tasks": n_tasks})
        for d in domains
    }
    gen = recipe.generate if recipe else GenerateConfig()
    ev = recipe.eval if recipe else EvalConfig()
    seed = recipe.seed if recipe else 0
    out = Path(out_dir) if out_dir else Path("data") / "eval" / _slug(spec.name)
    scores = evaluate_model(spec, doms, gen=gen, ev=ev, seed=seed, samples_dir=out / "samples")
    report = rep.build(
        scores,
        name=spec.name,
        models={spec.name: spec.describe()},
        extra={"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    )
    paths = rep.write(report, out)
    rep.print_table(report)
    console.print(f"report: {paths['md']}")
    return report


def _known() -> list[str]:
    from teachers.base import REGISTRY

    return list(REGISTRY)


def load_report(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / "report.json").read_text())

"""The filter stage: raw shards -> clean shards that hold only traces worth learning from.

Per domain, in order (each step configurable in ``recipe.filter`` and counted):
verify (the domain's verifier, worker pool) -> drop malformed -> drop failed -> exact
dedup -> near dedup (MinHash LSH) -> decontaminate (n-grams of every enabled domain's eval
tasks) -> select (pass-rate window, ``max_per_task``, ``max_per_domain``). Writes
``clean/<domain>/`` shards, ``clean/filter_report.{json,md}``, prints the funnel. On a
host of 8 cores or more the domains run side by side, one spawned process each, with the
same result (:func:`_parallel_domains`; ``DISTILL_FILTER_PARALLEL`` overrides).

Resumable per domain: a domain whose clean shards and funnel were completed with the same
stage fingerprint is kept as is; any other leftover of a previous run is replaced whole,
so a rerun on the same inputs writes the same shards.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distill.errors import UserError
from distill.filter.decontam import DECONTAM_VERSION, NgramIndex, eval_texts
from distill.filter.dedup import DEDUP_VERSION
from distill.filter.report import Funnel, summary, to_table, write_report
from distill.filter.steps import (
    FILTER_VERSION,
    decontaminate,
    dedup_exact,
    dedup_near,
    drop_failed,
    drop_malformed,
    pass_rates,
    select,
    trace_tokens,
)
from distill.messages import Trace
from distill.progress import console
from distill.recipe.schema import FilterConfig, Recipe
from distill.shards import ShardWriter, iter_traces, read_manifest
from distill.stages import fingerprint, stage_dir
from teachers.base import REGISTRY, get_domain, task_from_trace

DONE = "_filter.json"  # per domain, written after its manifest: the domain is complete
DROPPED = "_dropped.jsonl"  # per domain: every dropped row's id, step and reason
PARALLEL_ENV = "DISTILL_FILTER_PARALLEL"


def settings(cfg: FilterConfig) -> dict[str, Any]:
    """Filter settings and rule versions, as recorded in the report and in row lineage."""
    versions = {"filter": FILTER_VERSION, "dedup": DEDUP_VERSION, "decontam": DECONTAM_VERSION}
    return {"versions": versions, **cfg.model_dump(mode="json")}


def build_index(recipe: Recipe) -> NgramIndex:
    """n-gram index of the eval tasks (prompts and references) of every enabled domain."""
    from distill.tasks import tasks_for

    texts = []
    for d in recipe.active_domains():
        texts += eval_texts(tasks_for(d, recipe.domains[d], recipe.seed, "eval"), d)
    cfg = recipe.filter
    if cfg.decontam_short_ngram > cfg.decontam_ngram:
        raise UserError(
            f"filter.decontam_short_ngram ({cfg.decontam_short_ngram}) must not exceed "
            f"filter.decontam_ngram ({cfg.decontam_ngram})"
        )
    return NgramIndex(
        texts,
        cfg.decontam_ngram,
        cfg.decontam_short_ngram,
        cfg.decontam_boilerplate,
        cfg.decontam_overlap,
    )


def verify(
    domain: str, traces: list[Trace], workers: int | None, progress: Callable[[int], None] | bool
) -> None:
    """Store the domain verifier's verdict on every trace, and its name in the lineage."""
    from distill.verify import verify_many

    dom = get_domain(domain)
    items = [(task_from_trace(t), t.messages) for t in traces]
    for t, v in zip(traces, verify_many(domain, items, workers, progress), strict=True):
        t.verdict = v
        t.lineage.verifier = dom.verifier_name
        t.lineage.verifier_version = str(dom.verifier_version)


def _with_settings(trace: Trace, recorded: dict[str, Any]) -> Trace:
    try:
        extra = json.loads(trace.lineage.extra) if trace.lineage.extra else {}
    except json.JSONDecodeError:
        extra = {"previous": trace.lineage.extra}
    if not isinstance(extra, dict):
        extra = {"previous": extra}
    trace.lineage.extra = json.dumps({**extra, "filter": recorded}, sort_keys=True)
    return trace


def filter_traces(
    domain: str,
    traces: list[Trace],
    cfg: FilterConfig,
    index: NgramIndex | None,
    on_step: Callable[[str], None] = lambda name: None,
) -> tuple[list[Trace], Funnel, list[dict[str, str]]]:
    """Every step after verification (verdicts already on the traces), counted; returns
    the kept traces, the funnel and one ``{id, task_id, step, reason}`` per dropped row.
    ``on_step(name)`` is called as each step starts (progress display)."""
    funnel = Funnel(domain, len(traces))
    passed = sum(bool(t.verdict and t.verdict.passed) for t in traces)
    funnel.add("verify", len(traces), {}, passed=passed, failed=len(traces) - passed)
    rates = pass_rates(traces)
    steps = [
        ("malformed", cfg.drop_malformed, lambda ts: drop_malformed(ts, cfg.require_reasoning)),
        ("failed", True, lambda ts: drop_failed(ts, cfg.keep_failed)),
        ("dedup_exact", cfg.dedup_exact, lambda ts: dedup_exact(ts, cfg.dedup_with_prompt)),
        (
            "dedup_near",
            cfg.dedup_near,
            lambda ts: dedup_near(
                ts, cfg.near_threshold, cfg.num_perm, cfg.shingle_size, cfg.dedup_with_prompt
            ),
        ),
        ("decontaminate", cfg.decontaminate, lambda ts: decontaminate(ts, index)),
        (
            "select",
            True,
            lambda ts: select(
                ts,
                rates,
                max_per_task=cfg.max_per_task,
                prefer=cfg.prefer,
                pass_rate_min=cfg.pass_rate_min,
                pass_rate_max=cfg.pass_rate_max,
                max_per_domain=cfg.max_per_domain,
                num_perm=cfg.num_perm,
                shingle_size=cfg.shingle_size,
            ),
        ),
    ]
    alive, log = traces, []
    for name, enabled, step in steps:
        on_step(name)
        if not enabled:
            funnel.add(name, len(alive), {}, skipped=True)
            continue
        alive, dropped = step(alive)
        funnel.add(name, len(alive), dropped)
        for reason, ts in sorted(dropped.items()):
            log += [{"id": t.id, "task_id": t.task_id, "step": name, "reason": reason} for t in ts]
    return alive, funnel, log


class _Bar:
    """The stage's one bar: rows verified over every domain, the domain and step under
    way in its description. No refresh thread: verify workers fork while it is live."""

    def __init__(self, bar: Any, task: Any):
        self.bar, self.task, self.last = bar, task, 0.0

    def tick(self, n: int) -> None:
        self.bar.advance(self.task, n)
        if time.monotonic() - self.last > 0.1:  # ten redraws a second at most
            self.last = time.monotonic()
            self.bar.refresh()

    def step(self, domain: str, name: str) -> None:
        self.bar.update(self.task, description=f"filter {domain}: {name}")
        self.bar.refresh()

    def say(self, description: str, advance: int = 0) -> None:
        self.bar.update(self.task, description=description, advance=advance)
        self.bar.refresh()


@contextmanager
def _stage_bar(recipe: Recipe, domains: list[str], enabled: bool) -> Iterator[_Bar | None]:
    if not enabled:
        yield None
        return
    from distill.progress import progress

    rows = 0
    for d in domains:  # a domain without raw shards fails in filter_domain, with its name
        if (recipe.out / "raw" / d / "_manifest.json").exists():
            rows += read_manifest(recipe.out / "raw" / d)["rows"]
    bar = progress(auto_refresh=False)
    with bar:
        task = bar.add_task("filter", total=rows, unit="rows")
        yield _Bar(bar, task)
        bar.update(task, description="filter")
        bar.refresh()


def _complete(dst: Path, fp: str) -> dict[str, Any] | None:
    """The summary of a domain a previous run completed with fingerprint ``fp``."""
    try:
        done = json.loads((dst / DONE).read_text())
        manifest = read_manifest(dst)
    except (OSError, json.JSONDecodeError, UserError):
        return None
    if done.get("fingerprint") == fp and manifest.get("fingerprint") == fp:
        return done["summary"]
    return None


def filter_domain(
    recipe: Recipe, domain: str, index: NgramIndex | None, bar: _Bar | None = None
) -> dict[str, Any]:
    """Filter one domain's raw shards into ``clean/<domain>/``; its report entry. Rows
    verified advance ``bar``."""
    cfg, fp = recipe.filter, fingerprint(recipe, "filter")
    dst = stage_dir(recipe, "filter") / domain
    cached = _complete(dst, fp)
    if cached is not None:
        return cached
    src = recipe.out / "raw" / domain
    if not (src / "_manifest.json").exists():
        raise UserError(f"{src}: no raw shards for domain {domain} (run `distill generate` first)")
    clock = _Clock()
    traces = list(iter_traces(src, verify=True))  # a shard changed in place fails here
    clock.lap("read")
    for t in traces:
        if t.domain != domain:
            raise UserError(f"{src}: row {t.id} belongs to domain {t.domain!r}, not {domain!r}")
    if bar is not None:
        bar.step(domain, "verify")
    verify(domain, traces, cfg.workers, bar.tick if bar is not None else False)
    clock.lap("verify")
    on_step = (lambda name: bar.step(domain, name)) if bar is not None else (lambda name: None)
    kept, funnel, dropped = filter_traces(domain, traces, cfg, index, on_step)
    clock.lap("steps")
    dom = get_domain(domain)
    entry = summary(
        funnel,
        [trace_tokens(t) for t in kept],
        passed=funnel.steps[0]["passed"],
        tasks=len({t.task_id for t in traces}),
        tasks_kept=len({t.task_id for t in kept}),
        verifier=dom.verifier_name,
        verifier_version=str(dom.verifier_version),
    )
    shutil.rmtree(dst, ignore_errors=True)  # a partial earlier run is replaced whole
    recorded = settings(cfg)
    with ShardWriter(dst, max_rows=recipe.generate.shard_rows, fingerprint=fp) as w:
        w.write(_with_settings(t, recorded) for t in kept)
    (dst / DROPPED).write_text("".join(json.dumps(d) + "\n" for d in dropped))
    clock.lap("write")
    entry["seconds"] = clock.laps  # where the domain's time went (filter_report.json)
    (dst / DONE).write_text(json.dumps({"fingerprint": fp, "summary": entry}, indent=1))
    return entry


def run(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Run the filter stage for every enabled domain; returns the report."""
    out = stage_dir(recipe, "filter")
    domains = recipe.active_domains()
    fp = fingerprint(recipe, "filter")
    todo = [d for d in domains if _complete(out / d, fp) is None]
    index = build_index(recipe) if recipe.filter.decontaminate and todo else None
    report = {"fingerprint": fp, "settings": settings(recipe.filter), "domains": {}}
    procs = _parallel_domains(len(todo))
    with _stage_bar(recipe, todo, progress) as bar:
        done = _filter_parallel(recipe, todo, index, procs, bar) if procs > 1 else {}
        for d in domains:  # in the recipe's order whichever way they ran; cached ones read here
            report["domains"][d] = done[d] if d in done else filter_domain(recipe, d, index, bar)
    for stale in out.iterdir():  # clean data of domains no longer enabled must not be trained on
        if stale.is_dir() and stale.name in REGISTRY and stale.name not in domains:
            shutil.rmtree(stale)
    write_report(out, report)
    console.print(to_table(report))
    for d, e in report["domains"].items():
        if e["raw"] and not e["kept"]:
            console.print(f"[yellow]warning:[/] clean/{d} is empty: every raw trace was dropped")
    rows = {d: e["kept"] for d, e in report["domains"].items()}
    return {**report, "record": {"rows": rows, "report": "filter_report.json"}}


def _parallel_domains(n_todo: int) -> int:
    """Processes to filter ``n_todo`` domains in at once; 1 = one after the other in this
    process (with the per-row progress bar).

    Several only on a host of at least 8 cores, and then at most half of them: each
    domain's verifier runs its own worker pool (``filter.workers``, every core by default;
    the code verifier forks sandboxes), and on a 2-core CI or demo machine domains side by
    side would only fight those pools for the cores. ``DISTILL_FILTER_PARALLEL=0`` keeps
    the stage sequential on any host; ``DISTILL_FILTER_PARALLEL=N`` uses N processes (at
    most one per domain) on any host; ``auto`` or unset decides as above."""
    from distill.launch import MANY_CORES, env_count, usable_cores

    if (n := env_count(PARALLEL_ENV)) is not None:
        return max(1, min(n_todo, n))

    cores = usable_cores()
    if cores < MANY_CORES:
        return 1
    return max(1, min(n_todo, cores // 2))


def _filter_parallel(
    recipe: Recipe, todo: list[str], index: NgramIndex | None, procs: int, bar: _Bar | None
) -> dict[str, dict[str, Any]]:
    """Filter ``todo`` in ``procs`` spawned processes, one domain each; their report
    entries. Each domain writes only ``clean/<domain>/`` and its result does not depend on
    the others, so the shards are the same as a sequential run's. The bar advances by a
    domain's rows when it is done (workers cannot drive it row by row). If domains fail,
    those not started are cancelled, those running finish (their output is complete and
    kept for the rerun), and the error of the first failed one in recipe order is raised,
    as a sequential run would."""
    from concurrent.futures import CancelledError, as_completed

    from distill.errors import storage_error
    from distill.launch import spawn_pool

    if bar is not None:
        bar.say(f"filter: {', '.join(todo)} in {procs} processes")
    out: dict[str, dict[str, Any]] = {}
    failed: dict[str, BaseException] = {}
    # The Recipe (pydantic) and the NgramIndex (lists and numpy arrays: ~1 MB and a few ms
    # to pickle for recipes/gpu.yaml) pickle cheaply, so the index is built once, here.
    with spawn_pool(procs, _ignore_sigint) as pool:
        jobs = {pool.submit(_filter_in_worker, recipe, d, index): d for d in todo}
        try:
            for job in as_completed(jobs):
                d = jobs[job]
                try:
                    out[d] = job.result()
                except CancelledError:
                    continue
                except Exception as e:  # noqa: BLE001 - raised below, in recipe order
                    failed[d] = e
                    for other in jobs:  # not started yet: not worth starting now
                        other.cancel()
                    continue
                if bar is not None:
                    bar.say(f"filter: {d} done", advance=out[d]["raw"])
        except BaseException:  # Ctrl-C: start no other domain on the way out
            for other in jobs:
                other.cancel()
            raise
    for d in todo:
        if (e := failed.get(d)) is None:
            continue
        if isinstance(e, UserError):
            raise e  # as a sequential run raises it: the same one line
        if (disk := storage_error(e, stage_dir(recipe, "filter") / d)) is not None:
            raise disk from e  # a full or read-only disk: the user's to fix, as in this process
        raise UserError(f"filter.{d}: failed in its worker process ({e})") from e
    return out


def _ignore_sigint() -> None:
    """A domain's worker process: Ctrl-C reaches it only while it filters. An idle worker
    killed by Ctrl-C would break the pool, which then terminates the busy ones
    mid-verification and orphans their verifier workers, waiting forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _filter_in_worker(recipe: Recipe, domain: str, index: NgramIndex | None) -> dict[str, Any]:
    # interrupted, it unwinds as the sequential stage does: its verifier pool shuts down
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return filter_domain(recipe, domain, index, None)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Clock:
    """Seconds between laps, by name."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 3)
        self._t = now

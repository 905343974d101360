"""``distill generate``: every enabled domain's teacher answers that domain's training
tasks; traces land as raw shards in ``<out>/raw/<domain>/``.

Resumable: rows are written task by task in a fixed order, each sample seeded by
(recipe seed, task id, sample index), so a rerun after a crash regenerates exactly the
missing rows and skips the committed ones. Under ``accelerate launch`` each process takes
a disjoint slice of the tasks and writes its own shards (``part-r<rank>``); rank 0 writes
the manifest once every process is done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from distill.backends import Backend, Sampling, make_backend
from distill.errors import UserError
from distill.progress import StageBar, console
from distill.recipe.schema import Recipe
from distill.rollout import rollout_pairs, turn_budget_warning
from distill.shards import MANIFEST, ShardWriter, finalize, read_shard
from distill.stages import fingerprint, stage_dir
from distill.tasks import tasks_for
from teachers.base import Task, get_domain

FLUSH_EVERY_S = 30.0  # commit a (smaller) shard at least this often: a crash loses less


def run(recipe: Recipe) -> dict[str, Any]:
    """Generate raw traces for every enabled domain; returns rows per domain. On a
    multi-core CPU it runs in one process per core, each on its share of the tasks."""
    import torch
    from accelerate import PartialState

    from distill import launch

    if (procs := launch.cpu_procs()) > 1:
        return launch.spawn(run, recipe, procs=procs, what="generate")

    # without cpu=True, torchrun-launched ranks on a host without GPUs stay unconnected
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    fp = fingerprint(recipe, "generate")
    out = stage_dir(recipe, "generate")
    device = str(state.device)
    stats = {}
    tasks = {
        d: tasks_for(d, recipe.domains[d], recipe.seed, "train") for d in recipe.active_domains()
    }
    # one bar over every rank's tasks (rank 0 draws it)
    with StageBar("generate", total=sum(map(len, tasks.values())), unit="tasks") as bar:
        for d in recipe.active_domains():
            stats[d] = generate_domain(
                recipe, d, rank=rank, world=world, fp=fp, device=device, bar=bar, tasks=tasks[d]
            )
    state.wait_for_everyone()  # every rank's shards are committed before the manifest
    rows: dict[str, int] = {}
    if state.is_main_process:
        for d in recipe.active_domains():
            _drop_stale_journals(out / d, fp)
            rows[d] = finalize(out / d, fp)["rows"]
        per = ", ".join(f"{d} {n:,}" for d, n in rows.items())
        console.print(f"generate: {sum(rows.values()):,} rows in {out} ({per})")
        share = f" (process 0 of {world}: its share)" if world > 1 else ""
        for d, st in stats.items():
            if st["rows"]:
                console.print(f"  {d}{share}: {domain_speed(st)}")
    state.wait_for_everyone()
    # the stage record keeps where the time went (this rank's share of each domain)
    return {"rows": rows, "stats": stats, "record": {"rows": rows, "domains": stats}}


def domain_speed(st: dict[str, Any]) -> str:
    """One line of a domain's generation time: loading the teacher, then decoding."""
    rate = st["tokens"] / st["seconds"] if st["seconds"] else 0.0
    return (
        f"{st['rows']:,} rows, {st['tokens']:,} completion tokens in {st['seconds']:.1f} s "
        f"({rate:,.0f} tokens/s) after {st['setup_s']:.1f} s loading the teacher"
    )


def sampling_for(recipe: Recipe, domain: str) -> Sampling:
    """Sampling of a domain: its own overrides, else the generate section's defaults."""
    cfg, gen = recipe.domains[domain], recipe.generate
    return Sampling(
        temperature=gen.temperature if cfg.temperature is None else cfg.temperature,
        top_p=cfg.top_p or gen.top_p,
        max_new_tokens=cfg.max_new_tokens or gen.max_new_tokens,
        seed=recipe.seed,
        topk_logprobs=gen.topk_logprobs,
    )


def teacher_backend(recipe: Recipe, domain: str, device: str | None = None) -> Backend:
    """The backend of a domain's teacher; bootstrap teachers must have been trained."""
    from distill.rl.specialist import teacher_dir

    t = recipe.teachers[domain]
    path = teacher_dir(recipe, domain)  # the RL-sharpened teacher when its RL is on
    if path is not None and not (path / "config.json").is_file():
        raise UserError(f"{path}: no teacher for {domain}; run `distill teachers` first")
    return make_backend(t, path=path, batch_size=recipe.generate.batch_size, device=device)


def generate_domain(
    recipe: Recipe,
    domain: str,
    *,
    rank: int,
    world: int,
    fp: str,
    device: str | None,
    bar: StageBar | None = None,
    tasks: list[Task] | None = None,
) -> dict[str, Any]:
    """This rank's slice of one domain (of ``tasks``, default the domain's training
    tasks), resumed from what is already committed; finished tasks advance ``bar``."""
    gen, teacher = recipe.generate, recipe.teachers[domain]
    directory = stage_dir(recipe, "generate") / domain
    if tasks is None:
        tasks = tasks_for(domain, recipe.domains[domain], recipe.seed, "train")
    tasks = tasks[rank::world]
    bar = bar or StageBar(f"generate {domain}", len(tasks))  # not entered: only counts
    if rank == 0 and (
        warning := turn_budget_warning(get_domain(domain), tasks[:500], gen.max_turns)
    ):
        console.print(f"[yellow]warning[/]: {warning}")
    writer = ShardWriter(directory, max_rows=gen.shard_rows, fingerprint=fp, prefix=f"part-r{rank}")
    done = writer.committed_ids() | _committed_elsewhere(directory, writer.prefix, fp)
    k = gen.samples_per_task
    todo = [(t, j) for t in tasks for j in range(k) if f"{t.id}-s{j}" not in done]
    bar.advance(len(tasks) - len({t.id for t, _ in todo}), what=domain)  # done before
    stats = {"rows": 0, "tokens": 0, "seconds": 0.0, "setup_s": 0.0}
    if todo:
        t0 = time.time()
        backend = teacher_backend(recipe, domain, device)
        stats["setup_s"] = round(time.time() - t0, 2)
        chunk = 4 * max(gen.batch_size, teacher.max_concurrency if teacher.kind == "openai" else 1)
        try:
            _roll_chunks(recipe, domain, backend, todo, chunk, writer, fp, bar, stats)
        finally:
            backend.close()
    writer.close(finalize_manifest=False)
    return stats


def _roll_chunks(recipe, domain, backend, todo, chunk, writer, fp, bar, stats) -> None:
    """Roll out ``todo`` chunk by chunk (whole tasks per chunk), writing rows in order."""
    gen, sampling = recipe.generate, sampling_for(recipe, domain)
    start, last_flush = time.time(), time.time()
    i = 0
    while i < len(todo):
        end = min(i + chunk, len(todo))
        while end < len(todo) and todo[end][0].id == todo[end - 1][0].id:
            end += 1  # keep a task's samples together: the task counts as done at once
        traces = rollout_pairs(
            backend, get_domain(domain), todo[i:end], sampling=sampling,
            max_turns=gen.max_turns, max_episode_tokens=gen.max_episode_tokens,
            teacher=f"{recipe.teachers[domain].kind}:{domain}", split="train",
        )  # fmt: skip
        for tr in traces:
            tr.lineage.recipe_fingerprint = fp
        writer.write(traces)
        if time.time() - last_flush > FLUSH_EVERY_S:
            writer.flush()
            last_flush = time.time()
        tokens = sum(tr.completion_tokens or 0 for tr in traces)
        stats["rows"] += len(traces)
        stats["tokens"] += tokens
        stats["seconds"] = round(time.time() - start, 2)
        bar.advance(len({t.id for t, _ in todo[i:end]}), tokens=tokens)
        i = end


def _committed_elsewhere(directory: Path, prefix: str, fp: str) -> set[str]:
    """Row ids committed by other writers of this configuration (an earlier run with
    another number of processes): never written twice."""
    ids: set[str] = set()
    for j in directory.glob("_journal-*.json"):
        if j.name == f"_journal-{prefix}.json":
            continue
        journal = json.loads(j.read_text())
        if journal.get("fingerprint") != fp:
            continue
        for s in journal["shards"]:
            if (directory / s["file"]).exists():
                ids.update(read_shard(directory / s["file"]).column("id").to_pylist())
    return ids


def _drop_stale_journals(directory: Path, fp: str) -> None:
    """Remove journals (and their shards) of another configuration before the manifest."""
    for j in directory.glob("_journal-*.json"):
        journal = json.loads(j.read_text())
        if journal.get("fingerprint") != fp:
            for s in journal["shards"]:
                (directory / s["file"]).unlink(missing_ok=True)
            j.unlink()
    (directory / MANIFEST).unlink(missing_ok=True)

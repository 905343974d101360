"""Stage bookkeeping: output layout, fingerprints, skip-if-up-to-date.

A stage's fingerprint hashes the recipe sections it reads plus the fingerprints of the
stages it reads from, so a change upstream reruns everything downstream and nothing else.
A stage records ``<out>/<stage>/_stage.json`` when it completes; ``distill run`` skips a
stage whose record matches its current fingerprint and whose outputs are all still there.
One process at a time writes a stage (a lock the kernel drops when its holder dies).
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from distill import layout
from distill.errors import UserError, storage_errors
from distill.files import atomic_write_json, atomic_write_text, json_hash
from distill.recipe.base import fingerprint_data
from distill.recipe.schema import Recipe


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: everything the pipeline, the CLI and the fingerprints
    need to know about it. A new stage is one module with ``run(recipe)`` and one row."""

    name: str
    module: str  # its ``run(recipe)`` does the stage's work (imported when it runs)
    sections: tuple[str, ...]  # recipe sections it reads (top-level keys)
    upstream: tuple[str, ...]  # stages whose outputs it reads
    out: str  # where it writes, relative to the recipe's output dir
    force_arg: bool = False  # its run takes ``force`` (its own per-item skip yields to --force)


TABLE: tuple[Stage, ...] = (
    Stage("teachers", "distill.teachers", ("seed", "tokenizer", "domains", "teachers"), (),
          "teachers", force_arg=True),
    Stage("generate", "distill.generate", ("seed", "domains", "teachers", "generate"),
          ("teachers",), "raw"),
    Stage("filter", "distill.filter", ("domains", "filter"), ("generate",), "clean"),
    Stage("train", "distill.train", ("seed", "domains", "student", "train"),
          ("teachers", "filter"), "student"),
    Stage("rl", "distill.rl", ("seed", "domains", "generate", "rl"), ("train",), "rl"),
    Stage("eval", "distill.eval", ("seed", "domains", "eval"), ("teachers", "train", "rl"),
          "eval"),
)  # fmt: skip
BY_NAME = {s.name: s for s in TABLE}
STAGES = [s.name for s in TABLE]
# Per-domain settings only the student's training reads: tuning the mixture reruns train
# and eval, never the teachers, generation or the filter.
STUDENT_ONLY = ("sampling_weight", "loss_weight", "short_prompt_share")
RECORD = "_stage.json"
RECIPE_FILE = "_recipe.yaml"  # the whole resolved recipe, in every stage's run directory


def stage_dir(recipe: Recipe, stage: str) -> Path:
    """Where ``stage`` writes: ``<output_dir>/<its out>``."""
    return recipe.out / BY_NAME[stage].out


def record_dir(recipe: Recipe, stage: str) -> Path:
    """Where ``stage`` keeps its record and resolved recipe: its run directory,
    ``<output_dir>/runs/<its out>`` (a model directory holds the model alone)."""
    return layout.run_dir(stage_dir(recipe, stage), recipe.out)


def stage_fn(stage: str) -> Callable[..., Any]:
    """The ``run`` of a stage's module (imported only now: the imports are heavy)."""
    return import_module(BY_NAME[stage].module).run


def record_of(recipe: Recipe, stage: str) -> dict[str, Any] | None:
    """The completion record of ``stage``; None if it never completed (or it is corrupt)."""
    path = record_dir(recipe, stage) / RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def input_manifests(recipe: Recipe, stage: str) -> dict[str, list[str]]:
    """Shard checksums of every manifest under the stages ``stage`` reads from."""
    out: dict[str, list[str]] = {}
    for up in BY_NAME[stage].upstream:
        out.update(_manifests(recipe, up))
    return out


def _manifests(recipe: Recipe, stage: str) -> dict[str, list[str]]:
    """Shard checksums of every manifest ``stage`` wrote (its dir and one level down)."""
    out: dict[str, list[str]] = {}
    root = stage_dir(recipe, stage)
    for m in sorted(root.glob("*/_manifest.json")) + sorted(root.glob("_manifest.json")):
        try:
            shards = json.loads(m.read_text()).get("shards", [])
            out[str(m.relative_to(recipe.out))] = [s.get("sha256") for s in shards]
        except (OSError, json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            out[str(m.relative_to(recipe.out))] = ["<unreadable>"]
    return out


def missing_outputs(recipe: Recipe, stage: str) -> str | None:
    """What of its recorded outputs a completed stage no longer has (a manifest deleted
    or changed, a weights file gone), or None when they are all there as it left them."""
    rec = record_of(recipe, stage)
    if rec is None:
        return None
    d = stage_dir(recipe, stage)
    gone = [f for f in rec.get("weights") or {} if not (d / f).exists()]
    if gone:
        return f"{d / gone[0]} is gone"
    recorded = rec.get("outputs")
    if recorded is None:  # a record from before outputs were recorded
        return None
    now = _manifests(recipe, stage)
    for m in sorted(set(recorded) | set(now)):
        if m not in now:
            return f"{recipe.out / m} is gone"
        if recorded.get(m) != now[m]:
            return f"{recipe.out / m} changed"
    return None


def sections_read(recipe: Recipe, stage: str) -> dict[str, Any]:
    """The recipe sections ``stage`` reads, as JSON data (``domains`` without the
    student-only weights, except for train; no run-only field: ``distill.recipe.base.RUN_ONLY``)."""
    # run-only fields (logging, checkpoints, memory savers) change how, not what: left out
    data = fingerprint_data(recipe)
    parts = {s: data[s] for s in BY_NAME[stage].sections}
    if stage != "train" and "domains" in parts:
        parts["domains"] = {
            d: {k: v for k, v in cfg.items() if k not in STUDENT_ONLY}
            for d, cfg in parts["domains"].items()
        }
    return parts


def fingerprint(recipe: Recipe, stage: str) -> str:
    """Hash of the recipe sections ``stage`` reads, the fingerprints of the stages it
    reads from, and the checksums of their shards (data changed by hand counts too)."""
    parts: dict[str, Any] = sections_read(recipe, stage)
    for up in BY_NAME[stage].upstream:
        rec = record_of(recipe, up)
        parts[f"<{up}>"] = rec["fingerprint"] if rec else None
        if rec and rec.get("weights"):  # models retrained to other weights count too
            parts[f"<{up}:weights>"] = rec["weights"]
    manifests = input_manifests(recipe, stage)
    if manifests:  # absent key keeps fingerprints of manifest-less inputs unchanged
        parts["<manifests>"] = manifests
    return json_hash(parts)


def up_to_date(recipe: Recipe, stage: str) -> bool:
    """True when ``stage`` completed with exactly the inputs it would read now, and its
    outputs are still as it left them."""
    rec = record_of(recipe, stage)
    return (
        rec is not None
        and rec.get("fingerprint") == fingerprint(recipe, stage)
        and missing_outputs(recipe, stage) is None
    )


def header(recipe: Recipe, stage: str, force: bool = False) -> None:
    """A stage's opening, a few lines: its name and why it runs, the recipe keys that
    changed since its last complete run (``key: old → new``) and where it writes. The
    whole resolved recipe, with field descriptions, goes to ``<stage dir>/_recipe.yaml``
    (not the screen), so every output directory says exactly what produced it."""
    from rich.markup import escape

    from distill.pipeline import why_run
    from distill.progress import console
    from distill.recipe.doc import show_yaml

    why = why_run(recipe, stage, force=force)
    d = stage_dir(recipe, stage)
    console.print(f"\n[bold]── {stage}[/] · {escape(why.reason)}", highlight=False)
    for line in why.lines():
        console.print(f"   {line}", markup=False, highlight=False)
    console.print(
        f"   [dim]→ {escape(str(d))} (fingerprint {fingerprint(recipe, stage)}; "
        f"resolved recipe in {RECIPE_FILE})[/]",
        highlight=False,
    )
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record_dir(recipe, stage) / RECIPE_FILE, show_yaml(recipe))


def run_stage(recipe: Recipe, stage: str, force: bool = False) -> Any:
    """The one way a stage runs, for ``distill run`` and every stage command: its header,
    its module's ``run``, then its completion record with the seconds it took and the peak
    memory so far (the eval report adds these up against the recipe's targets).

    A stage's ``run`` returns a dict; ``None`` or ``{"complete": False}`` means it stopped
    early (e.g. at its time limit) and is not recorded. Its ``"record"`` entry, if any,
    goes into the record. Only the main process writes; under several processes every
    one waits for the record before it moves on (the next stage's fingerprint reads it)."""
    from distill.progress import quiet_libraries

    quiet_libraries()  # our bar and header say what runs; others' bars only add noise
    recipe.require_domains()  # before the first stage, not after three of them ran
    main = os.environ.get("RANK", "0") == "0"
    with (
        storage_errors(stage_dir(recipe, stage)),
        stage_lock(recipe, stage) if main else _no_lock(),
    ):
        if main:
            check_upstream_weights(recipe, stage)
            header(recipe, stage, force=force)
        t0 = time.time()
        kwargs = {"force": force} if BY_NAME[stage].force_arg else {}
        result = stage_fn(stage)(recipe, **kwargs)
        done = isinstance(result, dict) and result.get("complete", True)
        if main and done:
            info = dict(result.get("record") or {})
            info.update(seconds=round(time.time() - t0, 2), peak_rss_mb=round(peak_rss_mb()))
            mark_done(recipe, stage, **info)
            from distill.pipeline import save_inputs

            save_inputs(recipe, stage)  # what it read: the next run's header diffs against it
    _barrier()
    return result


def check_upstream_weights(recipe: Recipe, stage: str) -> None:
    """The model files ``stage`` reads must be the ones their stage recorded (sha256): a
    weights file changed in place would otherwise be decoded or trained on silently.
    Costs a hash of the upstream weights (about 1 s per GB) once per stage run."""
    from distill.shards.read import file_sha256

    for up in BY_NAME[stage].upstream:
        rec = record_of(recipe, up) or {}
        for name, sha in (rec.get("weights") or {}).items():
            path = stage_dir(recipe, up) / name
            if path.exists() and file_sha256(path) != sha:
                raise UserError(
                    f"{path}: changed since stage {up} completed (not the sha256 it recorded); "
                    "restore it, or delete it and run again to rebuild it"
                )


@contextmanager
def stage_lock(recipe: Recipe, stage: str) -> Iterator[None]:
    """Hold ``<out>/_pipeline/<stage>.lock`` while the stage runs: a second ``distill``
    process on the same stage fails at once (exit 2) instead of writing into the same
    directories. An flock: the kernel drops it when its holder dies, so a killed run never
    leaves it stuck."""
    import fcntl

    path = recipe.out / "_pipeline" / f"{stage}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(
                f"{stage_dir(recipe, stage)}: stage {stage} is being written by {holder}; "
                "wait for it to end (or stop it) and run again"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _no_lock() -> Iterator[None]:
    yield


def _barrier() -> None:
    import sys

    if "torch" in sys.modules:  # a stage that never imported torch ran in one process
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def mark_done(recipe: Recipe, stage: str, **info: Any) -> dict[str, Any]:
    """Record a completed stage: ``runs/<stage dir>/_stage.json``, written last, atomically."""
    d = stage_dir(recipe, stage)
    d.mkdir(parents=True, exist_ok=True)
    rec = {
        "stage": stage,
        "fingerprint": fingerprint(recipe, stage),
        "finished_at": time.time(),
        **info,
    }
    if weights := weights_digest(d):
        rec["weights"] = weights
    rec["outputs"] = _manifests(recipe, stage)  # deleted or changed later: it runs again
    atomic_write_json(record_dir(recipe, stage) / RECORD, rec)
    return rec


def weights_digest(d: Path) -> dict[str, str]:
    """sha256 of every model weight file a stage wrote (``*.safetensors`` in its dir and
    one level down, e.g. ``teachers/<domain>/``). A downstream stage's fingerprint
    includes it: a model retrained with the same recipe but different numerics (a new
    torch, a changed kernel) reruns what reads it, an identical one does not."""
    from distill.shards.read import file_sha256  # pyarrow: not at import time of the CLI

    files = sorted(d.glob("*.safetensors")) + sorted(d.glob("*/*.safetensors"))
    return {str(f.relative_to(d)): file_sha256(f) for f in files}


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024  # ru_maxrss is in KB on Linux


def invalidate(recipe: Recipe, stage: str) -> None:
    """Forget a stage's completion (it starts writing anew)."""
    (record_dir(recipe, stage) / RECORD).unlink(missing_ok=True)

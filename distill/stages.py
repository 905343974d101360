"""Stage bookkeeping: output layout, fingerprints, skip-if-up-to-date.

A stage's fingerprint hashes the recipe sections it reads plus the fingerprints of the
stages it reads from, so a change upstream reruns everything downstream and nothing else.
A stage records ``<out>/<stage>/_stage.json`` when it completes; ``distill run`` skips a
stage whose record matches its current fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

from distill.recipe import Recipe

STAGES = ["teachers", "generate", "filter", "train", "eval"]

# Recipe sections each stage reads (top-level keys) and the stages it reads from.
SECTIONS: dict[str, list[str]] = {
    "teachers": ["seed", "tokenizer", "domains", "teachers"],
    "generate": ["seed", "domains", "teachers", "generate"],
    "filter": ["domains", "filter"],
    "train": ["seed", "domains", "student", "train"],
    "eval": ["seed", "domains", "eval"],
}
UPSTREAM: dict[str, list[str]] = {
    "teachers": [],
    "generate": ["teachers"],
    "filter": ["generate"],
    "train": ["teachers", "filter"],
    "eval": ["teachers", "train"],
}
# Per-domain settings only the student's training reads: tuning the mixture reruns train
# and eval, never the teachers, generation or the filter.
STUDENT_ONLY = ("sampling_weight", "loss_weight")
# Where each stage writes, relative to the recipe's output dir.
DIRS = {
    "teachers": "teachers",
    "generate": "raw",
    "filter": "clean",
    "train": "student",
    "eval": "eval",
}
RECORD = "_stage.json"


def stage_dir(recipe: Recipe, stage: str) -> Path:
    """Where ``stage`` writes: ``<output_dir>/<DIRS[stage]>``."""
    return recipe.out / DIRS[stage]


def record_of(recipe: Recipe, stage: str) -> dict[str, Any] | None:
    """The completion record of ``stage``; None if it never completed (or it is corrupt)."""
    path = stage_dir(recipe, stage) / RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def input_manifests(recipe: Recipe, stage: str) -> dict[str, list[str]]:
    """Shard checksums of every manifest under the stages ``stage`` reads from."""
    out: dict[str, list[str]] = {}
    for up in UPSTREAM[stage]:
        root = stage_dir(recipe, up)
        for m in sorted(root.glob("*/_manifest.json")) + sorted(root.glob("_manifest.json")):
            try:
                shards = json.loads(m.read_text()).get("shards", [])
                out[str(m.relative_to(recipe.out))] = [s.get("sha256") for s in shards]
            except (OSError, json.JSONDecodeError, AttributeError):
                out[str(m.relative_to(recipe.out))] = ["<unreadable>"]
    return out


def sections_read(recipe: Recipe, stage: str) -> dict[str, Any]:
    """The recipe sections ``stage`` reads, as JSON data (``domains`` without the
    student-only weights, except for train)."""
    data = recipe.model_dump(mode="json")
    parts = {s: data[s] for s in SECTIONS[stage]}
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
    for up in UPSTREAM[stage]:
        rec = record_of(recipe, up)
        parts[f"<{up}>"] = rec["fingerprint"] if rec else None
        if rec and rec.get("weights"):  # models retrained to other weights count too
            parts[f"<{up}:weights>"] = rec["weights"]
    manifests = input_manifests(recipe, stage)
    if manifests:  # absent key keeps fingerprints of manifest-less inputs unchanged
        parts["<manifests>"] = manifests
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def up_to_date(recipe: Recipe, stage: str) -> bool:
    """True when ``stage`` completed with exactly the inputs it would read now."""
    rec = record_of(recipe, stage)
    return rec is not None and rec.get("fingerprint") == fingerprint(recipe, stage)


def mark_done(recipe: Recipe, stage: str, **info: Any) -> dict[str, Any]:
    """Record a completed stage (written last, atomically), next to the resolved recipe
    it ran with (``_recipe.yaml``)."""
    from distill.recipe_doc import show_yaml

    d = stage_dir(recipe, stage)
    d.mkdir(parents=True, exist_ok=True)
    (d / "_recipe.yaml").write_text(show_yaml(recipe))
    rec = {
        "stage": stage,
        "fingerprint": fingerprint(recipe, stage),
        "finished_at": time.time(),
        **info,
    }
    if weights := weights_digest(d):
        rec["weights"] = weights
    _write_record(d, rec)
    return rec


def _write_record(d: Path, rec: dict[str, Any]) -> None:
    """``<d>/_stage.json``, replaced atomically: a crash leaves the old record or the new."""
    tmp = d / (RECORD + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, d / RECORD)


def weights_digest(d: Path) -> dict[str, str]:
    """sha256 of every model weight file a stage wrote (``*.safetensors`` in its dir and
    one level down, e.g. ``teachers/<domain>/``). A downstream stage's fingerprint
    includes it: a model retrained with the same recipe but different numerics (a new
    torch, a changed kernel) reruns what reads it, an identical one does not."""
    from distill.shards_read import file_sha256  # pyarrow: not at import time of the CLI

    files = sorted(d.glob("*.safetensors")) + sorted(d.glob("*/*.safetensors"))
    return {str(f.relative_to(d)): file_sha256(f) for f in files}


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024  # ru_maxrss is in KB on Linux


def timed(recipe: Recipe, stage: str, fn, *args: Any, **kwargs: Any) -> Any:
    """Run one stage's ``fn`` and note in its record how long it took and this process's
    peak memory so far (the eval report adds these up against the recipe's time and memory
    targets). Only the main process notes it; a stage that did not complete is left as it is."""
    t0 = time.time()
    out = fn(*args, **kwargs)
    rec = record_of(recipe, stage)
    if os.environ.get("RANK", "0") == "0" and rec and rec.get("finished_at", 0) >= t0:
        rec.update(seconds=round(time.time() - t0, 1), peak_rss_mb=round(peak_rss_mb()))
        _write_record(stage_dir(recipe, stage), rec)
    return out


def invalidate(recipe: Recipe, stage: str) -> None:
    """Forget a stage's completion (it starts writing anew)."""
    (stage_dir(recipe, stage) / RECORD).unlink(missing_ok=True)

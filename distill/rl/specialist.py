"""Specialist RL: a teacher sharpened by GRPO on its own domain after its supervised phase
(``teachers.<domain>.rl``), as DeepSeek-V3.2 trains each specialist before distilling.

The sharpened teacher lands in ``<out>/teachers/<domain>-rl/`` (its run files in
``<out>/runs/teachers/<domain>-rl/``); ``generate`` samples from
it and ``eval`` scores it beside the supervised one. It is skipped while its record
matches: the supervised teacher's weights and the RL section (a change to one teacher's
RL reruns that teacher's RL only, never its supervised phase).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from distill import layout
from distill.files import atomic_write_json, json_hash
from distill.recipe import Recipe
from distill.recipe.base import fingerprint_data
from distill.rl.stage import heldout_for, limits_for, prompt_pools

RECORD = "_teacher_rl.json"


def base_dir(recipe: Recipe, d: str) -> Path:
    """The supervised teacher: the bootstrap model the stage trained, or the hf path."""
    t = recipe.teachers[d]
    return Path(t.path) if t.kind == "hf" else recipe.out / "teachers" / d


def sharpened_dir(recipe: Recipe, d: str) -> Path:
    """Where teacher ``d`` sharpened by RL is saved: a model directory of its own."""
    return recipe.out / "teachers" / f"{d}-rl"


def teacher_dir(recipe: Recipe, d: str) -> Path | None:
    """The teacher ``generate`` samples from: the sharpened one when its RL is on, else
    the supervised one; None for an openai teacher."""
    t = recipe.teachers[d]
    if t.kind == "openai":
        return None
    return sharpened_dir(recipe, d) if t.rl.enabled else base_dir(recipe, d)


def _weights_id(model_dir: Path) -> str:
    from distill.shards.read import file_sha256

    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    return json_hash([file_sha256(f) for f in files])


def sharpen(recipe: Recipe, d: str, force: bool = False) -> dict[str, Any] | None:
    """Run (or skip) teacher ``d``'s RL; None when it is off (any old output removed)."""
    from distill import launch
    from distill.progress import console

    t = recipe.teachers[d]
    out = sharpened_dir(recipe, d)
    run = layout.run_dir(out, recipe.out)
    if not t.rl.enabled or t.kind == "openai":
        if out.exists():
            shutil.rmtree(out)
        return None
    base = base_dir(recipe, d)
    # run-only fields (logs, checkpoints, eval_steps) change nothing the RL writes
    fp = json_hash(
        {"base": _weights_id(base), "rl": fingerprint_data(t.rl), "seed": recipe.seed,
         "domain": fingerprint_data(recipe.domains[d]),
         "generate": fingerprint_data(recipe.generate)}
    )  # fmt: skip
    try:
        rec = json.loads((run / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        rec = None
    if rec and rec.get("fingerprint") == fp and (out / "config.json").exists() and not force:
        console.print(f"teacher {d}: RL up to date in {out}")
        return rec
    (run / RECORD).unlink(missing_ok=True)
    console.print(f"teacher {d}: RL on its own domain ({t.rl.steps} steps) → {out}")
    args = (recipe, d, base, out)
    report = (
        launch.spawn(_train, *args, procs=procs, what=f"teacher {d} rl")
        if (procs := launch.cpu_procs()) > 1
        else _train(*args)
    )
    rec = {"fingerprint": fp, "domain": d, "steps": report["steps"], "seconds": report["seconds"],
           "last": report["last"]}  # fmt: skip
    atomic_write_json(run / RECORD, rec)
    return rec


def _train(recipe: Recipe, d: str, base: Path, out: Path) -> dict[str, Any]:
    from distill.rl.trainer import train_rl

    cfg = recipe.teachers[d].rl
    return train_rl(
        init=base,
        tasks=prompt_pools(recipe, cfg, [d]),
        cfg=cfg,
        limits={d: limits_for(recipe, d, cfg)},
        out_dir=out,
        run_dir=layout.run_dir(out, recipe.out),
        seed=recipe.seed,
        desc=f"teacher {d} rl",
        heldout=heldout_for(recipe, cfg, [d]),
    )

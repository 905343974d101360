"""Training checkpoints: accelerate state plus the trainer's own state, committed by rename.

``<out>/checkpoints/step-000040/`` holds what ``Accelerator.save_state`` writes (model,
optimizer, scheduler, RNG of every rank) and ``trainer_state.json`` (step, data position,
run fingerprint). It is written as ``step-000040.tmp`` and renamed when complete, so a run
killed mid-write resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

STATE = "trainer_state.json"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [
        p
        for p in ckpt_dir.glob("step-*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(ckpt_dir: Path, fingerprint: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint of this run configuration, if any."""
    for p in reversed(complete_checkpoints(ckpt_dir)):
        state = json.loads((p / STATE).read_text())
        if state.get("fingerprint") == fingerprint:
            return p, state
    return None


def save(accelerator, ckpt_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write a checkpoint on every rank; the main process commits it and prunes old ones."""
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f"step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def drop_incomplete(ckpt_dir: Path) -> None:
    """Remove checkpoints a killed run left half written (never renamed)."""
    for stale in ckpt_dir.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)

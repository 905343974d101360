"""A DSA student as train-stage phases: the dense student, a dense warm-up of the indexer,
then sparse training of everything (DeepSeek-V3.2's continued pre-training, on our clean
shards).

1. **dense**: the student as ``student.arch`` says, dense (``student.kind: scratch``);
   with ``student.kind: hf`` the model at ``student.path`` is it.
2. **convert**: its weights plus a new, seeded indexer per layer, marked ``index_warmup``.
3. **warm-up** (``train.dsa.warmup_steps``, ending early once the KL stops falling,
   ``train.dsa.warmup_plateau``): attention stays dense, every weight but the
   indexer's is frozen, and the loss is ``Σ_t KL(p_t ‖ softmax(I_t))`` over every
   earlier key of the trace, ``p_t`` the main attention summed over heads and
   L1-normalised.
4. **sparse** (``train.dsa.sparse_steps``): each query reads its top ``index_top_k``
   keys; the loss is the usual CE (+KD) plus the KL over the selected keys only. The
   indexer reads its input detached, so the KL trains the indexer alone and CE (through
   the non-differentiable top-k) never reaches it. Written to the stage's model
   directory (``student/``), where eval, serve and rl find it.

The models of the phases before the last are run files, in the run directory
(``runs/student/dsa/``: ``dense/model/``, ``init-<hash>/``, ``warmup-<hash>/model/``),
each phase's checkpoints beside its model; one tokenization cache serves them all.
Every phase is one call of :func:`distill.train.train`, so each resumes from its own
checkpoints. The phases after the first are named by a hash of what they start from,
so a changed dense student or indexer setting starts them afresh instead of resuming
stale checkpoints. The KL is normalised by the same global denominator as the CE (the
loss weight of the batch's loss tokens, all micro-batches and ranks) and averaged over
layers, so its gradient does not depend on how the batch is split.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from distill.dsa.config import is_dsa
from distill.files import json_hash
from distill.recipe.schema import DSATrainConfig, ModelArch, TrainConfig
from distill.train.loss import Objective


def objective_class(model) -> type[Objective]:
    """The trainer's objective for ``model``: :class:`DSAObjective` for a DSA model."""
    return DSAObjective if is_dsa(model) else Objective


class DSAObjective(Objective):
    """:class:`~distill.train.loss.Objective` plus the indexer's KL of every layer.

    A model whose config says ``index_warmup`` trains in the warm-up: dense attention,
    only the indexer's parameters trainable, loss = KL (the CE is still computed, for
    the per-domain columns). Otherwise the sparse phase: loss = CE (+KD) + KL."""

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.layers = model.attention_layers()
        self.warmup = bool(model.config.index_warmup)
        for layer in self.layers:
            layer.want_loss, layer.dense = True, self.warmup
        if self.warmup:
            keep = {id(p) for p in model.indexer_parameters()}
            for p in model.parameters():
                p.requires_grad_(id(p) in keep)
            # what the saved model will say: its indexer is warmed up, train it sparse next
            model.config.index_warmup = False

    def forward(self, **batch):
        total, dom_loss, dom_tokens = super().forward(**batch)
        kls = [a.index_loss for a in self.layers if a.index_loss is not None]
        if not kls:  # eval mode: no KL was kept
            return total, dom_loss, dom_tokens
        kl = torch.stack([x.float() for x in kls]).sum() / (batch["norm"] * len(self.layers))
        return (kl if self.warmup else total + kl), dom_loss, dom_tokens


def phases(arch: ModelArch):
    """:func:`distill.train.train`'s signature, running the DSA phases (see the module)."""

    def fit(**kwargs) -> dict:
        return train_dsa(arch=arch, **kwargs)

    return fit


def train_dsa(
    *,
    arch: ModelArch,
    init: str | Path | ModelArch,
    tokenizer_dir: str | Path,
    shards: dict[str, Path],
    out_dir: str | Path,
    cfg: TrainConfig,
    desc: str = "train",
    run_dir: str | Path | None = None,
    **kwargs,
) -> dict:
    """The dense student (unless ``init`` is already one), its conversion, warm-up and
    sparse training; returns the sparse phase's report with ``dsa``: each phase's steps,
    final loss and directory. A phase that stops early (``max_time_s``, a planned
    preemption) returns its report unfinished; rerunning resumes it."""
    from distill import layout
    from distill.progress import console
    from distill.train import train

    note = all_keys_note(arch, cfg)
    if note and os.environ.get("RANK", "0") == "0":  # once, not once per rank
        console.print(f"[yellow]note[/]: {note}")
    out = Path(out_dir)
    run = Path(run_dir) if run_dir is not None else layout.run_dir(out)
    where = run / "dsa"
    d = cfg.dsa
    plain = cfg.model_copy(update={"dsa": DSATrainConfig()})
    common = dict(tokenizer_dir=tokenizer_dir, shards=shards, **kwargs)
    done: dict[str, dict] = {}
    if isinstance(init, ModelArch):
        phase = where / "dense"
        _share_cache(phase, run)
        dense = dense_arch(init)
        rep = train(
            init=dense, out_dir=phase / "model", run_dir=phase, cfg=plain, desc=f"{desc} dense",
            **common,
        )  # fmt: skip
        done["dense"] = _summary(rep, phase / "model")
        if not rep["finished"]:
            return {**rep, "dsa": done}
        source = phase / "model"
    else:
        source = Path(init)
    src = convert(source, where, arch, seed=kwargs.get("seed", 0), warmup=d.warmup_steps > 0)
    if d.warmup_steps:
        wcfg = _phase_cfg(plain, d.warmup_steps, d.warmup_learning_rate, kd=False)
        named = {"init": src.name, "cfg": wcfg.model_dump()}
        if d.warmup_plateau is not None:  # absent when off: the phases named before resume
            named["plateau"] = d.warmup_plateau
        phase = _named(where, "warmup", named)
        _share_cache(phase, run)
        until = None if d.warmup_plateau is None else plateau(d.warmup_plateau)
        rep = train(
            init=src, out_dir=phase / "model", run_dir=phase, cfg=wcfg,
            desc=f"{desc} dsa warm-up", until=until, **common,
        )  # fmt: skip
        done["warmup"] = _summary(rep, phase / "model")
        if not rep["finished"]:
            return {**rep, "dsa": done}
        src = phase / "model"
    lr = d.sparse_learning_rate or cfg.learning_rate
    scfg = _phase_cfg(plain, d.sparse_steps, lr, kd=cfg.kd.enabled)
    rep = train(init=src, out_dir=out, run_dir=run, cfg=scfg, desc=f"{desc} dsa sparse", **common)
    done["sparse"] = _summary(rep, out)
    return {**rep, "dsa": done}


def all_keys_note(arch: ModelArch, cfg: TrainConfig) -> str | None:
    """Why the sparse phase will read every key, when it will: no trace is longer than
    ``train.max_length``, so at ``index_top_k`` >= it each query's top-k is every earlier
    key of its trace, and the phase trains dense attention plus the indexer's KL (no
    faster, no sparser). Said once, at the stage's start, not an error: a recipe may
    mean it (a small trial, an indexer trained for decoding longer contexts)."""
    if arch.index_top_k < cfg.max_length:
        return None
    return (
        f"student.arch.index_top_k {arch.index_top_k} >= train.max_length {cfg.max_length}: "
        "every query selects every earlier key of its trace, so the sparse phase trains "
        "dense attention plus the indexer (see docs/dsa.md, When DSA pays)"
    )


PLATEAU_WINDOW = 50  # steps a side of the warm-up's plateau test


def plateau(frac: float, window: int | None = None):
    """:func:`distill.train.train`'s ``until`` for the warm-up: "plateau" once the mean
    loss (the KL) of the last ``window`` steps is less than ``frac`` under the mean of the
    ``window`` before. On the demo (2 seeds, 2026-12-06) the warm-up's KL fell from 1.9 to
    1.4 in its first 100 steps, then to ~0.93 by step ~300 and no further in 400: a fixed
    100 steps had stopped a third of the way down."""

    window = window or PLATEAU_WINDOW

    def until(stats) -> str | None:
        losses = stats.losses
        if len(losses) < 2 * window:
            return None
        last = sum(losses[-window:]) / window
        before = sum(losses[-2 * window : -window]) / window
        return "plateau" if last > before * (1 - frac) else None

    return until


def _dsa_only(field: str) -> bool:
    """``attention`` and the ``index_*`` fields: read by the conversion, not by a dense model."""
    return field == "attention" or field.startswith("index_")


def dense_arch(arch: ModelArch) -> ModelArch:
    """The dense student of ``arch``: every field of :class:`ModelArch` but the DSA-only
    ones, which keep their defaults. Derived from the schema, so a field added to
    ``ModelArch`` reaches the dense student; and a changed indexer setting leaves the
    dense phase's fingerprint (and so its checkpoints) as they were."""
    keep = {f for f in ModelArch.model_fields if not _dsa_only(f)}
    return ModelArch(**arch.model_dump(include=keep))


def _phase_cfg(cfg: TrainConfig, steps: int, lr: float, kd: bool) -> TrainConfig:
    """A phase's settings: its steps and learning rate, the recipe's for the rest (its lr
    warmup at most a tenth of the phase; LoRA off: the phases train full weights)."""
    return cfg.model_copy(
        update={
            "max_steps": steps,
            "learning_rate": lr,
            "warmup_steps": min(cfg.warmup_steps, steps // 10),
            "lora": cfg.lora.model_copy(update={"enabled": False}),
            "kd": cfg.kd.model_copy(update={"enabled": kd}),
        }
    )


def _share_cache(phase_dir: Path, run: Path) -> None:
    """Every phase tokenizes the same shards: one cache, ``run/cache``, for all of them."""
    link = phase_dir / "cache"
    if link.is_symlink() or link.exists():
        return
    (run / "cache").mkdir(parents=True, exist_ok=True)
    phase_dir.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(os.path.relpath(run / "cache", phase_dir), target_is_directory=True)
    except OSError:  # another rank made it, or no symlinks here: then each phase has its own
        pass


def _summary(rep: dict, where: Path) -> dict:
    return {"steps": rep["steps"], "final_loss": rep["final_loss"], "dir": str(where)}


def _named(parent: Path, prefix: str, what: dict) -> Path:
    return parent / f"{prefix}-{json_hash(what, default=str)[:12]}"


def convert(source: Path, parent: Path, arch: ModelArch, seed: int, warmup: bool) -> Path:
    """``source`` (a dense HF directory) with a new indexer, saved once under ``parent``
    as ``init-<hash of source files and indexer settings>``. Every rank calls it: the
    main process alone hashes the source and builds and saves the model; the other
    ranks wait for it and get the path."""
    from accelerate import PartialState

    # the trainer's process group (as make_accelerator makes it): with student.kind hf no
    # training has made it yet
    state = PartialState(cpu=not torch.cuda.is_available())
    target = [_convert(source, parent, arch, seed, warmup) if state.is_main_process else None]
    if state.num_processes > 1:  # a failing main rank stops the others (distill/launch.py)
        torch.distributed.broadcast_object_list(target, src=0, device=state.device)
    return target[0]


def _convert(source: Path, parent: Path, arch: ModelArch, seed: int, warmup: bool) -> Path:
    from distill.dsa import register
    from distill.dsa.model import from_dense
    from distill.models import load_model, load_tokenizer

    settings = {
        "source": _digest(source),
        "heads": arch.index_heads,
        "dim": arch.index_head_dim,
        "top_k": arch.index_top_k,
        "seed": seed,
        "warmup": warmup,
    }
    target = _named(parent, "init", settings)
    if (target / "config.json").exists():
        return target
    register()
    dense = load_model(source)
    if is_dsa(dense):
        raise ValueError(f"{source}: already a DSA model; train it with student.kind: hf")
    model = from_dense(
        dense,
        index_n_heads=arch.index_heads,
        index_head_dim=arch.index_head_dim,
        index_top_k=arch.index_top_k,
        seed=seed,
        warmup=warmup,
    )
    # written beside it and renamed: a crash leaves no half directory under its name
    tmp = parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if (source / "tokenizer_config.json").exists():
        load_tokenizer(source).save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)  # a leftover without config.json
    os.replace(tmp, target)
    return target


def _digest(model_dir: Path) -> str:
    """A hash of a model directory's config and weight files (their bytes, not the
    loaded tensors)."""
    from distill.shards.read import file_sha256

    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    return json_hash({p.name: file_sha256(p) for p in [model_dir / "config.json", *files]})

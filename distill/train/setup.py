"""Trainer setup: the accelerator, CPU threads, LoRA, the optimizer and lr schedule,
compiling."""

from __future__ import annotations

import atexit
import functools
import math
import os
from pathlib import Path

import torch

from distill.recipe.schema import LoraConfig, TrainConfig


def make_accelerator(cfg: TrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    _end_group_at_exit()

    cuda = torch.cuda.is_available()
    mp = "bf16" if cfg.precision == "bf16" or (cfg.precision == "auto" and cuda) else "no"
    _allow_precision(mp)
    acc = Accelerator(
        cpu=not cuda,  # without it, torchrun-launched ranks on a GPU-less host stay unconnected
        mixed_precision=mp,
        log_with=cfg.report_to or None,  # the recipe checked that each is installed
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    return acc


def _allow_precision(mp: str) -> None:
    """Accelerate keeps one ``AcceleratorState`` a process and refuses an Accelerator of
    another mixed precision ("AcceleratorState has already been initialized"). One
    ``distill run`` on a GPU host trains its train and rl stages in this process
    (``launch.cpu_procs`` is 1 there), each at its own precision
    (``train.precision: bf16`` then ``rl.precision: fp32``, say): drop the
    precision part of the state, as Accelerate's own tests do between runs, and keep
    ``PartialState`` (the process group and the device)."""
    from accelerate.state import AcceleratorState

    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and held != mp:
        AcceleratorState._reset_state(reset_partial_state=False)


def end_training(acc) -> None:
    """Finish ``acc``'s trackers and keep the process group. Accelerate's own
    ``end_training`` destroys the group, but every Accelerator of a process shares one
    state: the next training in this process (the DSA phases; the next stage under
    ``accelerate launch``) would find the group gone. The group ends with the process."""
    for tracker in acc.trackers:
        tracker.finish()


@functools.cache
def _end_group_at_exit() -> None:
    from distill.launch import end_process_group

    atexit.register(end_process_group)


def keeps_threads(fn):
    """A training entry point sets this process's intra-op threads for its model
    (:func:`set_cpu_threads`); the caller gets its own setting back however it ends: one
    ``distill run`` runs stage after stage in its process, and a stage after RL (eval,
    say) would otherwise inherit the trainer's one thread."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapped


def set_cpu_threads(acc, n_params: int) -> None:
    """Intra-op threads on CPU unless OMP_NUM_THREADS says otherwise. The local ranks
    share the cores; a model under 20M parameters gets one thread: its matmuls are too
    small to gain from threads, and spinning threads collapse on a busy machine (20x
    slower measured on a loaded 2-core box)."""
    if acc.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
    cores = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(1 if n_params < 20_000_000 else cores)


def apply_lora(model: torch.nn.Module, lc: LoraConfig):
    """``model`` with peft LoRA adapters on ``lc.target_modules`` (its other weights frozen),
    as a ``PeftModel``. peft puts the adapters into ``model``'s own modules, so ``model``
    itself now computes with them; the wrapper switches them off and merges them."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(
        model,
        PeftLoraConfig(
            r=lc.r,
            lora_alpha=lc.lora_alpha,
            lora_dropout=lc.lora_dropout,
            target_modules=lc.target_modules,
            task_type="CAUSAL_LM",
        ),
    )


def make_optimizer(module: torch.nn.Module, cfg: TrainConfig, max_steps: int, fused: bool = False):
    """AdamW (no decay on vectors) with linear warmup then cosine/linear/constant decay.
    ``fused`` (on GPU): one kernel per step and no full-size temporaries, where the
    default foreach AdamW holds one more fp32 copy of the weights at its peak."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        **({"fused": True} if fused else {}),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRFactor(cfg, max_steps))
    return opt, sched


def compile_model(objective: torch.nn.Module) -> torch.nn.Module:
    """``train.torch_compile``: torch.compile each decoder layer (they share one compiled graph)
    and the fused head's softmax pass (its pointwise form: one kernel, measured 18 against
    30 ms a step on the H200 benchmark); the loop around them stays eager, so the loss's
    chunk loop and the varlen attention (which changes shape every batch) cause no
    recompiles. A model without transformers' decoder layers is compiled whole."""
    if not compile_decoder_layers(objective):
        return torch.compile(objective)
    from distill.train.loss import ce_and_grad_pointwise

    # dynamic: a batch's last chunk is shorter (automatic dynamic shapes measured the same)
    objective.ce_fn = torch.compile(ce_and_grad_pointwise, dynamic=True)
    return objective


def compile_decoder_layers(module: torch.nn.Module) -> bool:
    """torch.compile every transformers decoder layer in ``module`` (regional compilation:
    the layers share one graph, compiled once). False when it has none (not a
    transformers model).

    A layer with transformers' gradient checkpointing on gets it replaced: theirs
    checkpoints inside the layer's forward, where dynamo meets the checkpoint and breaks
    the graph (an "unsafe side effect"), so the layer ran uncompiled. Instead its compiled
    forward is checkpointed from outside whenever gradients are on (train.torch_compile
    with train.gradient_checkpointing, rl.torch_compile with rl.gradient_checkpointing)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        return False
    limit = max(8, 2 * len(layers))  # room for one graph per layer if guards tell them apart
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))
    for layer in layers:
        if layer.gradient_checkpointing:
            layer.gradient_checkpointing = False  # ours, outside the compiled region
            layer.forward = _CheckpointedForward(layer)  # an instance attribute: the call uses it
        else:
            layer.compile()
    return True


class _CheckpointedForward:
    """A layer's own forward (not transformers' checkpointing wrapper), compiled, and
    checkpointed outside the compiled region while gradients are on."""

    def __init__(self, layer: torch.nn.Module):
        fn = type(layer).forward
        fn = getattr(fn, "__wrapped__", fn)  # transformers wraps forward for its checkpointing
        self.compiled = torch.compile(fn.__get__(layer))

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.compiled(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.compiled, *args, use_reentrant=False, **kwargs)


class LRFactor:
    """Linear warmup, then cosine/linear decay to ``min_lr_ratio`` (or constant).

    Under ``max_time_s`` the decay runs on whichever ends first, steps or time:
    ``time_frac`` (elapsed / max_time_s, set by the loop from a value all ranks agree on)
    moves the schedule ahead, so a run stopped by its time limit has decayed its learning
    rate instead of stopping at the peak. Plain attributes only: LambdaLR checkpoints a
    callable object's ``__dict__``."""

    def __init__(self, cfg: TrainConfig, max_steps: int):
        self.warm, self.floor = cfg.warmup_steps, cfg.min_lr_ratio
        self.schedule = cfg.lr_scheduler_type
        self.max_steps, self.time_frac = max_steps, 0.0

    def __call__(self, step: int) -> float:
        warm = self.warm
        if step < warm:
            return (step + 1) / (warm + 1)
        if self.schedule == "constant":
            return 1.0
        at = max(step, min(1.0, self.time_frac) * self.max_steps)
        t = min(1.0, (at - warm) / max(1, self.max_steps - warm))
        decay = 0.5 * (1 + math.cos(math.pi * t)) if self.schedule == "cosine" else 1 - t
        return self.floor + (1 - self.floor) * decay

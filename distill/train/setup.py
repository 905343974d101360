"""Pieces of the trainer that are not the loop: accelerator and optimizer setup, step
statistics and FLOP counts, the progress bar, saving the final HF model directory."""

from __future__ import annotations

import contextlib
import math
import os
import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from distill.models import set_generation_config
from distill.recipe.schema import TrainConfig


def make_accelerator(cfg: TrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cuda = torch.cuda.is_available()
    mp = "bf16" if cfg.precision == "bf16" or (cfg.precision == "auto" and cuda) else "no"
    trackers = [t for t in cfg.trackers if t != "wandb" or _installed("wandb")]
    acc = Accelerator(
        cpu=not cuda,  # without it, torchrun-launched ranks on a GPU-less host stay unconnected
        mixed_precision=mp,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    return acc


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


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


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
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        **({"fused": True} if fused else {}),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRFactor(cfg, max_steps))
    return opt, sched


def compile_model(objective: torch.nn.Module) -> torch.nn.Module:
    """``train.compile``: torch.compile each decoder layer (they share one compiled graph)
    and the fused head's softmax pass (its pointwise form: one kernel, measured 18 against
    30 ms a step on the H200 benchmark); the loop around them stays eager, so the loss's
    chunk loop and the varlen attention (which changes shape every batch) cause no
    recompiles. A model without transformers' decoder layers is compiled whole."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in objective.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        return torch.compile(objective)
    limit = max(8, 2 * len(layers))  # room for one graph per layer if guards tell them apart
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))
    for layer in layers:
        layer.compile()
    from distill.train.loss import ce_and_grad_pointwise

    # dynamic: a batch's last chunk is shorter (automatic dynamic shapes measured the same)
    objective.ce_fn = torch.compile(ce_and_grad_pointwise, dynamic=True)
    return objective


class LRFactor:
    """Linear warmup, then cosine/linear decay to ``min_lr_ratio`` (or constant).

    Under ``max_time_s`` the decay runs on whichever ends first, steps or time:
    ``time_frac`` (elapsed / max_time_s, set by the loop from a value all ranks agree on)
    moves the schedule ahead, so a run stopped by its time limit has decayed its learning
    rate instead of stopping at the peak. Plain attributes only: LambdaLR checkpoints a
    callable object's ``__dict__``."""

    def __init__(self, cfg: TrainConfig, max_steps: int):
        self.warm, self.floor, self.schedule = cfg.warmup_steps, cfg.min_lr_ratio, cfg.schedule
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


class StepStats:
    """Losses and counts of the steps run so far, summed over ranks."""

    def __init__(self, names: list[str], start: int):
        self.names, self.last_step, self.finished = names, start, False
        self.stopped_by: str | None = None  # "max_time_s" or "stop_after_steps" when early
        self.losses: list[float] = []
        self.elapsed: list[float] = []  # seconds since the loop started, per step
        n = len(names)
        self.dom_loss, self.dom_tok = (
            torch.zeros(n, dtype=torch.float64),
            torch.zeros(n, dtype=torch.float64),
        )
        self.win_loss, self.win_tok = (
            torch.zeros(n, dtype=torch.float64),
            torch.zeros(n, dtype=torch.float64),
        )
        self.tokens = self.loss_tokens = 0
        self.sq_sum, self.seconds = 0.0, 0.0

    def add(self, step: int, row: torch.Tensor, elapsed: float) -> None:
        n = len(self.names)
        row = row.double()
        self.losses.append(float(row[0]))
        self.elapsed.append(elapsed)
        self.tokens += int(row[1])
        self.loss_tokens += int(row[2])
        self.sq_sum += float(row[3])
        dl, dt = row[4 : 4 + n], row[4 + n : 4 + 2 * n]
        self.dom_loss += dl
        self.dom_tok += dt
        self.win_loss, self.win_tok = dl, dt
        self.last_step, self.seconds = step, elapsed

    def log_row(self) -> dict[str, float]:
        row = {"loss": self.losses[-1], "tokens_per_s": self.tokens / max(self.seconds, 1e-9)}
        for i, d in enumerate(self.names):
            if self.win_tok[i] > 0:
                row[f"loss/{d}"] = float(self.win_loss[i] / self.win_tok[i])
            row[f"tokens/{d}"] = float(self.dom_tok[i])
        return row

    def domain_report(self) -> dict[str, dict[str, float | None]]:
        return {
            d: {
                "mean_loss": float(self.dom_loss[i] / self.dom_tok[i]) if self.dom_tok[i] else None,
                "last_step_loss": float(self.win_loss[i] / self.win_tok[i])
                if self.win_tok[i]
                else None,
                "loss_tokens": int(self.dom_tok[i]),
            }
            for i, d in enumerate(self.names)
        }

    def head_flops(self, model) -> float:
        """LM-head FLOPs: the logits are computed at loss tokens only."""
        head = model.get_output_embeddings()
        return 6.0 * head.weight.numel() * self.loss_tokens


def flops_per_token(model) -> tuple[float, float]:
    """Training FLOPs (forward + backward) per token of the transformer body, and per
    unit of Σ len² for causal attention (QK^T and AV, half the square)."""
    cfg = model.config
    emb = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    body = sum(p.numel() for p in model.parameters() if id(p) not in emb)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 6.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim
    return 6.0 * body, attn


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def build_report(acc, model, domains: dict, stats: StepStats, plan: dict, out: Path) -> dict:
    """The content of train_report.json."""
    n_params = sum(p.numel() for p in model.parameters())
    f_tok, f_attn = flops_per_token(model)
    flops = f_tok * stats.tokens + f_attn * stats.sq_sum + stats.head_flops(model)
    peak = (peak_flops(acc.device) or 0.0) * acc.num_processes
    return {
        "steps": stats.last_step,
        "finished": stats.finished,
        "stopped_by": stats.stopped_by,
        "losses": stats.losses,
        "final_loss": stats.losses[-1] if stats.losses else None,
        "domains": stats.domain_report(),
        "examples": {d: len(dd) for d, dd in domains.items()},
        "dropped_too_long": {d: dd.dropped for d, dd in domains.items()},
        "tokens": stats.tokens,
        "loss_tokens": stats.loss_tokens,
        "attention_sq_sum": stats.sq_sum,
        "seconds": stats.seconds,
        "step_elapsed_s": stats.elapsed,
        "tokens_per_s": stats.tokens / stats.seconds if stats.seconds else None,
        "mfu": flops / stats.seconds / peak if stats.seconds and peak else None,
        "peak_memory_bytes": peak_memory_bytes(acc.device),
        "params": n_params,
        "world_size": acc.num_processes,
        "plan": plan,
        "out_dir": str(out),
    }


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known accelerators (MFU denominator); None on CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in (
        ("H200", 989e12),
        ("H100", 989e12),
        ("A100", 312e12),
        ("L40S", 362e12),
        ("4090", 165e12),
    ):
        if key in name:
            return peak
    return None


@contextlib.contextmanager
def progress(acc, desc: str, total: int, start: int) -> Iterator[Callable]:
    """A rich bar on the main process (steps, loss, tokens/s); a no-op elsewhere."""
    from distill.progress import progress as bar_of

    if not acc.is_main_process:
        yield lambda step, stats: None
        return
    with bar_of() as bar:
        task = bar.add_task(desc, total=total, completed=start, info="", unit="steps")

        def update(step: int, stats: StepStats) -> None:
            info = (
                f"loss {stats.losses[-1]:.4f}  {stats.tokens / max(stats.seconds, 1e-9):,.0f} tok/s"
            )
            bar.update(task, completed=step, info=info)

        yield update


def save_model(acc, objective, tokenizer, cfg: TrainConfig, out: Path) -> None:
    """The final HF model directory: config, safetensors, tokenizer + chat template,
    generation config (eos = end of turn). LoRA adapters are merged when asked, and kept
    in ``out/adapter`` when not."""
    acc.wait_for_everyone()
    model = acc.unwrap_model(objective).model
    if cfg.lora.enabled:
        if acc.is_main_process and not cfg.lora.merge:
            model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
        state = model.state_dict()
    else:
        full = acc.get_state_dict(objective)  # gathers FSDP shards; keys start with "model."
        state = {k.removeprefix("model."): v for k, v in full.items()}
    if acc.is_main_process:
        set_generation_config(model, tokenizer)
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    acc.wait_for_everyone()

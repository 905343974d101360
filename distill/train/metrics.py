"""What a training run measures: step statistics, FLOPs per token and MFU, peak memory,
the progress bar with loss and tokens/s, and the final train report."""

import contextlib
import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


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
        self.offset = 0.0  # seconds of the steps before a resume

    def state_dict(self) -> dict:
        """The statistics of the steps so far, kept in checkpoints: a resumed run reports
        every step of the run, not only its own."""
        return {
            "losses": self.losses,
            "elapsed": self.elapsed,
            "dom_loss": self.dom_loss.tolist(),
            "dom_tok": self.dom_tok.tolist(),
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "sq_sum": self.sq_sum,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.elapsed = list(state["losses"]), list(state["elapsed"])
        self.dom_loss = torch.tensor(state["dom_loss"], dtype=torch.float64)
        self.dom_tok = torch.tensor(state["dom_tok"], dtype=torch.float64)
        self.tokens, self.loss_tokens = int(state["tokens"]), int(state["loss_tokens"])
        self.sq_sum = float(state["sq_sum"])
        self.seconds = self.offset = float(state["seconds"])

    def add(self, step: int, row: torch.Tensor, elapsed: float) -> None:
        n = len(self.names)
        elapsed += self.offset
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
        # KD traces whose teacher tokens were aligned to the render, or trained without KD
        "kd_realigned": {d: dd.kd_realigned for d, dd in domains.items()},
        "kd_unaligned": {d: dd.kd_unaligned for d, dd in domains.items()},
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

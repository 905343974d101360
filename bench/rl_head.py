"""The RL policy's LM-head log-probabilities, forward + backward of one chunk: the
hand-written backward (distill.rl.head) against autograd through token_logprobs under
activation checkpointing (what distill.rl.policy ran before, and what a user would write),
same inputs, one process, side by side.

    python bench/rl_head.py                       # 2,048 tokens x 151,936 words x 896 (Qwen2-0.5B)
    python bench/rl_head.py --vocab 32000 --repeats 3   # a CPU-sized run

Prints one JSON line: median seconds per chunk and, on CUDA, the peak memory above the
inputs for each side, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.rl.head import head_logprobs  # noqa: E402
from distill.rl.loss import token_logprobs  # noqa: E402


def autograd_side(h, w, targets, temperature):
    def fn(h, w):
        return token_logprobs(F.linear(h, w), targets, temperature)

    return checkpoint(fn, h, w, use_reentrant=False)


def fused_side(h, w, targets, temperature):
    return head_logprobs(h, w, None, targets, None, temperature)


def measure(fn, h, w, targets, a) -> dict:
    cuda = h.device.type == "cuda"
    times, peak = [], None
    for i in range(a.repeats + 1):  # the first is warm-up (compile, allocator)
        h.grad = w.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        lp, _ = fn(h, w, targets, a.temperature)
        lp.sum().backward()
        if cuda:
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        if i:
            times.append(time.perf_counter() - t0)
    return {"s_median": round(sorted(times)[len(times) // 2], 5),
            "peak_gb_above_inputs": None if peak is None else round(peak, 3)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    h = torch.randn(a.tokens, a.hidden, generator=g).to(dev, dt).requires_grad_()
    w = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).to(dev, dt).requires_grad_()
    targets = torch.randint(0, a.vocab, (a.tokens,), generator=g).to(dev)
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "dtype": str(dt), "args": vars(a),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    for name, fn in (("autograd_checkpointed", autograd_side), ("hand_written", fused_side)):
        out[name] = measure(fn, h, w, targets, a)
    out["speedup"] = round(
        out["autograd_checkpointed"]["s_median"] / out["hand_written"]["s_median"], 2
    )
    if dev == "cuda":
        out["memory_ratio"] = round(
            out["hand_written"]["peak_gb_above_inputs"]
            / out["autograd_checkpointed"]["peak_gb_above_inputs"],
            2,
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Training throughput: distill's trainer vs TRL's SFTTrainer, side by side.

Both train the same randomly initialised model on the same variable-length traces (the
same token ids: TRL gets our rendered examples pre-tokenized) with the same tokens per
optimizer step, for a fixed number of steps. Each trainer runs in its own subprocess so
peak memory is its own. Reported: tokens/s over the steps after warm-up, MFU (LM head and
causal attention counted), peak memory.

    python bench/train_throughput.py --preset cpu     # tiny Llama, fp32, 2-core CPU
    python bench/train_throughput.py --preset h200    # Qwen2-0.5B shape, bf16, one H200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    "cpu": dict(
        arch="llama",
        vocab=None,
        hidden=128,
        layers=4,
        heads=4,
        kv=4,
        inter=320,
        min_len=16,
        max_len=512,
        seq=512,
        step_tokens=8192,
        micro_tokens=4096,
        steps=12,
        warmup=2,
        traces=400,
        dtype="fp32",
        peak=None,
    ),
    "h200": dict(
        arch="qwen2",
        vocab=151936,
        hidden=896,
        layers=24,
        heads=14,
        kv=2,
        inter=4864,
        min_len=64,
        max_len=4096,
        seq=4096,
        step_tokens=32768,
        micro_tokens=32768,
        steps=20,
        warmup=5,
        traces=1500,
        dtype="bf16",
        peak=989e12,
    ),
}


def lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Long-tailed lengths (log-normal, clipped): most traces short, a few near the cap."""
    rng = np.random.default_rng(seed)
    x = rng.lognormal(mean=np.log(lo * 4), sigma=1.0, size=n)
    return [int(v) for v in np.clip(x, lo, hi)]


def prepare(p: dict, root: Path) -> None:
    """Tokenizer, shards of synthetic traces and a random-init model directory."""
    import torch

    from distill.chat import train_tokenizer
    from distill.messages import Trace
    from distill.shards import ShardWriter

    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(300)]
    tok = train_tokenizer([" ".join(rng.choice(words, 50)) for _ in range(200)], 1024, root / "tok")
    with ShardWriter(root / "clean", max_rows=500) as w:
        for i, n in enumerate(lengths(p["traces"], p["min_len"], p["max_len"] - 16)):
            body = " ".join(rng.choice(words, max(1, n // 2 - 8)))  # ~2 tokens per word
            msgs = [
                {"role": "user", "content": f"task {i}"},
                {"role": "assistant", "content": body},
            ]
            w.write([Trace(id=str(i), task_id=str(i), domain="bench", messages=msgs)])
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = (
        (Qwen2ForCausalLM, Qwen2Config) if p["arch"] == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    )
    cfg = cfg_cls(
        vocab_size=p["vocab"] or len(tok),
        hidden_size=p["hidden"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv"],
        intermediate_size=p["inter"],
        max_position_embeddings=p["seq"],
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    cls(cfg).save_pretrained(root / "model")


def flops(model_dir: Path, tokens: int, head_tokens: int, sq: float) -> float:
    cfg = json.loads((model_dir / "config.json").read_text())
    h, L, inter, v = (
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["intermediate_size"],
        cfg["vocab_size"],
    )
    kv_dim = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    body = L * (2 * h * h + 2 * h * kv_dim + 3 * h * inter)
    return 6.0 * body * tokens + 6.0 * h * v * head_tokens + 6.0 * L * h * sq


def run_ours(p: dict, root: Path) -> dict:
    import torch

    from distill.recipe import TrainConfig
    from distill.train import train

    cfg = TrainConfig(
        lr=1e-4,
        warmup_steps=2,
        max_steps=p["steps"],
        batch_tokens=p["step_tokens"],
        micro_batch_tokens=p["micro_tokens"],
        max_seq_len=p["seq"],
        precision=p["dtype"],
        log_every=5,
        gradient_checkpointing=p["dtype"] == "bf16",
    )
    rep = train(
        init=root / "model",
        tokenizer_dir=root / "tok",
        shards={"bench": root / "clean"},
        out_dir=root / "ours",
        cfg=cfg,
        desc="distill",
    )
    t = rep["step_elapsed_s"]
    w = p["warmup"]
    secs = t[-1] - t[w - 1]
    frac = (p["steps"] - w) / p["steps"]  # steady-state share (steps hold the same tokens)
    tokens = rep["tokens"] * frac
    fl = flops(root / "model", rep["tokens"], rep["loss_tokens"], rep["attention_sq_sum"]) * frac
    mem = (
        torch.cuda.max_memory_allocated() if torch.cuda.is_available() else rep["peak_memory_bytes"]
    )
    return {
        "tokens_per_s": tokens / secs,
        "flops_per_s": fl / secs,
        "peak_memory_gb": mem / 2**30,
        "final_loss": rep["final_loss"],
    }


def run_trl(p: dict, root: Path) -> dict:
    """TRL SFTTrainer on the same examples with packing (BFD, padding-free position_ids)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from distill.data import tokenize_domain

    tok = AutoTokenizer.from_pretrained(root / "tok")
    dd = tokenize_domain("bench", root / "clean", tok, p["seq"], root / "trl-cache")
    rows = [
        {"input_ids": dd.ids[dd.offsets[i] : dd.offsets[i + 1]].tolist()} for i in range(len(dd))
    ]
    ds = datasets.Dataset.from_list(rows * 4)
    gpu = torch.cuda.is_available()
    if not gpu:
        torch.set_num_threads(1)  # as distill does for small models (fair on a busy CPU)
    attn = os.environ.get("TRL_ATTN", "flex_attention" if gpu else "sdpa")
    model = AutoModelForCausalLM.from_pretrained(
        root / "model", attn_implementation=attn, dtype=torch.float32
    )
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    rows_per_micro = max(1, p["micro_tokens"] // p["seq"])
    cfg = SFTConfig(
        output_dir=str(root / "trl"),
        max_steps=p["steps"],
        learning_rate=1e-4,
        warmup_steps=2,
        per_device_train_batch_size=rows_per_micro,
        gradient_accumulation_steps=max(1, p["step_tokens"] // p["micro_tokens"]),
        max_length=p["seq"],
        packing=True,
        bf16=p["dtype"] == "bf16",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        dataset_num_proc=None,
        use_cpu=not gpu,
        gradient_checkpointing=p["dtype"] == "bf16",
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()]
    )
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    w = p["warmup"]
    secs = times[-1] - times[w - 1]
    # TRL logs the cumulative tokens it trained on (num_tokens); without it, assume full rows
    seen = {h["step"]: h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h}
    if w in seen and p["steps"] in seen:
        steady, assumed = seen[p["steps"]] - seen[w], False
    else:
        steady, assumed = (p["steps"] - w) * p["step_tokens"], True
    mean_len = float(np.mean(dd.lengths))
    sq = steady / mean_len * float(np.mean(np.asarray(dd.lengths, float) ** 2))
    import resource

    mem = (
        torch.cuda.max_memory_allocated()
        if gpu
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "tokens_per_s": steady / secs,
        "flops_per_s": flops(root / "model", steady, steady, sq) / secs,
        "peak_memory_gb": mem / 2**30,
        "tokens_assumed": assumed,
        "final_loss": trainer.state.log_history[-2].get("loss")
        if len(trainer.state.log_history) > 1
        else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--root", default="/tmp/distill-bench")
    ap.add_argument("--only", choices=["ours", "trl"])
    ap.add_argument("--steps", type=int)
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    if args.steps:
        p["steps"] = args.steps
    root = Path(args.root) / args.preset
    if args.only:
        res = (run_ours if args.only == "ours" else run_trl)(p, root)
        (root / f"{args.only}.json").write_text(json.dumps(res))
        return
    root.mkdir(parents=True, exist_ok=True)
    prepare(p, root)
    results = {}
    gpu_attn = ["flex_attention", "sdpa"] if p["dtype"] == "bf16" else ["sdpa"]
    for who in ("ours", "trl"):
        cmd = [
            sys.executable,
            __file__,
            "--preset",
            args.preset,
            "--root",
            args.root,
            "--only",
            who,
        ]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        for attn in gpu_attn:  # the best attention first; the next one if it fails there
            env = dict(os.environ, DISTILL_ATTN=attn, TRL_ATTN=attn)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, text=True, capture_output=True, env=env)
            took = time.perf_counter() - t0
            print(f"{who} with {attn}: exit {proc.returncode} in {took:.0f}s", flush=True)
            if proc.returncode == 0:
                results[who] = dict(json.loads((root / f"{who}.json").read_text()), attn=attn)
                break
            print(proc.stderr[-3000:], flush=True)
    for who, r in results.items():
        mfu = f"{r['flops_per_s'] / p['peak']:.1%}" if p["peak"] else "n/a"
        print(
            f"{who:5s} {r['tokens_per_s']:>10,.0f} tok/s  MFU {mfu:>6s}  peak {r['peak_memory_gb']:.2f} GB"
        )
    if len(results) == 2:
        print(
            f"ratio ours/trl: {results['ours']['tokens_per_s'] / results['trl']['tokens_per_s']:.2f}x"
        )
    print(json.dumps({"preset": args.preset, "params": p, "results": results}))


if __name__ == "__main__":
    main()

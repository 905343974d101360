"""Training throughput: distill's trainer vs TRL's SFTTrainer, side by side.

Both train the same randomly initialised model on the same variable-length traces (the
same token ids: TRL gets our rendered examples pre-tokenized) with the same tokens per
optimizer step, for a fixed number of steps. Each variant (a trainer and its settings,
see VARIANTS) runs in its own subprocess so peak memory is its own. Reported: tokens/s
over the steps after warm-up, MFU (LM head and causal attention counted), peak memory,
the last step's loss, and each variant's ratio to the fastest TRL variant.

    python bench/train_throughput.py --preset cpu     # tiny Llama, fp32, 2-core CPU
    python bench/train_throughput.py --preset h200    # Qwen2-0.5B shape, bf16, one H200
    python bench/train_throughput.py --preset h200 --variants ours,trl --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

# attn None: the trainer's default (ours: varlen on GPU, SDPA on CPU; TRL: flex on GPU,
# SDPA on CPU). fused_ce: distill's fused LM head (distill.train.loss.FUSED_CE).
VARIANTS = {
    "ours": dict(who="ours", attn=None, fused_ce=True, gc=False, compile=True),
    # the loop booking every step at once (a device sync per step), as before 2026-12-02
    "ours-sync": dict(who="ours", attn=None, fused_ce=True, gc=False, compile=True, defer=False),
    "ours-eager": dict(who="ours", attn=None, fused_ce=True, gc=False, compile=False),
    "ours-gc": dict(who="ours", attn=None, fused_ce=True, gc=True, compile=False),
    "ours-flat-gc": dict(who="ours", attn=None, fused_ce=False, gc=True, compile=False),
    # the trainer as measured on 2026-11-29: rows padded to 4,096, flex attention, the
    # fp32 8,192-token logits chunks, gradient checkpointing
    "ours-rows-gc": dict(who="ours", attn="flex_attention", fused_ce=False, gc=True, compile=False),
    "trl": dict(who="trl", attn=None, gc=False, liger=False),
    "trl-gc": dict(who="trl", attn=None, gc=True, liger=False),
    "trl-liger": dict(who="trl", attn=None, gc=False, liger=True),
    # TrainingArguments.torch_compile on top of Liger: on 2026-12-02 it did not finish
    # (Liger's Triton kernels under dynamo, "'float' object has no attribute 'to'")
    "trl-liger-compile": dict(who="trl", attn=None, gc=False, liger=True, compile=True),
}
# most important first: a run that hits --deadline leaves out the last ones
DEFAULT_VARIANTS = {
    "cpu": ["ours-eager", "trl"],
    "h200": [
        "ours",
        "ours-sync",
        "trl",
        "trl-gc",
        "trl-liger",
        "ours-eager",
        "ours-gc",
        "ours-rows-gc",
        "ours-flat-gc",
    ],
}


def lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Long-tailed lengths (log-normal, clipped): most traces short, a few near the cap."""
    rng = np.random.default_rng(seed)
    x = rng.lognormal(mean=np.log(lo * 4), sigma=1.0, size=n)
    return [int(v) for v in np.clip(x, lo, hi)]


def prepare(p: dict, root: Path) -> None:
    """Tokenizer, shards of synthetic traces, their tokenize cache (shared by every
    variant) and a random-init model directory."""
    import torch

    from distill.chat.template import train_tokenizer
    from distill.messages import Trace
    from distill.shards import ShardWriter
    from distill.train.data import tokenize_domain

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
    tokenize_domain("bench", root / "clean", tok, p["seq"], root / "cache")
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
    # fp32 weights either way; initialised on the GPU when there is one (seconds, not minutes)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = cls(cfg)
    model.save_pretrained(root / "model")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def run_ours(p: dict, root: Path, name: str, v: dict) -> dict:
    import torch

    import distill.train.loop
    import distill.train.loss
    from distill.recipe.schema import TrainConfig
    from distill.train.loop import train

    if v["attn"]:
        os.environ["DISTILL_ATTN"] = v["attn"]
    distill.train.loss.FUSED_CE = v["fused_ce"]
    if v.get("defer") is not None:
        distill.train.loop.DEFER = v["defer"]
    # the profiled last steps are left out of the timing, and so is the step before them:
    # the loop books a step after queueing the next, so its time would include the
    # profiler's start-up (a profiled run on 2026-12-02 read 115k tokens/s where unprofiled
    # runs read 133k; those ran on other machines, and this window was not re-run on a GPU)
    profiled = PROFILE_STEPS if PROFILE_DIR else 0
    if profiled:
        _profile_steps(
            p["steps"] - profiled + 1, profiled, Path(PROFILE_DIR) / f"profile-{name}.txt"
        )
    cfg = TrainConfig(
        learning_rate=1e-4,
        warmup_steps=2,
        max_steps=p["steps"],
        batch_tokens=p["step_tokens"],
        micro_batch_tokens=p["micro_tokens"],
        max_length=p["seq"],
        precision=p["dtype"],
        logging_steps=5,
        gradient_checkpointing=v["gc"],
        torch_compile=v["compile"],
    )
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "cache").symlink_to(root / "cache")  # tokenized once by prepare()
    rep = train(
        init=root / "model",
        tokenizer_dir=root / "tok",
        shards={"bench": root / "clean"},
        out_dir=out,
        cfg=cfg,
        desc=name,
    )
    t = rep["step_elapsed_s"]
    w = p["warmup"]
    timed = p["steps"] - w - (profiled + 1 if profiled else 0)
    secs = t[w - 1 + timed] - t[w - 1]
    frac = timed / p["steps"]  # steady-state share (steps hold the same tokens)
    tokens = rep["tokens"] * frac
    fl = flops(root / "model", rep["tokens"], rep["loss_tokens"], rep["attention_sq_sum"]) * frac
    mem = (
        torch.cuda.max_memory_allocated() if torch.cuda.is_available() else rep["peak_memory_bytes"]
    )
    from distill.train.loop import _attn_implementation

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "tokens_per_s": tokens / secs,
        "flops_per_s": fl / secs,
        "peak_memory_gb": mem / 2**30,
        "first_loss": rep["losses"][0],
        "final_loss": rep["final_loss"],
        "step_s": secs / timed,
        "attn": _attn_implementation(dev, p["dtype"]),
        "plan": rep["plan"],
    }


PROFILE_DIR: str | None = None  # --profile: where run_ours writes its kernel table
PROFILE_STEPS = 3


def _profile_steps(first: int, n: int, path: Path) -> None:
    """Profile ``n`` optimizer steps from step ``first`` (torch.profiler, CPU and CUDA) and
    write their wall time and the kernel table by self device time (its percentages are
    shares of all device time; summing the column counts ops and their kernels twice)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import distill.train.loop as T

    orig, state = T._Loop.step, {"i": 0, "prof": None, "t0": 0.0}

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def step(self):
        state["i"] += 1
        i = state["i"]
        if i == first:
            sync()
            acts = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            )
            state["prof"] = profile(activities=acts)
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        out = orig(self)
        if i == first + n - 1 and state["prof"] is not None:
            sync()
            wall = time.perf_counter() - state["t0"]
            prof = state["prof"]
            prof.__exit__(None, None, None)
            ka = prof.key_averages()
            key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = ka.table(sort_by=key, row_limit=60, max_name_column_width=70)
            path.write_text(f"{n} steps: wall {wall:.3f} s\n{table}")
        return out

    T._Loop.step = step


def run_trl(p: dict, root: Path, name: str, v: dict) -> dict:
    """TRL SFTTrainer on the same examples with packing (BFD, padding-free position_ids)
    and TRL's own chunked LM head; ``liger``: Liger's RMSNorm, RoPE and SwiGLU kernels
    too (TRL keeps its own LM head in place of Liger's fused linear cross-entropy)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from distill.train.data import tokenize_domain

    tok = AutoTokenizer.from_pretrained(root / "tok")
    dd = tokenize_domain("bench", root / "clean", tok, p["seq"], root / "cache")
    rows = [
        {"input_ids": dd.ids[dd.offsets[i] : dd.offsets[i + 1]].tolist()} for i in range(len(dd))
    ]
    ds = datasets.Dataset.from_list(rows * 4)
    gpu = torch.cuda.is_available()
    if not gpu:
        torch.set_num_threads(1)  # as distill does for small models (fair on a busy CPU)
    attn = v["attn"] or ("flex_attention" if gpu else "sdpa")
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
        output_dir=str(root / name),
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
        gradient_checkpointing=v["gc"],
        use_liger_kernel=v["liger"],
        torch_compile=v.get("compile", False),
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
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "tokens_per_s": steady / secs,
        "flops_per_s": flops(root / "model", steady, steady, sq) / secs,
        "peak_memory_gb": mem / 2**30,
        "tokens_assumed": assumed,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "step_s": secs / (p["steps"] - w),
        "attn": attn,
    }


def run_variant(p: dict, root: Path, name: str) -> dict:
    v = VARIANTS[name]
    res = (run_ours if v["who"] == "ours" else run_trl)(p, root, name, v)
    return dict(res, settings=v)


def table(p: dict, results: dict[str, dict]) -> str:
    """One line per variant, and its tokens/s over the fastest TRL variant's."""
    trl = [
        r["tokens_per_s"] for n, r in results.items() if "error" not in r and n.startswith("trl")
    ]
    best = max(trl) if trl else None
    lines = [
        f"{'variant':14s} {'tok/s':>9s} {'MFU':>6s} {'peak GB':>8s} {'s/step':>7s} "
        f"{'loss 1st':>8s} {'loss last':>9s} {'vs best TRL':>11s}"
    ]
    for n, r in results.items():
        if "error" in r:
            lines.append(f"{n:14s} failed: {r['error']}")
            continue
        mfu = f"{r['flops_per_s'] / p['peak']:.1%}" if p["peak"] else "n/a"
        ratio = f"{r['tokens_per_s'] / best:.2f}x" if best else "n/a"
        first = f"{r['first_loss']:.4f}" if r.get("first_loss") is not None else "n/a"
        last = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "n/a"
        lines.append(
            f"{n:14s} {r['tokens_per_s']:>9,.0f} {mfu:>6s} {r['peak_memory_gb']:>8.2f} "
            f"{r['step_s']:>7.3f} {first:>8s} {last:>9s} {ratio:>11s}"
        )
    return "\n".join(lines)


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--root", default="/tmp/distill-bench")
    ap.add_argument("--variants", help="comma-separated names of VARIANTS (default: the preset's)")
    ap.add_argument("--only", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one subprocess
    ap.add_argument("--steps", type=int)
    ap.add_argument(
        "--profile", help="write a kernel table of 3 steps of each of our variants here"
    )
    ap.add_argument("--out", help="also write results.json and bench.log (all logs) here")
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds for the whole run; later variants are skipped",
    )
    args = ap.parse_args()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    p = dict(PRESETS[args.preset])
    if args.steps:
        p["steps"] = args.steps
    root = Path(args.root) / args.preset
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    if args.only:
        (root / f"{args.only}.json").write_text(json.dumps(run_variant(p, root, args.only)))
        return
    t_start = time.perf_counter()
    names = args.variants.split(",") if args.variants else DEFAULT_VARIANTS[args.preset]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    prepare(p, root)
    print(f"prepared in {time.perf_counter() - t_start:.0f}s", flush=True)
    results: dict[str, dict] = {}
    log = []
    for name in names:
        left = None if args.deadline is None else args.deadline - (time.perf_counter() - t_start)
        if left is not None and left < 45:
            results[name] = {"error": f"skipped: {left:.0f}s left of --deadline"}
            continue
        if left is not None:  # one slow variant (a long compile) must not take all the rest
            left = min(left, 300 if VARIANTS[name].get("compile") else 180)
        cmd = [sys.executable, __file__, "--preset", args.preset, "--root", args.root]
        cmd += ["--only", name] + (["--steps", str(args.steps)] if args.steps else [])
        cmd += ["--profile", args.profile] if args.profile else []
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, text=True, capture_output=True, timeout=left)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = "timeout", _text(e.stdout), _text(e.stderr)
        took = time.perf_counter() - t0
        print(f"{name}: exit {rc} in {took:.0f}s", flush=True)
        log.append(f"===== {name}: exit {rc} in {took:.0f}s\n{stdout[-20000:]}\n{stderr[-60000:]}")
        shutil.rmtree(root / name, ignore_errors=True)  # its 2 GB model directory
        if rc == 0:
            results[name] = dict(json.loads((root / f"{name}.json").read_text()), wall_s=took)
        else:
            results[name] = {
                "error": f"exit {rc}: " + (stderr.strip().splitlines() or ["?"])[-1][:300]
            }
            print(stderr[-3000:], flush=True)
        if out:  # after every variant: a run cut short keeps what it measured
            (out / "results.json").write_text(
                json.dumps({"preset": args.preset, "params": p, "results": results}, indent=1)
            )
            (out / "bench.log").write_text("\n".join(log))
    print(json.dumps({"preset": args.preset, "params": p, "results": results}))
    print(table(p, results))


if __name__ == "__main__":
    main()

"""Full GRPO steps: our RL trainer against TRL's GRPOTrainer (transformers generation),
same random-init model, same prompts, same GPU, one after the other in fresh processes.

    python bench/rl.py                       # Qwen2-0.5B shape, 64 prompts x G=8, 512 tokens
    python bench/rl.py --preset tiny --prompts 8 --group 4 --completion 32   # CPU smoke run

Both sides: bf16 weights, β = 0 (no reference model), token-mean loss, micro-batches of
``--micro`` completions, one optimizer update per rollout batch, rewards random (speed
only). TRL's completions are forced to the full length (min_new_tokens); ours run to the
length limit unless a row samples eos (≈1/vocab per token with random weights: the mean
length is reported). Each side prints one JSON line; the parent prints the comparison and
writes bench/results/rl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from presets import PRESETS  # noqa: E402  (bench/ is on sys.path when run as a script)

WORDS = ["alpha", "beta", "gamma", "delta", "sum", "of", "the", "tool", "call", "answer"]


def build(preset: str, workdir: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distill.chat.template import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer([" ".join(random.choices(WORDS, k=50)) for _ in range(200)], 300, workdir)
    cfg = Qwen2Config(**PRESETS[preset], tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)  # fmt: skip
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(workdir)
    return workdir


def conversations(n: int, prompt_len: int, tok) -> list[list[dict]]:
    """``n`` user prompts rendering to about ``prompt_len`` tokens (±25%, as real ones vary)."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        want = int(prompt_len * (0.75 + 0.5 * i / max(1, n - 1)))
        words: list[str] = []
        while len(tok.apply_chat_template([{"role": "user", "content": " ".join(words)}],
                                          add_generation_prompt=True, tokenize=True,
                                          return_dict=False)) < want:  # fmt: skip
            words += rng.choices(WORDS, k=8)
        out.append([{"role": "user", "content": " ".join(words)}])
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


_PEAK = [0.0]  # the largest phase peak so far (phase_peak_gb resets the device's counter)


def peak_gb() -> float | None:
    if not torch.cuda.is_available():
        return None
    return max(_PEAK[0], torch.cuda.max_memory_allocated() / 2**30)


def phase_peak_gb() -> float | None:
    """The peak since the last call (a phase's: rollout, update), then a fresh counter."""
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.max_memory_allocated() / 2**30
    _PEAK[0] = max(_PEAK[0], p)
    torch.cuda.reset_peak_memory_stats()
    return round(p, 2)


def run_ours(a, model_dir: Path) -> dict:
    from accelerate import Accelerator

    from distill.backends import Sampling
    from distill.backends.hf import HFBackend
    from distill.models import load_model, load_tokenizer
    from distill.recipe.rl import RLConfig, RLDomainConfig
    from distill.rl.policy import PolicyLogprobs
    from distill.rl.rollout import Sample
    from distill.rl.trainer import _update
    from distill.train.setup import make_optimizer

    acc = Accelerator(cpu=not torch.cuda.is_available())
    gpu = acc.device.type == "cuda"
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.bfloat16 if gpu else torch.float32).to(acc.device)
    cfg = RLConfig(learning_rate=1e-6, micro_batch_seqs=a.micro, num_generations=a.group,
                   steps=a.steps + 1, max_new_tokens=a.completion, epsilon_high=0.28)  # fmt: skip
    from distill.rl.trainer import _train_config

    opt, sched = make_optimizer(model, _train_config(cfg), cfg.steps, fused=gpu)
    policy = PolicyLogprobs(model, checkpointing=a.checkpointing, compile_layers=a.compile)
    policy, opt, sched = acc.prepare(policy, opt, sched)
    rows = a.prompts * a.group
    backend = HFBackend.from_model(model, tok, batch_size=min(rows, a.decode_rows or rows))
    convs = conversations(a.prompts, a.prompt_len, tok)
    doms = {"bench": RLDomainConfig()}
    rng = random.Random(0)
    steps = []
    for step in range(a.steps + 1):  # the first is warm-up (CUDA graphs, allocator)
        sync()
        t0 = time.perf_counter()
        sampling = Sampling(temperature=1.0, max_new_tokens=a.completion, seed=step,
                            sampler_logprobs=True)  # fmt: skip
        groups = backend.complete(convs, [None] * len(convs), sampling, n=a.group)
        if not a.keep_decoder_memory:
            backend.release_cache()  # as the trainer does (rl.release_decoder_memory)
        sync()
        t1 = time.perf_counter()
        peak_rollout = phase_peak_gb()
        samples = []
        for g, comps in enumerate(groups):
            rewards = [rng.random() for _ in comps]
            mean = sum(rewards) / len(rewards)
            for j, c in enumerate(comps):
                samples.append(Sample(c.prompt_ids, c.token_ids, c.logprobs, c.kept, "bench",
                                      g * a.group + j, advantage=rewards[j] - mean))  # fmt: skip
        t2 = time.perf_counter()
        stats, t_ref, t_upd = _update(acc, policy, None, opt, sched, samples, doms, cfg,
                                      {"bench": (a.completion, 1, 1 << 20)}, backend.pad_id)  # fmt: skip
        sync()
        t3 = time.perf_counter()
        toks = sum(len(s.token_ids) for s in samples)
        steps.append({"step_s": t3 - t0, "generate_s": t1 - t0, "score_s": t2 - t1,
                      "logprobs_s": t_ref, "update_s": t3 - t2, "completion_tokens": toks,
                      "ratio_p95": stats["ratio_p95"], "peak_rollout_gb": peak_rollout,
                      "peak_update_gb": phase_peak_gb()})  # fmt: skip
        print(json.dumps({"side": "ours", "step": step, **steps[-1]}), file=sys.stderr, flush=True)
        if a.profile and step == a.steps:  # one more update, under the profiler
            out = _profile_update(lambda s=samples: _update(acc, policy, None, opt, sched, s, doms, cfg,
                                  {"bench": (a.completion, 1, 1 << 20)}, backend.pad_id))  # fmt: skip
    summary = _summary("ours", steps[1:], a)
    if a.profile:
        summary["update_profile"] = out
    return summary


def _profile_update(fn) -> list[dict]:
    """The update's 15 costliest operators by GPU time (ms, calls, share of GPU time).
    Operator level only: a kernel's time is also listed under the kernel's own name, and
    summing both levels counted it twice."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    ev = [
        e
        for e in prof.key_averages()
        if e.device_type.name == "CPU" and e.self_device_time_total > 0
    ]
    total = sum(e.self_device_time_total for e in ev) or 1
    top = sorted(ev, key=lambda e: -e.self_device_time_total)[:15]
    rows = [{"kernel": e.key[:90], "ms": round(e.self_device_time_total / 1e3, 1), "calls": e.count,
             "share": round(e.self_device_time_total / total, 3)} for e in top]  # fmt: skip
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25), file=sys.stderr)
    return [{"gpu_ms_total": round(total / 1e3, 1)}, *rows]


def run_trl(a, model_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if gpu else torch.float32
    )
    convs = conversations(a.prompts, a.prompt_len, tok)
    data = Dataset.from_list([{"prompt": c} for c in convs])
    n = a.prompts * a.group
    rng = random.Random(0)

    def reward(completions, **kw):
        return [rng.random() for _ in completions]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync()
            times[-1] = time.perf_counter() - times[-1]

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.micro,
        gradient_accumulation_steps=n // a.micro, num_generations=a.group,
        generation_batch_size=n, max_completion_length=a.completion, beta=0.0,
        loss_type="dapo", learning_rate=1e-6, max_steps=a.steps + 1, logging_steps=1,
        report_to=[], save_strategy="no", bf16=gpu, use_cpu=not gpu, temperature=1.0,
        top_p=1.0, generation_kwargs={"min_new_tokens": a.completion}, seed=0,
        dataloader_num_workers=0, shuffle_dataset=False,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Timer()])  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    steps = []
    for i, secs in enumerate(times):
        h = logs[i] if i < len(logs) else {}
        steps.append({"step_s": secs, "completion_tokens": n * a.completion,
                      "trl_log": {k: v for k, v in h.items() if "time" in k or "length" in k}})  # fmt: skip
    return _summary("trl", steps[1:], a)


def _summary(side: str, steps: list[dict], a) -> dict:
    step_s = sorted(s["step_s"] for s in steps)[len(steps) // 2]  # median steady step
    toks = sum(s["completion_tokens"] for s in steps) / len(steps)
    out = {
        "side": side,
        "steps_timed": len(steps),
        "step_s_median": round(step_s, 3),
        "steps_per_s": round(1 / step_s, 4),
        "completion_tokens_per_s": round(toks / step_s),
        "mean_completion_len": round(toks / (a.prompts * a.group), 1),
        "peak_gb": round(peak_gb(), 2) if peak_gb() is not None else None,
        "steps": steps,
    }
    if side == "ours":
        for k in ("generate_s", "score_s", "logprobs_s", "update_s"):
            out[k + "_median"] = round(sorted(s[k] for s in steps)[len(steps) // 2], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen05b", choices=PRESETS)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--completion", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--micro", type=int, default=16, help="completions per micro-batch")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument(
        "--checkpointing", action="store_true",
        help="ours with rl.gradient_checkpointing (TRL's GRPOConfig has it on by default)",
    )  # fmt: skip
    p.add_argument(
        "--keep-decoder-memory", action="store_true",
        help="ours without rl.release_decoder_memory (the KV cache stays through the update)",
    )  # fmt: skip
    p.add_argument("--profile", action="store_true", help="ours: profile one more update")
    p.add_argument(
        "--compile", action="store_true", help="ours with rl.torch_compile (decoder layers)"
    )
    p.add_argument(
        "--decode-rows", type=int, default=0, help="ours with rl.decode_rows (0: all rows at once)"
    )
    p.add_argument("--sides", default="trl,ours")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rl.json")
    a = p.parse_args()
    if a.side:  # a child: one side, one JSON line on stdout
        fn = run_ours if a.side == "ours" else run_trl
        print(json.dumps(fn(a, Path(a.model))), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    build(a.preset, work)
    results = {"args": {k: v for k, v in vars(a).items() if k not in ("side", "model", "out")},
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    for side in a.sides.split(","):
        argv = [sys.executable, __file__, "--side", side, "--model", str(work)]
        for k, v in vars(a).items():
            if k not in ("side", "model", "out", "sides") and v is not False:
                argv.append(f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}"))
        t0 = time.time()
        # the child's stderr (one line per step) goes straight to ours: a run cut off by a
        # time box still shows how far each side got
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env={**os.environ})
        if proc.returncode != 0:
            results[side] = {"error": f"exit status {proc.returncode} (its stderr is above)"}
            continue
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[side]["process_s"] = round(time.time() - t0, 1)
    if "ours" in results and "trl" in results and "step_s_median" in results.get("trl", {}):
        o, t = results["ours"], results["trl"]
        if "step_s_median" in o:
            results["step_rate_ratio"] = round(t["step_s_median"] / o["step_s_median"], 2)
            if o["peak_gb"] and t["peak_gb"]:
                results["peak_memory_ratio"] = round(o["peak_gb"] / t["peak_gb"], 2)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k not in ("ours", "trl")}))
    for side in ("trl", "ours"):
        r = results.get(side, {})
        print(side, json.dumps({k: v for k, v in r.items() if k != "steps"}))


if __name__ == "__main__":
    main()

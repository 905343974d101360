"""Generation throughput: our `hf` backend against plain transformers `generate` on
padded batches (and, on GPU, `generate` with a static cache and `generate_batch`), side
by side on one random-init model; then the `openai` backend through `distill serve`
against the same backend called in-process (client + HTTP overhead).

    python bench/generate.py                      # GPU: Qwen2-shaped ~0.5B, bf16
    python bench/generate.py --preset tiny        # CPU: a demo-sized ~1M-param teacher

Prints one JSON line per measurement and writes them all to --out. Tokens/s counts
generated tokens; the roofline is (weight bytes + KV-cache bytes read per decode step) /
HBM bandwidth measured here with a device-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from presets import PRESETS  # noqa: E402  (bench/ is on sys.path when run as a script)

from distill.backends import Sampling, mix_seed  # noqa: E402
from distill.backends.hf import HFBackend, _Row  # noqa: E402
from distill.chat.template import train_tokenizer  # noqa: E402

RESULTS: list[dict] = []


def emit(out: Path, **rec) -> None:
    RESULTS.append(rec)
    print(json.dumps(rec), flush=True)
    out.write_text(json.dumps(RESULTS, indent=1))


def build(preset: str, device: str, workdir: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "sum", "of", "the", "tool", "call", "answer"]
    tok = train_tokenizer([" ".join(random.choices(words, k=50)) for _ in range(200)], 300, workdir)
    cfg = Qwen2Config(**PRESETS[preset], tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)  # fmt: skip
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(workdir)
    return workdir


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # lengths vary +-25% around `length`, as real prompts do (padding matters)
    return [
        torch.randint(
            20, vocab, (int(length * (0.75 + 0.5 * i / max(1, n - 1))),), generator=g
        ).tolist()
        for i in range(n)
    ]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(
    backend: HFBackend, ps: list[list[int]], new: int, batch: int, device: str
) -> tuple[float, int]:
    backend.batch_size = batch
    s = Sampling(temperature=0.8, top_p=1.0, max_new_tokens=new)
    rows = [_Row(i, 0, p, mix_seed(0, i), new) for i, p in enumerate(ps)]
    order = sorted(rows, key=lambda r: -len(r.prompt))
    sync(device)
    t = time.perf_counter()
    for i in range(0, len(order), batch):
        backend.decode(order[i : i + batch], s)
    sync(device)
    return time.perf_counter() - t, sum(len(r.tokens) for r in rows)


def run_plain(
    model, ps, new: int, batch: int, pad: int, eos: list[int], device: str, pad_to: int = 0, **kw
) -> tuple[float, int]:
    sync(device)
    t, count = time.perf_counter(), 0
    for i in range(0, len(ps), batch):
        chunk = ps[i : i + batch]
        width = max(pad_to, *map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=True,
                             temperature=0.8, top_p=1.0, top_k=0, pad_token_id=pad, eos_token_id=eos, **kw)  # fmt: skip
        count += int((out[:, width:] != pad).sum())  # pads only follow a finished row's eos
    sync(device)
    return time.perf_counter() - t, count


def run_cb(model, ps, new: int, pad: int, eos: list[int], device: str) -> tuple[float, int]:
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=new, do_sample=True, temperature=0.8, top_p=1.0, top_k=0,
                          eos_token_id=eos, pad_token_id=pad)  # fmt: skip
    model.generate_batch(
        inputs=ps[:8], generation_config=GenerationConfig(**{**gc.to_dict(), "max_new_tokens": 4})
    )
    sync(device)
    t = time.perf_counter()
    res = model.generate_batch(inputs=ps, generation_config=gc)
    sync(device)
    return time.perf_counter() - t, sum(len(r.generated_tokens) for r in res.values())


def hbm_bandwidth(device: str) -> float | None:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    if not device.startswith("cuda"):
        return None
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    sync(device)
    return 2 * 20 * x.numel() / (time.perf_counter() - t)


def roofline(model, batch: int, prompt_len: int, new: int, bw: float | None) -> float | None:
    """Decode tokens/s if every step only read the weights and the mean KV cache at HBM speed."""
    if bw is None:
        return None
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head = c.hidden_size // c.num_attention_heads
    kv_per_token = (
        2
        * c.num_hidden_layers
        * c.num_key_value_heads
        * head
        * next(model.parameters()).element_size()
    )
    kv = batch * kv_per_token * (prompt_len + new / 2)
    return batch * bw / (weights + kv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--preset", choices=PRESETS, default="qwen05b" if torch.cuda.is_available() else "tiny"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # the GPU setting by default; a CPU run (`make bench`) is kept to minutes
    ap.add_argument("--prompts", type=int, default=256 if torch.cuda.is_available() else 128)
    ap.add_argument("--prompt-len", type=int, default=200 if torch.cuda.is_available() else 100)
    ap.add_argument("--new", type=int, default=256 if torch.cuda.is_available() else 64)
    ap.add_argument("--batches", default="64,256" if torch.cuda.is_available() else "64,128")
    ap.add_argument(
        "--skip",
        default="" if torch.cuda.is_available() else "cb",
        help="comma list of: plain,static,cb,serve",
    )
    ap.add_argument(
        "--budget-s", type=float, default=1e9, help="skip remaining baselines after this"
    )
    ap.add_argument(
        "--box-s", type=float, default=20, help="time box per baseline generate call (0 = none)"
    )
    ap.add_argument(
        "--eager-too", action="store_true", help="also time our dynamic-cache path on GPU"
    )
    ap.add_argument(
        "--profile", action="store_true", help="GPU: profile one decode step of ours (kernels)"
    )
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT", "bench/results/generate.json"))
    a = ap.parse_args()
    out, start, skip = Path(a.out), time.time(), set(a.skip.split(","))
    out.parent.mkdir(parents=True, exist_ok=True)
    d = build(a.preset, a.device, Path(tempfile.mkdtemp(prefix="bench-gen-")))
    backend = HFBackend(d, batch_size=64, device=a.device)
    model, pad, eos = backend.model, backend.pad_id, backend.eos_ids
    ps = prompts(a.prompts, a.prompt_len, model.config.vocab_size)
    bw = hbm_bandwidth(a.device)
    base = dict(preset=a.preset, device=torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{os.cpu_count()}-core CPU",
                params=sum(p.numel() for p in model.parameters()), prompts=a.prompts, prompt_len=a.prompt_len, new=a.new)  # fmt: skip
    emit(out, what="setup", hbm_bytes_per_s=bw, torch=torch.__version__, **base)
    # baselines are time-boxed (generate's max_time): their tokens/s covers the first
    # steps of each batch, where the KV cache is shortest (in their favour)
    box = dict(max_time=a.box_s) if a.box_s else {}
    batches = [int(b) for b in a.batches.split(",")]
    for batch in batches:
        measure_ours(out, backend, ps, a, batch, bw)
        if a.profile and backend.static is not None and batch == max(batches):
            profile_step(out, backend, batch)
        if "plain" not in skip and time.time() - start < a.budget_s:
            n = min(len(ps), batch)
            secs, toks = run_plain(model, ps[:n], a.new, batch, pad, eos, a.device, **box)
            emit(
                out,
                what="plain_generate",
                batch=batch,
                seconds=secs,
                tokens=toks,
                tok_s=toks / secs,
            )
    big = max(batches)
    for batch in batches:
        if (
            a.device.startswith("cuda")
            and "static" not in skip
            and time.time() - start < a.budget_s
        ):
            measure_static_generate(out, model, ps, a, batch, pad, eos)
    if "cb" not in skip and time.time() - start < a.budget_s:
        try:
            secs, toks = run_cb(model, ps[:big], a.new, pad, eos, a.device)
            emit(
                out, what="generate_batch", batch=big, seconds=secs, tokens=toks, tok_s=toks / secs
            )
        except Exception as e:
            emit(out, what="generate_batch", error=f"{type(e).__name__}: {str(e)[:300]}")
    if "serve" not in skip and time.time() - start < a.budget_s:
        try:
            bench_serve(out, d, backend, a, big)
        except Exception as e:
            emit(out, what="serve_overhead", error=f"{type(e).__name__}: {str(e)[:300]}")


def measure_static_generate(out: Path, model, ps, a, batch: int, pad: int, eos) -> None:
    """transformers' `generate(cache_implementation="static")` (its decode step compiled
    with CUDA graphs), warmed up on the timed shape: its compiled graphs depend on it, so
    every batch is padded to the longest prompt (one shape, one compile: its best case)."""
    box = dict(max_time=a.box_s) if a.box_s else {}
    kw = dict(cache_implementation="static", pad_to=max(map(len, ps)), **box)
    try:
        run_plain(model, ps[-batch:], a.new, batch, pad, eos, a.device, **kw)
        secs, toks = run_plain(model, ps, a.new, batch, pad, eos, a.device, **kw)
        emit(out, what="generate_static_cache", batch=batch, seconds=secs, tokens=toks,
             tok_s=toks / secs)  # fmt: skip
    except Exception as e:  # a baseline that fails is reported, not fatal
        emit(
            out,
            what="generate_static_cache",
            batch=batch,
            error=f"{type(e).__name__}: {str(e)[:300]}",
        )


@torch.inference_mode()  # the buffers are inference tensors; the pieces were traced so
def profile_step(out: Path, backend: HFBackend, batch: int, steps: int = 20) -> None:
    """Where one decode step of ours spends its time: the step run eagerly (its compiled
    pieces, no graph) under torch.profiler, kernels by GPU time; then the captured graph's
    replay timed alone. Reuses the buffers of the last measured decode."""
    from torch.profiler import ProfilerActivity, profile

    dec = backend.static
    ((shape, buf),) = [(k, v) for k, v in dec.shapes.items() if k[0] == batch][-1:]
    layers, rest = dec._params()
    key, graph = next(iter(buf.graphs.items()))
    rec = buf.records[key]
    buf.step.fill_(64)  # any step whose column fits the buffers
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec._step(buf, layers, rest, key, rec)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0.0, 0])
            k[0] += e.time_range.elapsed_us() / steps
            k[1] += 1 / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    busy = sum(v[0] for v in kernels.values())
    buf.step.fill_(64)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    emit(out, what="profile_step", batch=batch, shape=list(shape), sampling=list(key),
         graph_step_us=1000 * start.elapsed_time(end) / steps, kernel_us_per_step=busy,
         kernels_per_step=sum(v[1] for v in kernels.values()),
         top=[dict(name=n[:90], us=round(v[0], 1), per_step=round(v[1], 1)) for n, v in top[:25]])  # fmt: skip


def measure_ours(out: Path, backend: HFBackend, ps, a, batch: int, bw) -> None:
    """Our backend as configured for the device; if its compiled path fails, say so and
    measure the eager paths instead."""
    roof = roofline(backend.model, batch, a.prompt_len, a.new, bw)
    variants = [("ours", None)]
    if a.device.startswith("cuda") and a.eager_too:
        variants.append(("ours_dynamic_cache", False))
    for name, static in variants:
        saved = backend.static
        if static is False:
            backend.static = None
        try:
            # warm-up on the longest prompts with the full length: the static cache length
            # (prompt + new tokens, bucketed) is what the captured graphs depend on
            run_ours(backend, ps[-batch:], a.new, batch, a.device)
            secs, toks = run_ours(backend, ps, a.new, batch, a.device)
            emit(out, what=name, batch=batch, seconds=secs, tokens=toks, tok_s=toks / secs,
                 roofline_tok_s=roof, roofline_frac=(toks / secs / roof) if roof else None)  # fmt: skip
        except Exception as e:
            emit(out, what=name, batch=batch, error=f"{type(e).__name__}: {str(e)[:400]}")
            backend.static = None  # fall back to the dynamic-cache path
            if static is None:
                variants.append(("ours_dynamic_cache", False))
            continue
        finally:
            if static is False:
                backend.static = saved


def bench_serve(out: Path, model_dir: Path, backend: HFBackend, a, batch: int) -> None:
    """Same requests: the backend in-process vs the openai backend through `distill serve`."""
    import socket
    import threading

    import uvicorn

    from distill.backends.openai import OpenAIBackend
    from distill.serve import create_app

    convs = [
        [{"role": "user", "content": " ".join(["alpha beta gamma delta"] * (a.prompt_len // 4))}]
    ] * batch
    s = Sampling(temperature=0.8, max_new_tokens=a.new)
    seeds = list(range(batch))
    backend.batch_size = batch
    backend.complete(convs[:4], [None] * 4, Sampling(max_new_tokens=8), seeds=seeds[:4])
    t = time.perf_counter()
    direct = backend.complete(convs, [None] * batch, s, seeds=seeds)
    direct_s = time.perf_counter() - t
    toks = sum(c.completion_tokens for (c,) in direct)
    app = create_app(model_dir, batch_size=batch, device=a.device)
    app.state.backend.static = backend.static  # share the captured graphs: same engine
    app.state.backend.model = backend.model
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = OpenAIBackend(f"http://127.0.0.1:{port}/v1", model_dir.name, max_concurrency=batch)
    client.complete(convs[:4], [None] * 4, Sampling(max_new_tokens=8), seeds=seeds[:4])
    t = time.perf_counter()
    remote = client.complete(convs, [None] * batch, s, seeds=seeds)
    remote_s = time.perf_counter() - t
    server.should_exit = True
    rtoks = sum(c.completion_tokens for (c,) in remote)
    emit(out, what="serve_overhead", batch=batch, direct_tok_s=toks / direct_s, served_tok_s=rtoks / remote_s,
         overhead=1 - (rtoks / remote_s) / (toks / direct_s))  # fmt: skip


if __name__ == "__main__":
    main()

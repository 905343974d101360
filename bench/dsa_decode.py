"""Decoding at a long context through distill's own static decoder, dense against DSA.

``bench/dsa.py`` decodes both models through transformers' forward, eager: its dense side
repeats every KV head for its query heads at each step (copies of the whole cache), and
its DSA side is bound by the host launching ~40 small ops a layer, so its ratio moved
with the host (2.18x and 1.45x on two H100 hosts, 2026-12-06). Here both run as the
``hf`` backend decodes on a GPU (``distill.backends.static_decode``): static KV buffers,
packed-GQA attention (no copies), each step's layers and sampler compiled by
``torch.compile`` and the whole step captured as one CUDA graph and replayed. The DSA
model also caches its index keys and reads only each new token's top-k keys' K and V
rows. The KV buffers are filled with a random context of ``decode_ctx`` tokens (their
index keys too); tokens/s is batch / median step time (one token per row per step,
greedy), over ``decode_steps`` replays after a warm-up. With Triton on a GPU,
``dsa_fused`` is the DSA model again with its step's selection in Triton kernels
(``decode_kernel.DECODE_FUSED``: a radix select over each row's scores, not ``torch.topk``
over int64 rank keys; ``speedup_fused``), and ``dsa_kernels`` with its attention reading
the selected rows in place too (``DECODE_ATTENTION``; ``speedup_kernels``), and
``dsa_kernels_fp8`` with its index keys cached in fp8 too (``llama_decode.INDEX_FP8``; on
a CPU ``dsa_fp8``, the torch step's), and ``dsa_kernels_fp8_kv8`` with its K and V in
int8 as well (``KV_INT8``: a scale a row, applied to the selected rows only). Memory: the
buffers' bytes (K, V, the index keys and their scales) and the peak during the timed
steps (the model included).

    python bench/dsa_decode.py --preset h100 --out decode.json
    python bench/dsa_decode.py --preset cpu          # eager, no graphs: the code runs
    python bench/dsa_decode.py --preset h100 --profile   # and where a step's time goes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dsa import HAVE_TRITON, PRESETS, _override, _profile, _sync, _timed  # noqa: E402


def _model(name: str, p: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.dsa.config import DSAConfig
    from distill.dsa.model import DSAForCausalLM

    shape = dict(
        vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
        num_key_value_heads=p["kv"], head_dim=p["head_dim"],
        max_position_embeddings=p["decode_ctx"] + 1024,
    )  # fmt: skip
    if name == "dense":
        return LlamaForCausalLM(LlamaConfig(**shape))  # dsa, dsa_fused: the same DSA model
    return DSAForCausalLM(
        DSAConfig(
            **shape,
            index_n_heads=p["index_heads"],
            index_head_dim=p["index_head_dim"],
            index_top_k=p["top_k"],
        )  # fmt: skip
    )


def run(name: str, p: dict, dev, dtype, graphs: bool, profile: bool = False) -> dict:
    """One model's decode figures: tokens/s, the buffers' GB, the peak GB; ``profile``,
    its ops over two compiled steps run without the graph (the kernels the graph replays)."""
    from distill.backends.llama_decode import quantize_fp8, quantize_int8
    from distill.backends.static_decode import StaticDecoder, _bucket, head

    b, ctx, steps = p["decode_batch"], p["decode_ctx"], p["decode_steps"]
    model = _model(name, p).to(dev, dtype).eval()
    dec = StaticDecoder(model, pad_id=0, eos_ids=[1], compile=graphs, graphs=graphs)
    buf = dec._buffers(b, _bucket(ctx + steps + 16, 256))
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for j, caches in enumerate((buf.k, buf.v)):
            for t, sc in zip(caches, buf.kv_scale, strict=True):
                x = torch.randn(t[:, :, :ctx].shape, generator=g, device=dev, dtype=dtype)
                if sc is None:  # [B, Hkv, length, D]
                    t[:, :, :ctx] = x
                else:
                    t[:, :, :ctx], sc[:, :, :ctx, j] = quantize_int8(x)
        for t, ks in zip(buf.ki, buf.ks, strict=True):  # [B, length, Di]
            if t is None:
                continue
            ki = torch.randn(t[:, :ctx].shape, generator=g, device=dev, dtype=dtype)
            if ks is None:
                t[:, :ctx] = ki
            else:
                t[:, :ctx], ks[:, :ctx] = quantize_fp8(ki)
        buf.valid.zero_()
        buf.valid[:, :ctx] = True
        buf.width.fill_(ctx)
        buf.pos0.fill_(ctx)
        buf.step.fill_(1)  # the step's input token sits at column width + step - 1
        buf.limits.fill_(1 << 30)
        buf.finished.zero_()
        buf.seeds.zero_()
        buf.tok.random_(2, p["vocab"], generator=g)
    scales = (*buf.ki, *buf.ks, *buf.kv_scale)
    cached = (*buf.k, *buf.v, *(x for x in scales if x is not None))
    buffers = sum(t.numel() * t.element_size() for t in cached)
    layers, rest = dec._params()
    key = (0.0, 1.0, 0, False, 0)  # greedy, nothing recorded: Sampling's fields, in order
    rec = buf.record_buffers(key, rest[3].shape[0])
    with torch.inference_mode():
        for _ in range(2):  # compiles, then warm
            dec._eager(dec._step, buf, layers, rest, key, rec)
        if profile:
            _profile(lambda: dec._step(buf, layers, rest, key, rec), dev, f"{name}, 2 steps")
        graph = dec._capture(buf, layers, rest, key, rec) if dec.use_graphs else None
        step = graph.replay if graph is not None else (
            lambda: dec._step(buf, layers, rest, key, rec)
        )  # fmt: skip
        s, peak = _timed(step, dev, steps)
        _sync(dev)
    assert int(buf.step) + buf.width.item() < buf.valid.shape[1], "buffer too short"
    return {
        f"{name}_tok_s": round(b / s, 1),
        f"{name}_step_ms": round(s * 1e3, 3),
        f"{name}_buffers_gb": round(buffers / 1e9, 3),
        f"{name}_peak_gb": peak and round(peak, 2),
        f"{name}_graph": graph is not None,
        # False where torch.compile failed and the decoder went on uncompiled
        f"{name}_compiled": graphs and dec.head is not head,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print each model's ops, 2 steps")
    ap.add_argument("--models", default=None, help="comma list (default: all this device runs)")
    ap.add_argument("--launch", nargs="*", default=[], metavar="TABLE.KEY=INT",
                    help="decode_kernel launch settings, e.g. DECODE_LAUNCH.CS=1024")  # fmt: skip
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    p = dict(PRESETS[args.preset or ("h100" if dev.type == "cuda" else "cpu")])
    _override(p, args.set)
    dtype = torch.bfloat16 if p["dtype"] == "bf16" else torch.float32
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, preset {p}", flush=True)
    row = {"device": name, "context": p["decode_ctx"], "batch": p["decode_batch"],
           "top_k": p["top_k"]}  # fmt: skip
    from distill.backends import llama_decode
    from distill.dsa import decode_kernel

    models = ["dense", "dsa"]
    if dev.type == "cuda" and HAVE_TRITON:
        models += ["dsa_fused", "dsa_kernels"]
    if dev.type == "cpu" or not HAVE_TRITON:
        models += ["dsa_fp8", "dsa_fp8_kv8"]
    else:
        models += ["dsa_kernels_fp8", "dsa_kernels_fp8_kv8"]
    if args.models:
        models = args.models.split(",")
    for item in args.launch:
        key, value = item.split("=")
        table, field = key.split(".")
        getattr(decode_kernel, table)[field] = int(value)
    row["launch"] = {t: dict(getattr(decode_kernel, t)) for t in
                     ("DECODE_LAUNCH", "SCORE_LAUNCH", "ATTENTION_LAUNCH")}  # fmt: skip
    defaults = (decode_kernel.DECODE_FUSED, decode_kernel.DECODE_ATTENTION,
                llama_decode.INDEX_FP8, llama_decode.KV_INT8)  # fmt: skip
    for model in models:
        # dsa: the torch step; dsa_fused: its selection in Triton kernels; dsa_kernels: and
        # its attention reading the selected rows in place; _fp8: the index keys cached in
        # fp8 (llama_decode.INDEX_FP8); _kv8: K and V in int8 too (KV_INT8)
        decode_kernel.DECODE_FUSED = "fused" in model or "kernels" in model
        decode_kernel.DECODE_ATTENTION = "kernels" in model
        llama_decode.INDEX_FP8 = "_fp8" in model
        llama_decode.KV_INT8 = "_kv8" in model
        wanted = decode_kernel.DECODE_FUSED, decode_kernel.DECODE_ATTENTION
        try:
            row.update(run(model, p, dev, dtype, graphs=dev.type == "cuda", profile=args.profile))
            # the decoder turns failing decode kernels off and goes on with the torch step
            row[f"{model}_kernels_failed"] = wanted != (
                decode_kernel.DECODE_FUSED,
                decode_kernel.DECODE_ATTENTION,
            )
        finally:
            (decode_kernel.DECODE_FUSED, decode_kernel.DECODE_ATTENTION,
             llama_decode.INDEX_FP8, llama_decode.KV_INT8) = defaults  # fmt: skip
        print(json.dumps(row), flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for model in (m for m in models if m != "dense" and "dense" in models):
        row[f"speedup{model[3:]}"] = round(row[f"{model}_tok_s"] / row["dense_tok_s"], 2)
    print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()

"""DSA quality at long context: key-value retrieval, the dense model against its DSA copy.

Issue #19's quality check at 16k tokens: does a student converted to DeepSeek Sparse
Attention still find one token among 16k as well as the dense model it came from? Two
tasks (``task``): ``copy`` (the presets'), random tokens then the same tokens again, every
token of the copy an answer that only the position after its earlier occurrence holds;
``pairs``, random filler with ``pairs`` key-value pairs scattered through it, then
``queries`` questions "key -> ?" (multi-query associative recall). Either way the answer
comes from attending to one earlier position, so a wrong top-k selection is a wrong
answer. Accuracy is the argmax at every answer position in one teacher-forced forward
pass, on held-out sequences.

Phases, as the train stage runs them (``distill/dsa/train.py``), on the same data:
1. dense: a small Llama learns the task from scratch (time-boxed);
2. convert (:func:`distill.dsa.model.from_dense`), then warm-up: only the indexer trains,
   on the KL to the dense attention;
3. sparse: everything trains, CE + the indexer's KL over the selected keys.

The dense model's accuracy after step 1 is the bar; the DSA model's after 2 and 3 is
what the issue asks to match. On a GPU (bf16) the dense model attends with SDPA and the
DSA model takes the trainer's flat path (Triton kernels); on a CPU the reference path.

    python bench/dsa_retrieval.py --preset h100 --out dsa-retrieval.json   # 16k tokens
    python bench/dsa_retrieval.py --preset cpu                            # 256, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from distill.dsa.model import from_dense

PRESETS = {
    # the pairs task's h100 sizes (4 layers, 128 pairs) left the dense model at 0.6% after
    # 2,210 steps in 150 s (H100, 2026-12-06; chance 0.2%): it decided nothing. The copy
    # task gives ~8,000 answers a sequence and a dense model learns it at once (CPU: 256
    # tokens by step ~200, 1,024 by step ~400); 4,096 keys make a 16k sequence's first half
    # mostly distinct tokens (the vocabulary is 2 x keys + 257) (not run at 16k)
    "h100": dict(
        length=16384, batch=4, pairs=128, queries=128, keys=4096, hidden=256, layers=2,
        heads=8, kv=2, index_heads=4, index_head_dim=32, top_k=2048, lr=1e-3,
        dense_s=150, warmup_steps=50, sparse_steps=50, eval_batches=8, dtype="bf16",
        task="copy",
    ),
    # 2-core CPU (load 1.6), 2026-12-06, one run each: copy, the dense model at 100% in
    # 30 s, the converted one 13.2% before the warm-up (its indexer untrained, top-k 32 of
    # 256), 89.0% after 10 warm-up steps, 99.9% after 10 sparse ones (60 + 60: 100%); at
    # 1,024 tokens (top-k 128, 512 keys) dense 100% by step ~400, DSA 100% after 30 + 30.
    # The pairs task (task=pairs) reached 14-18% dense in 60-90 s whatever the lr
    "cpu": dict(
        length=256, batch=16, pairs=8, queries=16, keys=32, hidden=64, layers=2,
        heads=4, kv=2, index_heads=2, index_head_dim=16, top_k=32, lr=1e-3,
        dense_s=30, warmup_steps=10, sparse_steps=10, eval_batches=4, dtype="fp32",
        task="copy",
    ),
}  # fmt: skip

# token ids: 0 separates questions, then keys, values and filler in their own ranges
SEP = 0


def vocab(p: dict) -> tuple[int, int, int, int]:
    """(first key id, first value id, first filler id, vocabulary size)."""
    k0 = 1
    v0 = k0 + p["keys"]
    f0 = v0 + p["keys"]
    return k0, v0, f0, f0 + 256


def batch(p: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` [B, T] and ``answer`` [B, T] (True where the next token is an answer the
    model must retrieve: the label at position t is ids[t + 1])."""
    if p.get("task") == "copy":
        return copy_batch(p, g)
    k0, v0, f0, _ = vocab(p)
    b, t, n, q = p["batch"], p["length"], p["pairs"], p["queries"]
    ids = torch.randint(f0, f0 + 256, (b, t), generator=g)
    answer = torch.zeros(b, t, dtype=torch.bool)
    body = t - 3 * q  # questions take the tail: SEP key value
    for r in range(b):
        keys = torch.randperm(p["keys"], generator=g)[:n]
        vals = torch.randint(0, p["keys"], (n,), generator=g)
        # pair slots spread over the body, two tokens each, never overlapping
        slots = torch.randperm(body // 2 - 1, generator=g)[:n] * 2
        ids[r, slots] = k0 + keys
        ids[r, slots + 1] = v0 + vals
        ask = torch.randint(0, n, (q,), generator=g)
        tail = torch.stack([torch.full((q,), SEP), k0 + keys[ask], v0 + vals[ask]], 1).flatten()
        ids[r, body:] = tail
        answer[r, body + 1 :: 3] = True  # at the key: predict its value
    return ids, answer


def copy_batch(p: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The copy task: a random first half (ids from the whole vocabulary but SEP), SEP,
    then the first half again; every token of the copy is an answer. The next token can
    only come from the position after the current one's earlier occurrence (an induction
    head), and far more answers a sequence than the pairs task gives."""
    b, t = p["batch"], p["length"]
    half = (t - 1) // 2
    src = torch.randint(1, vocab(p)[3], (b, half), generator=g)
    ids = torch.cat([src, torch.full((b, 1), SEP), src, torch.full((b, t - 2 * half - 1), SEP)], 1)
    answer = torch.zeros(b, t, dtype=torch.bool)
    answer[:, half : 2 * half] = True  # at SEP predict src[0], ..., at src[-2] predict src[-1]
    return ids, answer


def loss_acc(logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor):
    pred = logits[:, :-1][answer[:, :-1]].float()
    gold = ids[:, 1:][answer[:, :-1]]
    return F.cross_entropy(pred, gold), (pred.argmax(-1) == gold).float().mean().item()


def flat(ids: torch.Tensor) -> dict:
    """[B, T] as the trainer's one flat row with trace boundaries (the DSA varlen path)."""
    b, t = ids.shape
    cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=ids.device)
    pos = torch.arange(t, device=ids.device).repeat(b)[None]
    return dict(
        input_ids=ids.reshape(1, -1), position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
        max_length_q=t, max_length_k=t,
    )  # fmt: skip


def forward(model, ids: torch.Tensor, dsa: bool) -> torch.Tensor:
    if not dsa:
        return model(input_ids=ids).logits
    return model(**flat(ids)).logits.view(*ids.shape, -1)


def evaluate(model, p: dict, dev, dsa: bool) -> float:
    g = torch.Generator().manual_seed(10_000)  # the same held-out sequences for every model
    model.eval()
    accs = []
    with torch.no_grad(), _autocast(p, dev):
        for _ in range(p["eval_batches"]):
            ids, answer = batch(p, g)
            ids, answer = ids.to(dev), answer.to(dev)
            accs.append(loss_acc(forward(model, ids, dsa), ids, answer)[1])
    model.train()
    return sum(accs) / len(accs)


def _autocast(p: dict, dev):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=p["dtype"] == "bf16")


def train(model, p: dict, dev, *, dsa: bool, steps: int | None, seconds: float | None,
          warmup: bool = False, seed: int = 0, log=print) -> dict:  # fmt: skip
    """Train ``model`` for ``steps`` or ``seconds``; the DSA phases add the indexer's KL
    (warm-up: the KL alone, only the indexer trains)."""
    layers = model.attention_layers() if dsa else []
    for a in layers:
        a.want_loss, a.dense = True, warmup
    params = model.indexer_parameters() if warmup else list(model.parameters())
    for q in model.parameters():
        q.requires_grad_(not warmup)
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=p["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0, step, last = time.time(), 0, {}
    while (steps is None or step < steps) and (seconds is None or time.time() - t0 < seconds):
        ids, answer = batch(p, g)
        ids, answer = ids.to(dev), answer.to(dev)
        with _autocast(p, dev):
            logits = forward(model, ids, dsa)
        ce, acc = loss_acc(logits, ids, answer)
        kl = torch.zeros((), device=dev)
        if layers:
            kl = torch.stack([a.index_loss.float() for a in layers]).sum()
            # as the trainer: over the layer count and the CE's denominator (its loss tokens)
            kl = kl / (answer[:, :-1].sum() * len(layers))
        loss = kl if warmup else ce + kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        last = dict(step=step, ce=round(ce.item(), 4), kl=round(kl.item(), 4), acc=round(acc, 3))
        if step % 50 == 0:
            log(
                json.dumps(
                    {"phase": "warmup" if warmup else ("sparse" if dsa else "dense"), **last}
                )
            )
    for a in layers:
        a.want_loss, a.dense = False, False
    for q in model.parameters():
        q.requires_grad_(True)
    return {**last, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--set", nargs="*", default=[], help="override preset keys: key=value")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    p = dict(PRESETS[a.preset or ("h100" if dev.type == "cuda" else "cpu")])
    for kv in a.set:
        k, v = kv.split("=", 1)
        p[k] = type(p[k])(v)
    torch.manual_seed(0)
    n_vocab = vocab(p)[3]
    cfg = LlamaConfig(
        vocab_size=n_vocab, hidden_size=p["hidden"], num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
        intermediate_size=4 * p["hidden"], max_position_embeddings=p["length"],
        rope_theta=500_000.0, tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    dense = LlamaForCausalLM(cfg).to(dev)
    print(json.dumps({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                      "preset": p, "params": sum(x.numel() for x in dense.parameters())}))  # fmt: skip
    res: dict = {"preset": p, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["dense_train"] = train(dense, p, dev, dsa=False, steps=None, seconds=p["dense_s"])
    res["dense_acc"] = evaluate(dense, p, dev, dsa=False)
    print(json.dumps({"dense_acc": res["dense_acc"], **res["dense_train"]}))
    model = from_dense(
        dense, index_n_heads=p["index_heads"], index_head_dim=p["index_head_dim"],
        index_top_k=p["top_k"], warmup=True,
    ).to(dev)  # fmt: skip
    res["converted_acc"] = evaluate(model, p, dev, dsa=True)  # untrained indexer
    res["warmup"] = train(model, p, dev, dsa=True, steps=p["warmup_steps"], seconds=None,
                          warmup=True, seed=1)  # fmt: skip
    res["warmup_acc"] = evaluate(model, p, dev, dsa=True)
    res["sparse"] = train(model, p, dev, dsa=True, steps=p["sparse_steps"], seconds=None, seed=2)
    res["dsa_acc"] = evaluate(model, p, dev, dsa=True)
    res["gap_points"] = round(100 * (res["dense_acc"] - res["dsa_acc"]), 2)
    print(json.dumps({k: res[k] for k in ("dense_acc", "converted_acc", "warmup_acc", "dsa_acc",
                                          "gap_points")}))  # fmt: skip
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

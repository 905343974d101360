"""What 8-bit decode caches cost a DSA student in quality: the same held-out tasks decoded
greedily through the static decoder (``distill.backends.static_decode``) from caches in
the model's dtype and from fp8 index keys and int8 K and V (the config's ``cache_8bit``),
per domain: pass@1 of each, their paired difference with its standard error, and how many
greedy completions are identical token for token.

The paired standard error is sqrt(discordant tasks) / n (a difference of two pass rates
on the same tasks is carried by the tasks that pass under one cache and fail under the
other), so it is much smaller than two independent runs' when the caches agree.

    python bench/dsa_8bit_cache.py recipes/demo.yaml data/demo/student [--set k=v ...]
        [--tasks 200] [--out 8bit.json]

On a CPU the static decoder runs uncompiled (fp32 model and caches against 8-bit ones);
on a GPU compiled and graphed, bf16 against 8-bit, with the Triton decode kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def decode_all(model, tokenizer, recipe, domains: dict, tasks: dict, small: bool) -> dict:
    """Per domain: each task's greedy verdict and completion, decoded with the caches
    in 8 bits or not."""
    from distill.backends import Sampling
    from distill.backends.hf import HFBackend
    from distill.eval.stage import _verify
    from distill.rollout import rollout
    from teachers.base import get_domain

    model.config.cache_8bit = small
    backend = HFBackend.from_model(
        model, tokenizer, batch_size=recipe.eval.batch_size, static=True, name="student"
    )
    out = {}
    try:
        for d, cfg in domains.items():
            max_new = cfg.max_new_tokens or recipe.generate.max_new_tokens
            sampling = Sampling(temperature=0.0, max_new_tokens=max_new, seed=recipe.seed)
            traces = rollout(
                backend, get_domain(d), tasks[d], n=1, sampling=sampling,
                max_turns=recipe.generate.max_turns,
                max_episode_tokens=recipe.generate.max_episode_tokens,
                teacher="student", split="eval",
            )  # fmt: skip
            verdicts = _verify(d, tasks[d], traces)
            out[d] = [
                (v.passed, json.dumps(tr.messages)) for tr, v in zip(traces, verdicts, strict=True)
            ]
    finally:
        backend.close()
    return out


def compare(plain: dict, small: dict) -> list[dict]:
    rows = []
    for d in plain:
        a, b = plain[d], small[d]
        n = len(a)
        pa, pb = sum(x for x, _ in a) / n, sum(x for x, _ in b) / n
        discordant = sum(x != y for (x, _), (y, _) in zip(a, b, strict=True))
        same = sum(s == t for (_, s), (_, t) in zip(a, b, strict=True))
        rows.append(dict(
            domain=d, tasks=n, plain=round(100 * pa, 2), small=round(100 * pb, 2),
            gap=round(100 * (pb - pa), 2), paired_se=round(100 * math.sqrt(discordant) / n, 2),
            discordant=discordant, identical=same,
        ))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("student", help="a DSA student's model directory")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tasks", type=int, default=None, help="eval tasks a domain (recipe's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from distill.dsa import register
    from distill.dsa.config import is_dsa
    from distill.eval.stage import eval_tasks
    from distill.models import load_model, load_tokenizer
    from distill.recipe.schema import load_recipe

    register()
    recipe = load_recipe(args.recipe, args.set)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = load_model(args.student).to(dev, dtype).eval()
    if not is_dsa(model):
        sys.exit(f"{args.student}: not a DSA student")
    tokenizer = load_tokenizer(args.student)
    domains = {d: recipe.domains[d] for d in recipe.active_domains()}
    tasks = {d: eval_tasks(d, c, recipe.seed, args.tasks) for d, c in domains.items()}
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, top_k {model.config.index_top_k}, "
          f"tasks {[len(t) for t in tasks.values()]}", flush=True)  # fmt: skip
    t0 = time.time()
    plain = decode_all(model, tokenizer, recipe, domains, tasks, small=False)
    t1 = time.time()
    small = decode_all(model, tokenizer, recipe, domains, tasks, small=True)
    rows = compare(plain, small)
    for r in rows:
        print(json.dumps(r), flush=True)
    summary = dict(device=name, student=args.student, top_k=model.config.index_top_k,
                   plain_s=round(t1 - t0, 1), small_s=round(time.time() - t1, 1),
                   rows=rows)  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

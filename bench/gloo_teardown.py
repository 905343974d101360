"""How often destroying a gloo process group deadlocks under the installed torch: the
check behind pyproject's torch floor (docs/versions.md, "torch's floor").

Each round spawns two CPU ranks, as ``DISTILL_CPU_PROCS`` and ``launch.spawn`` do; they
broadcast temporary tensors and an object, then destroy the group, as every rank does at
its stage's end (``launch.end_process_group``). Before torch 2.8 the destructor of gloo's
group held the GIL while it waited for gloo's worker thread, and that thread, freeing a
finished broadcast's tensor, waited for the GIL. A round counts as hung when a rank is
alive 20 s after the round began; its ranks are killed and the next round starts.

    python bench/gloo_teardown.py [--rounds 40]

On the 2-core CPU (2026-12-07, load 0.5-1.9): torch 2.7.1 hung 4 rounds of 12; 2.8.0 and
2.13.0 none of 40 (this script's first draft: 2.6.0 13 of 40, 2.7.1 12 of 40, 2.8.0 none
of 40). Those ranks called ``dist.destroy_process_group`` themselves; they now call
``end_process_group``, which makes that call (2.13.0: none of 5 since).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill.launch import _free_port, end_process_group

ROUND_S = 20.0


def _rank(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for _ in range(20):
        dist.broadcast(torch.tensor([rank], dtype=torch.float64), 0)  # freed at once
    dist.broadcast_object_list([rank], 0)
    end_process_group()  # as every rank's stage ends


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    rounds = ap.parse_args().rounds
    ctx = mp.get_context("spawn")
    hung = 0
    for _ in range(rounds):
        port = _free_port()
        ranks = [ctx.Process(target=_rank, args=(r, port)) for r in range(2)]
        for p in ranks:
            p.start()
        start = time.monotonic()
        for p in ranks:
            p.join(timeout=max(0.1, ROUND_S - (time.monotonic() - start)))
        if any(p.is_alive() for p in ranks):
            hung += 1
            for p in ranks:
                p.kill()
                p.join()
    print(f"torch {torch.__version__}: {hung} of {rounds} rounds hung")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The GPU figures of issues #14 and #19 that one device call (10 minutes) can hold, in the
# order the issues need them (on an H100, 2026-12-05: tests 44 s, generate 98 s, rl both
# sides ~170 s). Each step has its own time box so one slow step cannot eat the rest.
# Run on the GPU host from the repository root: OUT=dir bash bench/gpu_figures.sh
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
step() {  # step NAME SECONDS CMD...
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
    echo "$name rc=$? ${SECONDS}s total, $((SECONDS - t0))s"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step tests-gpu 60 python3 -m pytest -q tests/test_sampler_logprobs.py tests/test_dsa.py tests/test_bootstrap.py -k "gpu or cuda"
step generate 100 python3 bench/generate.py --batches 256,64 --skip plain,cb,serve --profile --out "$OUT/generate.json"
step rl 230 python3 bench/rl.py --out "$OUT/rl.json"
step rl-checkpointing 80 python3 bench/rl.py --sides ours --checkpointing --out "$OUT/rl-checkpointing.json"
step dsa 90 python3 bench/dsa.py --preset h100 --out "$OUT/dsa.json"
tail -n 3 "$OUT"/*.log

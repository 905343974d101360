#!/usr/bin/env bash
# The GPU figures of issues #14 and #19 that one device call (10 minutes) can hold, in the
# order the issues need them. Each step has its own time box so one slow step cannot eat
# the rest; every log goes to one file ($OUT/run.log: a device call brings back 8 files).
# Run on the GPU host from the repository root: OUT=dir bash bench/gpu_figures.sh
# (on an H100: GPU tests 44 s; TRL's side 106 s, 2026-12-05; ours with checkpointing
# and a profile did not finish in 100 s on a fresh machine, 2026-12-06; compiling adds
# tens of seconds to the warm-up step; TRL's side took 136 s on a warm H100 and did not
# finish in 150 s on a fresh one, 2026-12-06)
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
LOG=$OUT/run.log
. "$(dirname "$0")/gpu_steps.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"
step tests-gpu 50 python3 -m pytest -q tests/test_rl_head.py tests/test_sampler_logprobs.py tests/test_dsa.py -k "gpu or cuda"
step rl-head 30 python3 bench/rl_head.py
step rl-trl 170 python3 bench/rl.py --sides trl --out "$OUT/rl-trl.json"
step rl-ours-ckpt-compile 170 python3 bench/rl.py --sides ours --checkpointing --compile --profile --out "$OUT/rl-ours-ckpt-compile.json"
step rl-ours-ckpt-compile-rows256 120 python3 bench/rl.py --sides ours --checkpointing --compile --decode-rows 256 --out "$OUT/rl-ours-ckpt-compile-rows256.json"
if [ -z "${QUICK:-}" ]; then  # QUICK=1: the #14 target's figures alone (<= 540 s)
    step dsa 70 python3 bench/dsa.py --preset h100 --out "$OUT/dsa.json"
    step rl-ours-ckpt-micro32 70 python3 bench/rl.py --sides ours --checkpointing --compile --micro 32 --out "$OUT/rl-ours-ckpt32.json"
    step rl-ours 70 python3 bench/rl.py --sides ours --out "$OUT/rl-ours.json"
fi
grep -h '"step_s_median"\|step_rate\|peak' "$OUT"/rl-*.json | head -20

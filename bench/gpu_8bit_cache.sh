#!/usr/bin/env bash
# A DSA student's 8-bit decode caches on one device call (~5 min: 286 s with three runs
# of four models, 2026-12-07): the decode kernels' GPU tests (int8 K and V among them),
# the static decoder at 32k context and batch 32 with the caches in bf16, fp8 index keys,
# and fp8 index keys with int8 K and V (RUNS runs, default 3, interleaved by model;
# MODELS picks them), and, where a trained DSA student sits in $STUDENT (carry it), what
# the 8-bit caches cost its held-out pass@1 (bench/dsa_8bit_cache.py; RECIPE, default
# recipes/demo.yaml); PROFILE=1: then the ops of two 8-bit steps.
# Run on the GPU host from the repository root: OUT=dir bash bench/gpu_8bit_cache.sh
set -u
OUT=${OUT:-bench/results/gpu-8bit-cache}
mkdir -p "$OUT"
LOG=$OUT/run.log
. "$(dirname "$0")/gpu_steps.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"
step tests 200 python3 -m pytest -q -rs -o faulthandler_timeout=180 \
    tests/test_dsa.py::test_decode_kernels_match_torch_on_gpu tests/test_llama_decode.py -k gpu
MODELS=${MODELS:-dense,dsa_kernels,dsa_kernels_fp8,dsa_kernels_fp8_kv8}
decode() {
    step "decode-$1" 150 python3 bench/dsa_decode.py --preset h100 --models "$MODELS" \
        --out "$OUT/decode-$1.json"
}
decode 1
if [ -n "${STUDENT:-}" ]; then
    step quality 200 python3 bench/dsa_8bit_cache.py "${RECIPE:-recipes/demo.yaml}" "$STUDENT" \
        --out "$OUT/quality.json"
fi
for i in $(seq 2 "${RUNS:-3}"); do decode "$i"; done
# where a step's time goes with every cache in 8 bits (the ops of two compiled steps)
[ -n "${PROFILE:-}" ] && step profile 150 python3 bench/dsa_decode.py --preset h100 \
    --models dsa_kernels_fp8,dsa_kernels_fp8_kv8 --profile --out "$OUT/profile.json"
